"""Re-record tests/data/experiments_recorded.json: every experiment file's complete config,
its variants' settings ids, and every id the stages and the pipeline derive from it (variant,
SWA, score-store member, sweep, ensemble, pipeline keys) under fixed data fingerprints. Run it
only for a deliberate change of a default or of an id rule (the stored results of the old ids
are then no longer found): ``python tests/data/record_experiments.py`` from the repository
root."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

REPO = Path(__file__).resolve().parents[2]


def _fixed_fingerprint(root, splits, **_) -> str:
    """A stand-in for the data's fingerprint: the splits read, not the files (absent here)."""
    return hashlib.sha256(json.dumps(list(splits)).encode()).hexdigest()[:12]


@contextlib.contextmanager
def fixed_fingerprints():
    """Every module's ``data_fingerprint`` replaced by :func:`_fixed_fingerprint`."""
    import vspw_ray.data.fingerprint as fingerprint
    import vspw_ray.ensemble.members  # noqa: F401 - loaded before the names are replaced
    import vspw_ray.layout  # noqa: F401
    import vspw_ray.stages  # noqa: F401
    import vspw_ray.tune.search  # noqa: F401

    real = fingerprint.data_fingerprint
    with contextlib.ExitStack() as stack:
        for module in list(sys.modules.values()):
            if module.__name__.startswith("vspw_ray") and \
                    getattr(module, "data_fingerprint", None) is real:
                stack.enter_context(mock.patch.object(module, "data_fingerprint",
                                                      _fixed_fingerprint))
        yield


def experiment_ids(path: Path) -> dict:
    """Each id the experiment at ``path`` gives, under :func:`fixed_fingerprints`."""
    from vspw_ray import stages
    from vspw_ray.config import config_from_dict, load_config, resolve_variant, to_dict, variant_id
    from vspw_ray.data.fingerprint import split_fingerprint
    from vspw_ray.ensemble.members import ensemble_id
    from vspw_ray.ids import member_key, swa_variant_id
    from vspw_ray.tune.search import sweep_id

    cfg = load_config(path)
    out, members, infers = {}, [], []
    with fixed_fingerprints():
        for name in [v.name for v in cfg.variants] or [None]:
            r = resolve_variant(cfg, name)
            vid = variant_id(r)
            swa = swa_variant_id(vid, r.swa, r.train.iters)
            member = member_key(swa, r.train.iters, r.infer,
                                split_fingerprint(r.data.root, r.data.val_split))
            infer = stages.infer.key(r, r.data.val_split, swa_model=r.pipeline.swa)
            out[str(name)] = {"variant_id": vid, "swa_id": swa, "member_key": member,
                              "train_key": stages.train.key(r), "swa_key": stages.swa.key(r),
                              "infer_key": infer}
            members.append(SimpleNamespace(key=member))
            infers.append(infer)
        base = config_from_dict({**to_dict(cfg), "variants": []})
        out["experiment"] = {"sweep_id": sweep_id(base), "ensemble_id": ensemble_id(cfg, members),
                             "data_key": stages.data.key(cfg),
                             "ensemble_key": stages.ensemble.key(cfg, infers)}
    return out


def record() -> dict:
    from vspw_ray.config import load_config, resolve_variant, settings_id, to_dict

    out = {}
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        cfg = load_config(path)
        names = [v.name for v in cfg.variants] or [None]
        out[path.name] = {"config": to_dict(cfg), "settings_ids": {
            str(n): settings_id(resolve_variant(cfg, n)) for n in names},
            "ids": experiment_ids(path)}
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)  # relative class priors read as absent, as in the test
        out = record()
    target = REPO / "tests" / "data" / "experiments_recorded.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"recorded {len(out)} experiment files in {target}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

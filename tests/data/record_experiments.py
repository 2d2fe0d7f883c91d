"""Re-record tests/data/experiments_recorded.json: every experiment file's complete config and
its variants' settings ids. Run it only for a deliberate change of a default or of an id rule
(the stored results of the old ids are then no longer found): ``python
tests/data/record_experiments.py`` from the repository root."""

import json
import os
import tempfile
from pathlib import Path

from vspw_ray.config import load_config, resolve_variant, settings_id, to_dict

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)  # relative class priors read as absent, as in the test
        for path in sorted((REPO / "experiments").glob("*.yaml")):
            cfg = load_config(path)
            names = [v.name for v in cfg.variants] or [None]
            out[path.name] = {"config": to_dict(cfg), "settings_ids": {
                str(n): settings_id(resolve_variant(cfg, n)) for n in names}}
    target = REPO / "tests" / "data" / "experiments_recorded.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"recorded {len(out)} experiment files in {target}")


if __name__ == "__main__":
    main()

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    config_diff,
    config_from_dict,
    dump_yaml,
    load_config,
    load_yaml,
    parse_override,
    resolve_variant,
    settings_id,
    to_dict,
    variant_id,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECORDED = Path(__file__).resolve().parent / "data" / "experiments_recorded.json"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_loads_round_trips_and_states_only_what_differs(path):
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    # the file writes exactly the settings that differ from the dataclass defaults: none restated
    written = _fields(load_yaml(path.read_text()), cfg)
    differ = _fields(to_dict(cfg), cfg, ExperimentConfig(name=cfg.name))
    assert written - {"name", "variants"} == differ - {"name", "variants"}


def _fields(node, obj, default=None, prefix=""):
    """Dotted config fields (down to dataclass fields; dict- and list-valued fields whole) that
    ``node`` writes, or with ``default`` that ``node`` writes with a value other than it."""
    out = set()
    for key, value in node.items():
        sub, base = getattr(obj, key), getattr(default, key, None)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            out |= _fields(value, sub, base, f"{prefix}{key}.")
        elif default is None or to_dict(sub) != to_dict(base):
            out.add(prefix + key)
    return out


def test_experiment_files_resolve_to_the_settings_and_ids_recorded_before_they_were_cut(
        tmp_path, monkeypatch):
    # tests/data/experiments_recorded.json: each file's complete config, its variants' settings
    # ids (recorded from the complete files before they were cut to what differs from the
    # defaults) and every id derived from them; a changed default or id rule shows here before
    # stored results are orphaned
    monkeypatch.chdir(tmp_path)  # relative class priors read as absent, as when recorded
    recorder = _recorder()
    recorded = json.loads(RECORDED.read_text())
    files = sorted(EXPERIMENTS.glob("*.yaml"))
    assert [f.name for f in files] == sorted(recorded)
    for path in files:
        cfg = load_config(path)
        want = recorded[path.name]
        changed = config_diff(config_from_dict(want["config"]), cfg)
        assert not changed, f"{path.name}: {changed}"
        ids = {str(v): settings_id(resolve_variant(cfg, v))
               for v in [spec.name for spec in cfg.variants] or [None]}
        assert ids == want["settings_ids"], path.name
        # every id derived from it (variant, SWA, member, sweep, ensemble, pipeline keys), under
        # the same fixed data fingerprints as when recorded
        assert recorder.experiment_ids(path) == want["ids"], path.name


def _recorder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("record_experiments",
                                                  RECORDED.parent / "record_experiments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_files_are_short():
    lines = {p.name: len(p.read_text().splitlines()) for p in EXPERIMENTS.glob("*.yaml")}
    assert lines["quickstart.yaml"] <= 60
    swin = {n: k for n, k in lines.items() if n.startswith("swin_l_") and "search" not in n}
    assert len(swin) == 5 and max(swin.values()) <= 40, swin


def test_overrides_are_parsed_as_yaml_and_applied():
    cfg = load_config(EXPERIMENTS / "tiny_synth.yaml",
                      ["train.lr=1e-4", "data.crop_size=[64,96]", "loss.ohem.enabled=true"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.crop_size == (64, 96)
    assert cfg.loss.ohem.enabled is True
    assert parse_override("model.pretrained=null") == ("model.pretrained", None)


def test_on_and_off_mean_what_users_write_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans; the documented ``train.compile: on`` must
    reach the config as "on" from a file and from the command line alike."""
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ntrain:\n  compile: on\nloss:\n  ohem:\n    enabled: true\n")
    cfg = load_config(path)
    assert cfg.train.compile == "on" and cfg.loss.ohem.enabled is True
    assert load_config(path, ["train.compile=off"]).train.compile == "off"
    assert load_config(path, ["loss.ohem.enabled=false"]).loss.ohem.enabled is False
    with pytest.raises(ConfigError, match=r"loss\.ohem\.enabled.*true or false.*'yes'"):
        load_config(path, ["loss.ohem.enabled=yes"])  # a word, not a boolean: said, not guessed


def test_single_int_size_means_square():
    cfg = config_from_dict({"name": "x", "data": {"crop_size": 480}})
    assert cfg.data.crop_size == (480, 480)


@pytest.mark.parametrize("data, key", [
    ({"name": "x", "trian": {}}, "trian"),
    ({"name": "x", "train": {"lrr": 1}}, "train.lrr"),
    ({"name": "x", "train": {"lr": "fast"}}, "train.lr"),
    ({"name": "x", "train": {"iters": 1.5}}, "train.iters"),
    ({"name": "x", "train": {"lr": -1.0}}, "train.lr"),
    ({"name": "x", "train": {"batch_size": 16, "num_workers": 3}}, "train.batch_size"),
    ({"name": "x", "data": {"ratio_range": [2.0, 0.5]}}, "data.ratio_range"),
    ({"name": "x", "model": {"family": "segformer"}}, "model.family"),
    ({"name": "x", "model": {"backbone": "resnet50"}}, "model.backbone"),
    ({"name": "x", "loss": {"ohem": {"thresh": 1.5}}}, "loss.ohem.thresh"),
    ({"name": "x", "tracking": {"uri": "file:///tmp/mlruns"}}, "tracking.uri"),
    ({"name": "x", "swa": {"extra_iters": 1000, "every": 300}}, "swa.extra_iters"),
    ({"name": "x", "tune": {"space": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}}},
     "tune.space.train.lr.low"),
    ({"name": "x", "tune": {"space": {"train.lr": {"type": "normal"}}}}, "tune.space.train.lr.type"),
    ({"name": "x", "tune": {"space": {"data.crop_size": {"type": "categorical"}}}},
     "tune.space.data.crop_size.choices"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert f"'{key}'" in str(err.value)


def test_ohem_with_maskformer_is_rejected_with_the_reason():
    with pytest.raises(ConfigError, match="OHEM applies to UperNet only"):
        config_from_dict({"name": "x", "model": {"family": "maskformer"},
                          "loss": {"ohem": {"enabled": True}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_variant_ids_are_stable_and_distinguish_what_changes_weights(synth_root, synth_copy):
    cfg = load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={synth_root}"])
    ids = [variant_id(resolve_variant(cfg, v.name)) for v in cfg.variants]
    assert len(set(ids)) == len(ids)
    # stable across loads and independent of where the data lives or how runs are logged: the
    # same data copied to another folder keeps every id
    moved = load_config(EXPERIMENTS / "tiny_synth.yaml",
                        [f"data.root={synth_copy}", "train.log_interval=7",
                         "storage.path=s3://b/r"])
    assert [variant_id(resolve_variant(moved, v.name)) for v in moved.variants] == ids
    # but a learning rate change is a different model
    lr = load_config(EXPERIMENTS / "tiny_synth.yaml", ["train.lr=1e-5", f"data.root={synth_root}"])
    assert variant_id(resolve_variant(lr, "crop96")) != ids[0]
    # a variant can be selected by its id too, and gets its own seed and overrides
    v = resolve_variant(cfg, ids[2])
    assert v.seed == 1 and v.data.crop_size == (96, 128) and v.variants == ()


def test_variant_id_covers_the_data_read_not_its_path(synth_root, tmp_path):
    """Another dataset of the same shape, or the same one with a val video replaced, is other
    data: other ids, while the data-free settings stay the same."""
    import shutil

    from vspw_ray.config import settings_id, variant_fingerprint
    from vspw_ray.data.fingerprint import data_fingerprint
    from vspw_ray.data.synth import SynthSpec, synthesize
    from vspw_ray.errors import DataError

    other = tmp_path / "other"  # the session's set, drawn with another seed
    synthesize(other, SynthSpec(videos=8, frames=12, classes=6, height=64, width=80, seed=4),
               processes=1)
    a = load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={synth_root}"])
    b = load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={other}"])
    ra, rb = resolve_variant(a, "crop96"), resolve_variant(b, "crop96")
    assert settings_id(ra) == settings_id(rb)  # the same settings ...
    assert variant_id(ra) != variant_id(rb)  # ... on other data: another variant
    assert variant_fingerprint(ra) == data_fingerprint(synth_root, ("train", "val"))
    # a val video replaced by another (the selection data changes): another id
    edited = tmp_path / "edited"
    shutil.copytree(synth_root, edited)
    val = (edited / "val.txt").read_text().split()
    shutil.copytree(edited / "data" / val[0], edited / "data" / "replacement")
    (edited / "val.txt").write_text("\n".join(["replacement", *val[1:]]) + "\n")
    re = resolve_variant(load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={edited}"]),
                         "crop96")
    assert variant_id(re) not in (variant_id(ra), variant_id(rb))
    # no data, no id: the error names the key
    gone = load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match="config key 'data.root'.*nowhere does not exist"):
        variant_id(resolve_variant(gone, "crop96"))


def test_a_prior_changed_in_place_changes_the_la_id_and_a_moved_prior_does_not(synth_root,
                                                                               tmp_path):
    from vspw_ray.data.stats import class_prior

    names = [f"class{i}" for i in range(6)]

    def write_prior(path: Path, pixels: list[int]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"names": names, "prior": class_prior(pixels).tolist()}))
        return path

    def la_id(prior: Path) -> str:
        cfg = load_config(EXPERIMENTS / "tiny_synth.yaml", [
            f"data.root={synth_root}", "loss.logit_adjust.enabled=true",
            f"loss.logit_adjust.prior={prior}"])
        return variant_id(resolve_variant(cfg, "crop96"))

    def sweep(prior: Path, *extra: str) -> str:  # a sweep's id follows the same rules
        from vspw_ray.tune.search import sweep_id

        return sweep_id(load_config(EXPERIMENTS / "tiny_synth.yaml", [
            f"data.root={synth_root}", "loss.logit_adjust.enabled=true",
            f"loss.logit_adjust.prior={prior}", *extra]))

    first = write_prior(tmp_path / "a" / "class_prior.json", [10, 20, 30, 40, 50, 60])
    before, before_sweep = la_id(first), sweep(first)
    moved = write_prior(tmp_path / "b" / "elsewhere.json", [10, 20, 30, 40, 50, 60])
    assert la_id(moved) == before  # the same class frequencies at another path
    assert sweep(moved) == before_sweep
    # runtime keys are no setting of the sweep either: raising max_failures to get a crashed
    # sweep through resumes it instead of starting another
    assert sweep(first, "train.max_failures=3", "train.log_interval=7") == before_sweep
    assert sweep(first, "tune.num_samples=9") != before_sweep
    write_prior(first, [60, 50, 40, 30, 20, 10])  # rewritten in place
    assert la_id(first) != before
    assert sweep(first) != before_sweep
    # without logit adjustment the prior setting does not count at all
    off = load_config(EXPERIMENTS / "tiny_synth.yaml", [
        f"data.root={synth_root}", f"loss.logit_adjust.prior={first}"])
    plain = load_config(EXPERIMENTS / "tiny_synth.yaml", [f"data.root={synth_root}"])
    assert variant_id(resolve_variant(off, "crop96")) == variant_id(resolve_variant(plain,
                                                                                   "crop96"))


def test_variant_required_when_several_exist():
    cfg = load_config(EXPERIMENTS / "tiny_synth.yaml")
    with pytest.raises(ConfigError, match="--variant"):
        resolve_variant(cfg, None)
    with pytest.raises(ConfigError, match="no variant 'nope'"):
        resolve_variant(cfg, "nope")


def test_config_is_frozen():
    cfg = ExperimentConfig(name="x")
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_config_diff_names_exactly_the_settings_that_differ(tmp_path, capsys):
    from vspw_ray.cli import main
    from vspw_ray.config import config_diff, to_dict

    base = load_config(EXPERIMENTS / "quickstart.yaml")
    assert config_diff(base, base) == []
    data = to_dict(base)
    data["train"]["lr"] = 1e-3
    data["variants"] = list(reversed(data["variants"]))  # order alone is no difference
    data["variants"][0]["overrides"]["data.crop_size"] = [64, 96]
    dropped = data["variants"].pop()["name"]
    other = config_from_dict(data)
    changed = data["variants"][0]["name"]
    rows = config_diff(base, other)
    assert [(k, a, b) for k, a, b in rows if not k.startswith(f"variants[{dropped}]")] == [
        ("train.lr", base.train.lr, 1e-3),
        (f"variants[{changed}].overrides.data.crop_size",
         list(next(v for v in base.variants if v.name == changed).overrides["data.crop_size"]),
         [64, 96])]
    assert {b for k, _, b in rows if k.startswith(f"variants[{dropped}]")} == {None}
    path = tmp_path / "other.yaml"
    path.write_text(dump_yaml(other))
    assert main(["config", "diff", str(EXPERIMENTS / "quickstart.yaml"), str(path)]) == 0
    printed = capsys.readouterr().out
    assert "train.lr" in printed and f"{len(rows)} setting(s) differ" in printed

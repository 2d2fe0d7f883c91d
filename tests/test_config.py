from pathlib import Path

import pytest
import yaml

from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_override,
    resolve_variant,
    variant_id,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_loads_and_round_trips(path):
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    # complete: the file names every key of every section, nested ones included (no hidden defaults)
    assert _keys(yaml.safe_load(dump_yaml(cfg))) == _keys(yaml.safe_load(path.read_text()))


def _keys(node, prefix=""):
    if not isinstance(node, dict) or prefix.startswith(("tune.space.", "variants")):
        return {prefix}
    return {k for key, value in node.items() for k in _keys(value, f"{prefix}{key}.")}


def test_overrides_are_parsed_as_yaml_and_applied():
    cfg = load_config(EXPERIMENTS / "tiny_synth.yaml",
                      ["train.lr=1e-4", "data.crop_size=[64,96]", "loss.ohem.enabled=true"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.crop_size == (64, 96)
    assert cfg.loss.ohem.enabled is True
    assert parse_override("model.pretrained=null") == ("model.pretrained", None)


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


def test_variant_ids_are_stable_and_distinguish_what_changes_weights():
    cfg = load_config(EXPERIMENTS / "tiny_synth.yaml")
    ids = [variant_id(resolve_variant(cfg, v.name)) for v in cfg.variants]
    assert len(set(ids)) == len(ids)
    # stable across loads and independent of where the data lives or how runs are logged
    moved = load_config(EXPERIMENTS / "tiny_synth.yaml",
                        ["data.root=/elsewhere", "train.log_interval=7", "storage.path=s3://b/r"])
    assert [variant_id(resolve_variant(moved, v.name)) for v in moved.variants] == ids
    # but a learning rate change is a different model
    lr = load_config(EXPERIMENTS / "tiny_synth.yaml", ["train.lr=1e-5"])
    assert variant_id(resolve_variant(lr, "crop96")) != ids[0]
    # a variant can be selected by its id too, and gets its own seed and overrides
    v = resolve_variant(cfg, ids[2])
    assert v.seed == 1 and v.data.crop_size == (96, 128) and v.variants == ()


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

"""Stochastic weight averaging: the cyclical schedule, the running average, BatchNorm
recomputation (plain functions) and the Ray Train job with resume (local Ray)."""

import copy
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from tests.test_train_ray import EXPERIMENT, _overrides
from vspw_ray.config import ConfigError, SwaConfig, TrainConfig, config_from_dict, load_config
from vspw_ray.models import build_model
from vspw_ray.models.distill import load_model_weights
from vspw_ray.train.loop import build_optimizer
from vspw_ray.train.swa import cyclic_lr, recompute_bn, swa_scheduler, swa_steps

TINY = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = config_from_dict({"name": "t", "model": {"backbone_kwargs": TINY, "channels": 16,
                                                    "aux_channels": 8}})
    return build_model(cfg, 5)


def _batches(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 3, size, size, generator=g),
             "mask": torch.randint(0, 5, (2, size, size), generator=g)} for _ in range(n)]


def test_cyclic_lr_decays_from_max_to_min_each_cycle_and_restarts():
    swa = SwaConfig(extra_iters=12, every=4, lr_max=1e-3, lr_min=1e-5)
    cycle = [1e-3, 1e-3 - 0.99e-3 / 3, 1e-3 - 2 * 0.99e-3 / 3, 1e-5]
    assert [cyclic_lr(i, swa) for i in range(12)] == pytest.approx(cycle * 3)

    model = _tiny_model()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, backbone_lr_mult=0.1))
    scheduler = swa_scheduler(optimizer, swa)
    for i in range(12):  # every group follows the cycle, scaled by its multiplier
        for group in optimizer.param_groups:
            mult = 0.1 if group["name"].startswith("backbone") else 1.0
            assert group["lr"] == pytest.approx(mult * cycle[i % 4]), (i, group["name"])
        optimizer.step()
        scheduler.step()


def test_average_is_the_arithmetic_mean_of_the_snapshots():
    model = _tiny_model()
    swa = SwaConfig(extra_iters=9, every=3, lr_max=1e-3, lr_min=1e-4)
    optimizer = build_optimizer(model, TrainConfig(lr=swa.lr_max))
    scheduler = swa_scheduler(optimizer, swa)
    average = AveragedModel(model, use_buffers=False)
    snapshots, lrs = [], []
    swa_steps(model, average, optimizer, scheduler, iter(_batches(9)), start=0, swa=swa,
              device=torch.device("cpu"),
              on_step=lambda done, terms, lr: lrs.append(lr),
              on_snapshot=lambda done: snapshots.append(copy.deepcopy(model.state_dict())))
    assert len(snapshots) == 3 and int(average.n_averaged) == 3
    assert lrs == pytest.approx([cyclic_lr(i, swa) for i in range(9)])
    averaged = dict(average.module.named_parameters())
    for name, _ in model.named_parameters():
        mean = sum(s[name].double() for s in snapshots) / 3
        torch.testing.assert_close(averaged[name].double(), mean, rtol=1e-5, atol=1e-6, msg=name)
    name = next(n for n, p in model.named_parameters() if p.ndim == 4)
    assert not torch.equal(snapshots[0][name], snapshots[2][name])  # the snapshots differ


def test_bn_recomputation_matches_a_direct_pass():
    model = _tiny_model()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = [m.running_mean.clone() for m in bns]
    images = [b["image"] for b in _batches(3, seed=1)]

    # direct pass: the mean over batches of each BN input's per-batch mean and unbiased variance
    reference = copy.deepcopy(model).train()
    captured = {i: [] for i in range(len(bns))}
    ref_bns = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: captured[i].append(inp[0].detach()))
             for i, m in enumerate(ref_bns)]
    torch.manual_seed(7)
    with torch.no_grad():
        for x in images:
            reference.log_probs(x)
    for h in hooks:
        h.remove()

    torch.manual_seed(7)
    recompute_bn(model, images)
    used = [i for i, xs in captured.items() if xs]  # the auxiliary head is training-only
    assert len(used) >= 3
    for i in used:
        m, xs = bns[i], captured[i]
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(m.running_mean, before[i])  # the statistics did change
        assert m.momentum == 0.1  # momentum restored after the pass
    model.eval()  # the train/eval mode is restored after the pass
    recompute_bn(model, images[:1])
    assert model.training is False


# ------------------------------------------------------------------------------- Ray Train job


def _swa_overrides(root, storage, extra=24):
    return _overrides(root, storage, iters=8) + [
        f"swa.extra_iters={extra}", "swa.every=4", "swa.lr_max=0.0005", "swa.lr_min=0.00001",
        "swa.bn_batches=2"]


def _base_checkpoint(cfg, variant, folder):
    """A training checkpoint of ``variant`` written without Ray (a few plain steps)."""
    from vspw_ray.config import resolve_variant, variant_id
    from vspw_ray.data import load_class_table
    from vspw_ray.train.loop import build_scheduler, train_steps
    from vspw_ray.train.ray_train import save_training_state

    resolved = resolve_variant(cfg, variant)
    torch.manual_seed(0)
    model = build_model(resolved, load_class_table(resolved.data.root).num_classes)
    optimizer = build_optimizer(model, resolved.train)
    scheduler = build_scheduler(optimizer, resolved.train)
    train_steps(model, optimizer, scheduler, iter(_batches(3, size=64)), 3,
                device=torch.device("cpu"))
    folder.mkdir(parents=True)
    save_training_state(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=None, iteration=8, cfg=resolved, variant=variant_id(resolved))
    return folder


@pytest.mark.slow(45)
def test_swa_job_tracks_side_by_side_and_resumes_to_the_same_average(ray_local, synth_root, tmp_path,
                                                                     monkeypatch):
    import mlflow

    from vspw_ray.train.ray_train import CHECKPOINT_FILE, FAULT_ENV, load_training_state
    from vspw_ray.train.swa import swa_variant

    storage = tmp_path / "straight"
    cfg = load_config(EXPERIMENT, _swa_overrides(synth_root, storage))
    # crop96 (96x128 crops, larger than the frames) has the slower steps: room for a kill
    base = _base_checkpoint(cfg, "crop96", tmp_path / "base")
    out = swa_variant(cfg, "crop96", from_checkpoint=str(base))
    parent = load_training_state(base / CHECKPOINT_FILE)["variant_id"]
    assert out.variant_id.startswith(parent + "-swa-") and out.parent_variant_id == parent
    for prefix in ("base", "snapshot", "swa"):
        for fold in ("A", "B"):
            assert 0 <= out.metrics[f"{prefix}/val_{fold}/miou"] <= 1
    state = load_training_state(Path(out.checkpoint) / CHECKPOINT_FILE)
    assert state["kind"] == "swa_average" and state["swa"]["n_averaged"] == 6
    assert state["metrics"]["val_A/miou"] == out.metrics["swa/val_A/miou"]
    fresh = build_model(cfg, 6)
    load_model_weights(fresh, str(Path(out.checkpoint) / CHECKPOINT_FILE))  # an ordinary checkpoint

    client = mlflow.tracking.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run = client.get_run(out.run_id)
    assert run.data.tags["parent_variant_id"] == parent and run.data.tags["stage"] == "swa"
    for key in ("base/val_A/miou", "snapshot/val_B/miou", "swa/val_A/miou"):
        assert run.data.metrics[key] == pytest.approx(out.metrics[key])
    swa = cfg.swa
    lr = client.get_metric_history(out.run_id, "train/lr")  # one point per log interval
    assert [m.step for m in lr] == list(range(2, 25, 2))
    assert [m.value for m in lr] == pytest.approx([cyclic_lr(m.step - 1, swa) for m in lr])
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"swa_lr_schedule.png", "swa_comparison.txt", "config.yaml"} <= artifacts

    # the same job failing after its first snapshot: Ray Train restarts its workers from that
    # snapshot and the job ends with the same average (a fault raised in the workers, the same
    # resume path as a killed process; a killed driver is tests/test_train_ray.py's)
    faulted = tmp_path / "faulted"
    cfg = load_config(EXPERIMENT, _swa_overrides(synth_root, faulted) + ["train.max_failures=1"])
    monkeypatch.setenv(FAULT_ENV, "1")
    out = swa_variant(cfg, "crop96", from_checkpoint=str(base), track=False)
    resumed = load_training_state(Path(out.checkpoint) / CHECKPOINT_FILE)
    assert resumed["resumes"] == [4]  # restarted once, at the first snapshot
    assert out.metrics["swa/val_A/miou"] == state["metrics"]["val_A/miou"]
    for key, value in state["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_swa_from_another_variants_checkpoint_is_refused(synth_root, tmp_path):
    from vspw_ray.train.swa import swa_variant

    cfg = load_config(EXPERIMENT, _swa_overrides(synth_root, tmp_path / "runs"))
    base = _base_checkpoint(cfg, "crop64", tmp_path / "base")
    with pytest.raises(ConfigError, match="belongs to variant_id .* pass the variant"):
        swa_variant(cfg, "crop96", from_checkpoint=str(base), track=False)
    with pytest.raises(FileNotFoundError, match="train it first"):
        swa_variant(cfg, "crop64", track=False)

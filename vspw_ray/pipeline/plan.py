"""The pipeline's plan: every step (stage and item), its key, the steps it waits for, and
whether it runs or is skipped and why, decided from the config and storage alone (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from vspw_ray.config import ExperimentConfig
from vspw_ray.layout import RunLayout
from vspw_ray.stages import Variant, data, ensemble, infer, search, swa, train
from vspw_ray.stages.base import teacher_of, variants_of
from vspw_ray.stages.records import read_record

__all__ = ["Step", "build_plan", "format_plan"]

# images/s of one GPU training step and frames/s of 12-view TTA, measured on one H200 (issue 18
# table: Swin-L, crop 640, bf16 eager); scaled by crop area and view count for the estimate
TRAIN_IMAGES_PER_S = {"upernet": 26.4, "maskformer": 21.7}
TTA_FRAMES_PER_S_12_VIEWS = {"upernet": 2.18, "maskformer": 1.90}


@dataclass(frozen=True)
class Step:
    stage: str  # a key of STAGES
    item: str  # a variant, "variant/split", or "all"
    key: str
    needs: tuple[str, ...]  # ids of the steps it waits for
    run: bool
    reason: str
    resources: str = ""
    gpu_hours: float | None = None

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.item}"


def _decide(layout: RunLayout, pipeline: str, step_id: str, key: str,
            upstream: list[Step]) -> tuple[bool, str]:
    record = read_record(layout, pipeline, step_id)
    waiting = [s.id for s in upstream if s.run]
    if record is None:
        return True, "not done yet"
    if record.get("key") != key:
        return True, f"settings changed (key {record.get('key')} -> {key})"
    if waiting:
        return True, f"after {waiting[0]}"
    return False, f"done (key {key})"


def _step(layout, pipeline, stage, item, key, upstream, resources="", gpu_hours=None) -> Step:
    run, reason = _decide(layout, pipeline, f"{stage}:{item}", key, upstream)
    return Step(stage, item, key, tuple(s.id for s in upstream), run, reason, resources,
                gpu_hours)


def _resources(v: ExperimentConfig) -> str:
    per = dict(v.train.resources_per_worker) or {"CPU": 1}
    if v.train.use_gpu:
        per.setdefault("GPU", 1)
    inner = ", ".join(f"{k} {g:g}" for k, g in per.items())
    return f"{v.train.num_workers} worker(s) x {{{inner}}}"


def _train_gpu_hours(v: ExperimentConfig, iters: int) -> float | None:
    if not v.train.use_gpu:
        return None
    h, w = v.data.crop_size
    rate = TRAIN_IMAGES_PER_S[v.model.family] * (640 * 640) / (h * w)
    return iters * v.train.batch_size / rate / 3600


def _infer_gpu_hours(v: ExperimentConfig, frames: int | None) -> float | None:
    if not v.train.use_gpu or frames is None:
        return None
    views = len(v.infer.scales) * (2 if v.infer.flip else 1)
    return frames / (TTA_FRAMES_PER_S_12_VIEWS[v.model.family] * 12 / views) / 3600


def _variant_steps(layout, cfg, v: Variant, checked: Step, frames: dict,
                   models: dict[str, Step]) -> list[Step]:
    """train -> SWA -> inference steps of ``v``; its training also waits for its teacher's
    model step (in ``models``, filled in here for later students)."""
    p, c = cfg.name, v.cfg
    upstream = [checked] + ([models[teacher_of(v)]] if teacher_of(v) else [])
    train_step = _step(layout, p, train.NAME, v.name, train.key(c), upstream, _resources(c),
                  _train_gpu_hours(c, c.train.iters))
    steps, model = [train_step], train_step
    if cfg.pipeline.swa:
        model = _step(layout, p, swa.NAME, v.name, swa.key(c), [train_step], _resources(c),
                      _train_gpu_hours(c, c.swa.extra_iters))
        steps.append(model)
    models[v.name] = model
    for split in cfg.pipeline.splits:
        steps.append(_step(layout, p, infer.NAME, infer.item_of(v.name, split),
                           infer.key(c, split, swa_model=cfg.pipeline.swa), [model],
                           "1 GPU per model actor" if c.train.use_gpu else "CPU actors",
                           _infer_gpu_hours(c, frames.get(split))))
    return steps


def _split_frames(cfg: ExperimentConfig) -> dict[str, int]:
    """Frames per split when the data root is here (for the GPU-hour estimate)."""
    from vspw_ray.data import split_frames

    out = {}
    for split in cfg.pipeline.splits:
        try:
            out[split] = len(split_frames(cfg.data.root, split))
        except (OSError, ValueError):
            continue
    return out


def build_plan(cfg: ExperimentConfig, layout: RunLayout,
               variants: list[Variant] | None = None) -> list[Step]:
    """Every step of the pipeline in order. ``variants`` replaces the experiment's own (after
    a search: the sweep's best configurations)."""
    p = cfg.name
    checked = _step(layout, p, data.NAME, "all", data.key(cfg), [])
    steps = [checked]
    if cfg.pipeline.search and variants is None:
        sweep = _step(layout, p, search.NAME, "all", search.key(cfg), [checked],
                      f"{cfg.tune.num_samples} trials")
        return steps + [sweep]  # the variants are known once the sweep has run
    frames = _split_frames(cfg)
    variants = variants if variants is not None else variants_of(cfg)
    models: dict[str, Step] = {}
    for v in variants:
        steps += _variant_steps(layout, cfg, v, checked, frames, models)
    infers = [s for s in steps if s.stage == infer.NAME]
    if len(variants) >= 2:
        steps.append(_step(layout, p, ensemble.NAME, "all",
                           ensemble.key(cfg, [s.key for s in infers]), infers, "CPUs"))
    return steps


def format_plan(steps: list[Step]) -> str:
    """The plan as a table: step, run or skip and why, resources, estimated GPU-hours."""
    lines = [f"{'step':<34} {'action':<5} {'resources':<28} {'GPU-h':>7}  reason"]
    for s in steps:
        hours = f"{s.gpu_hours:7.1f}" if s.gpu_hours is not None else f"{'-':>7}"
        lines.append(f"{s.id:<34} {'run' if s.run else 'skip':<5} {s.resources:<28} {hours}  "
                     f"{s.reason}")
    todo = [s for s in steps if s.run]
    total = sum(s.gpu_hours or 0.0 for s in todo)
    lines.append(f"{len(todo)} of {len(steps)} steps to run"
                 + (f", ~{total:.1f} GPU-hours (from the step rates measured on one H200)"
                    if total else ""))
    return "\n".join(lines)

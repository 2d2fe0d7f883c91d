"""The run layout: the one place that names where every output of a config lives, so any
stage's output is found from the config alone.

::

    <storage>/train/<variant_id>/checkpoint_*/       Ray Train runs, one per variant
    <storage>/swa/<variant_id>-swa-<hash>/checkpoint_*/  SWA jobs; the last holds the average
    <storage>/tune/<sweep_id>/ (+ best/)             Tune experiments and their best configs
    <storage>/tune/optuna.db                          the default Optuna study storage
    <storage>/scores/<member key>/                    the score store (one member per key:
                                                      checkpoint, TTA settings, split data)
    <storage>/predictions/<member key>/<split>/       prediction PNGs
    <storage>/ensembles/<ensemble id>/                ensemble reports
    <storage>/submissions/<ensemble id>/              submission PNGs, zip and manifest
    <storage>/pipeline/<experiment>/<step>.json       the pipeline's completion records
    <storage>/mlflow.db                               the default MLflow store (local only)

``storage`` is a local folder or an ``s3://`` / ``gs://`` URI; every path here is a string
joined with ``/`` and read and written through pyarrow's filesystems, never ``pathlib.Path``
around a URI.
"""

from __future__ import annotations

from dataclasses import dataclass

from vspw_ray.config import ExperimentConfig, variant_id
from vspw_ray.ids import swa_variant_id

__all__ = ["RunLayout", "bind_teacher"]

@dataclass(frozen=True)
class RunLayout:
    """Where the outputs of runs stored under ``storage`` live."""

    storage: str  # an absolute local folder or a URI

    def join(self, *parts: str) -> str:
        return "/".join([self.storage.rstrip("/"), *(p.strip("/") for p in parts)])

    # ------------------------------------------------------------------ training and SWA
    @property
    def train_root(self) -> str:
        return self.join("train")

    def train_run(self, vid: str) -> str:
        return self.join("train", vid)

    @property
    def swa_root(self) -> str:
        return self.join("swa")

    def swa_run(self, swa_vid: str) -> str:
        return self.join("swa", swa_vid)

    # ------------------------------------------------------------------ search
    @property
    def tune_root(self) -> str:
        return self.join("tune")

    def sweep(self, sid: str) -> str:
        return self.join("tune", sid)

    def sweep_trials(self, sid: str) -> str:
        return self.join("tune", sid, "trials")

    def best_configs(self, sid: str) -> str:
        return self.join("tune", sid, "best")

    # ------------------------------------------------------------------ inference and after
    @property
    def scores(self) -> str:
        return self.join("scores")

    def predictions(self, key: str, split: str) -> str:
        return self.join("predictions", key, split)

    def ensemble(self, eid: str) -> str:
        return self.join("ensembles", eid)

    def submission(self, eid: str) -> str:
        return self.join("submissions", eid)

    def pipeline_record(self, pipeline: str, step: str) -> str:
        """The completion record of one pipeline step (``stage:item``)."""
        return self.join("pipeline", pipeline, step.replace(":", "--").replace("/", "__") + ".json")

    # ------------------------------------------------------------------ lookups
    def best_train_checkpoint(self, vid: str, metric: str) -> str:
        """The complete training checkpoint of ``vid`` with the highest ``metric``."""
        from vspw_ray.checkpoints import best_checkpoint

        return best_checkpoint(self.train_run(vid), metric)

    def swa_average(self, cfg: ExperimentConfig, base_checkpoint: str) -> str | None:
        """The complete SWA average that ``cfg``'s ``swa`` section makes of
        ``base_checkpoint``, or None when it has not been made."""
        from vspw_ray.checkpoints import list_checkpoints, read_summary

        base = read_summary(base_checkpoint)
        swa_vid = swa_variant_id(base["variant_id"], cfg.swa, int(base["iteration"] or 0))
        done = [p for p, s in list_checkpoints(self.swa_run(swa_vid))
                if s.get("kind") == "swa_average"]
        return done[-1] if done else None

    def model_checkpoint(self, cfg: ExperimentConfig) -> str:
        """The checkpoint a resolved variant's later stages use: the complete SWA average made
        by this config's ``swa`` section, else the best complete training checkpoint by
        ``tune.metric``."""
        best = self.best_train_checkpoint(variant_id(cfg), cfg.tune.metric)
        return self.swa_average(cfg, best) or best

    def teacher_checkpoint(self, experiment: ExperimentConfig, student: ExperimentConfig) -> str:
        """The checkpoint file of a resolved student's ``variant:NAME`` teacher: the teacher's
        SWA average when the pinned reference names one (``+swa-``), else its best complete
        training checkpoint.

        Raises:
            ConfigError: the teacher has no such checkpoint yet (the command that makes it is
                named).
        """
        from vspw_ray.checkpoints import checkpoint_file
        from vspw_ray.config import (
            ConfigError,
            resolve_variant,
            settings_id,
            teacher_pin,
            teacher_variant,
        )

        ref = student.loss.distill.teacher
        name = teacher_variant(ref)
        teacher = resolve_variant(experiment, name)
        pinned, swa = teacher_pin(ref)
        if pinned is not None and pinned != settings_id(teacher):
            raise ConfigError(f"config key 'loss.distill.teacher': '{ref}' was pinned to "
                              f"settings {pinned}, but variant '{name}' of experiment "
                              f"'{experiment.name}' now resolves to {settings_id(teacher)}; "
                              f"resolve the student from the same experiment file")
        command = f"vspw-ray {{}} {experiment.name}.yaml --variant {name}"
        try:
            best = self.best_train_checkpoint(variant_id(teacher), teacher.tune.metric)
        except FileNotFoundError:
            raise ConfigError(f"config key 'loss.distill.teacher': teacher variant '{name}' has "
                              f"no complete training checkpoint under {self.storage} yet; train "
                              f"it first ({command.format('train')}, or run the pipeline, "
                              f"which orders teachers first)") from None
        if not swa:
            return checkpoint_file(best)
        average = self.swa_average(teacher, best)
        if average is None:
            raise ConfigError(f"config key 'loss.distill.teacher': teacher variant '{name}' has "
                              f"no SWA average under {self.storage} yet (pipeline.swa is on, so "
                              f"the student learns from it); make it first "
                              f"({command.format('swa')}, or run the pipeline)")
        return checkpoint_file(average)


def bind_teacher(experiment: ExperimentConfig, student: ExperimentConfig) -> ExperimentConfig:
    """``student`` with ``loss.distill.teacher_checkpoint`` set when its teacher is a variant
    of ``experiment`` (looked up in the student's storage); otherwise ``student`` unchanged."""
    from dataclasses import replace

    from vspw_ray.config import teacher_variant
    from vspw_ray.storage import resolve_storage

    d = student.loss.distill
    if not d.enabled or teacher_variant(d.teacher) is None or d.teacher_checkpoint:
        return student
    found = RunLayout(resolve_storage(student.storage.path)).teacher_checkpoint(experiment, student)
    return replace(student, loss=replace(student.loss, distill=replace(
        d, teacher_checkpoint=found)))

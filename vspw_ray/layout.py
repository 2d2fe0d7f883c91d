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
around a URI. A pure table of paths: finding what is stored there is
:mod:`vspw_ray.stored_models`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunLayout"]


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

    @property
    def optuna_db(self) -> str:
        """The default Optuna study storage (SQLite: local storage only)."""
        return self.join("tune", "optuna.db")

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

"""The stages, one shape for all. Each module here exposes the same names:

==========================================  =================================================
``NAME``                                    the stage (a pipeline step's id is ``NAME:item``)
``Record``                                  a frozen dataclass: its completion record *and*
                                            its result (``StageRecord``: ``run_id``,
                                            ``data_fingerprint``, ``figures``, ...)
``key(...)``                                the identity of one item's result: the settings
                                            it reads, its data's fingerprint, its inputs' keys
``done(layout, pipeline, item, key)``       its ``Record`` when the item completed under that
                                            key, else None
``run(ctx, item, **options) -> Record``     run (or resume) one item in a ``StageContext``
==========================================  =================================================

The pipeline runs every planned step as ``STAGES[step.stage].run(ctx, step.item)``; the command
line (``vspw-ray train|swa|tune|infer|ensemble``) calls the same ``run`` with a context of the
experiment alone. The work itself stays in the stage's package (``vspw_ray.train``, ``tune``,
``infer``, ``ensemble``), loaded when a stage runs.
"""

from vspw_ray.stages import data, ensemble, infer, search, swa, train
from vspw_ray.stages.base import StageContext, StageRecord, Variant, variants_of

__all__ = ["STAGES", "StageContext", "StageRecord", "Variant", "variants_of"]

STAGES = {m.NAME: m for m in (data, search, train, swa, infer, ensemble)}

"""The score store: every member's TTA class scores in Parquet (``store``), compactly encoded
(``encoding``). Written by ``vspw-ray infer``; read by ``evaluate --store`` and the ensemble."""

from vspw_ray.scores.encoding import EncodedScores, ScoreEncoding, decode, encode
from vspw_ray.scores.store import SCHEMA, AlignedBatch, ScoreStore, StoreError

__all__ = ["ScoreStore", "SCHEMA", "AlignedBatch", "StoreError", "ScoreEncoding",
           "EncodedScores", "encode", "decode"]

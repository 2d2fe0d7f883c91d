"""Every id in one place: the hashing rules and the form of each identity. What each id
covers is chosen where its settings live (``config.weight_settings`` for a variant,
``ensemble.members.ensemble_settings`` for an ensemble, the pipeline's keys in each stage's
``key`` in ``vspw_ray.stages``); this module turns it into the id, by one of the two rules
below.

==========================  ======================================================  ==========
id                          form                                                    rule
==========================  ======================================================  ==========
variant / settings id       ``<family[:2]>-<10 hex>`` (+ the data fingerprint)      compact
SWA average                 ``<variant_id>-swa-<6 hex>`` (swa section, base iter)   spaced
TTA hash                    ``<6 hex>`` of the infer settings that change scores    spaced
score-store member          ``<checkpoint id>-it<N>-tta<hash>-d<8 hex of split>``    --
sweep                       ``<experiment>-tune-<8 hex>``                           spaced
ensemble                    ``<experiment>-ens-<10 hex>``                           spaced
teacher's SWA pin           ``+swa-<8 hex>`` of its swa section                     spaced
class prior                 ``<12 hex>`` of its names and frequencies               spaced
pipeline stage key          ``<12 hex>``                                            compact
data fingerprint            ``<12 hex>`` (``data.fingerprint``)                     compact
==========================  ======================================================  ==========

Both rules are the sha256 of the JSON of the identity, keys sorted, values JSON cannot hold
written by ``str``: **compact** without spaces (the rule for every new id), **spaced** with
Python's default separators, the rule the older ids were first made with -- kept, since a new
rule would rename every stored checkpoint, score and report made under them
(``tests/data/experiments_recorded.json`` holds every id of every experiment file to catch a
change).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

__all__ = ["digest", "spaced_digest", "settings_id", "variant_id", "swa_variant_id",
           "swa_pin", "tta_hash", "member_key", "member_for_split", "sweep_id", "ensemble_id",
           "prior_id", "stage_key", "SCORE_AFFECTING_INFER_KEYS"]

# the infer keys that change the stored scores; actors, batch size and the bad-frame policy
# change how the job runs, not what it writes
SCORE_AFFECTING_INFER_KEYS = ("scales", "flip", "score_scale", "top_k", "score_step")


def digest(data: Any, n: int = 12) -> str:
    """The compact rule: sha256 of ``data`` as JSON without spaces, keys sorted; ``n`` hex."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def spaced_digest(data: Any, n: int) -> str:
    """The spaced rule of the older ids: Python's default JSON separators, keys sorted."""
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def _plain(section: Any) -> dict:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)


def settings_id(family: str, settings: dict) -> str:
    """A variant's settings without its data (a ``variant:NAME`` teacher is pinned by it)."""
    return f"{family[:2]}-{digest(settings, 10)}"


def variant_id(family: str, settings: dict, fingerprint: str) -> str:
    """A variant: its settings and the fingerprint of the data it learns from."""
    return settings_id(family, {**settings, "data_fingerprint": fingerprint})


def swa_variant_id(parent: str, swa: Any, base_iteration: int) -> str:
    """The SWA average of ``parent``'s checkpoint at ``base_iteration`` made by the ``swa``
    section (``parent``, a variant_id, covers the data)."""
    return f"{parent}-swa-{spaced_digest({'swa': _plain(swa), 'from_iteration': base_iteration}, 6)}"


def swa_pin(swa: Any) -> str:
    """The ``+swa-<hash>`` of a teacher reference: the teacher's ``swa`` section."""
    return f"+swa-{spaced_digest(_plain(swa), 8)}"


def tta_hash(infer: Any) -> str:
    """The ``infer`` settings that change the stored scores."""
    data = _plain(infer)
    return spaced_digest({k: data[k] for k in SCORE_AFFECTING_INFER_KEYS}, 6)


def member_key(checkpoint_variant_id: str, iteration: int, infer: Any,
               split_fingerprint: str) -> str:
    """The score store's key of one checkpoint inferred with ``infer`` over one split whose
    data has ``split_fingerprint``: another checkpoint of the same variant, other TTA or
    encoding settings, or a split with other videos or frames never reuse old scores. Each
    split of a checkpoint is its own member."""
    return (f"{checkpoint_variant_id}-it{int(iteration)}-tta{tta_hash(infer)}"
            f"-d{split_fingerprint[:8]}")


def member_for_split(key: str, split_fingerprint: str) -> str:
    """The key of the same checkpoint and TTA settings inferred over another split (a member
    key's ``-d<fingerprint>`` replaced): the ensemble's val members' test scores."""
    base, sep, _ = key.rpartition("-d")
    if not sep:
        raise ValueError(f"'{key}' is not a score-store member key (CHECKPOINT-itN-ttaH-dF); "
                         f"members stored before data fingerprints must be inferred again")
    return f"{base}-d{split_fingerprint[:8]}"


def sweep_id(experiment: str, identity: dict) -> str:
    """A sweep: what decides its trials (``tune.search.sweep_id`` chooses)."""
    return f"{experiment}-tune-{spaced_digest(identity, 8)}"


def ensemble_id(experiment: str, identity: dict) -> str:
    """An ensemble: its members, settings, val data and folds (``ensemble.members`` chooses)."""
    return f"{experiment}-ens-{spaced_digest(identity, 10)}"


def prior_id(content: dict) -> str:
    """A class prior by its class names and frequencies, not by its path."""
    return spaced_digest(content, 12)


def stage_key(*parts: Any) -> str:
    """A pipeline step's key: what it reads and its inputs' keys."""
    return digest(parts, 12)

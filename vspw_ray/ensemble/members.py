"""The ensemble's members: which score-store member stands for each variant, what its manifest
says about it, and the checks a set of members must pass before any weight is searched.

A member is named by a variant of the experiment (name or variant_id) or directly by a score
store key. A variant's member is its SWA average's scores when those are stored, else its best
training checkpoint's, never both: the key is :func:`vspw_ray.layout.member_key` of that
checkpoint's header and the variant's ``infer`` settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vspw_ray import ids
from vspw_ray.checkpoints import checkpoint_file, read_summary
from vspw_ray.config import ConfigError, ExperimentConfig, resolve_variant, to_dict, variant_id
from vspw_ray.data import list_frames, read_split
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.errors import DataError, StoreError, UserError
from vspw_ray.ids import member_key
from vspw_ray.metrics import VAL_A_MIOU
from vspw_ray.stored_models import best_train_checkpoint, swa_average

__all__ = ["Member", "EnsembleError", "member_names", "load_members", "check_members", "check_split",
           "check_scored", "check_data", "check_leakage", "ensemble_settings", "ensemble_id"]


class EnsembleError(UserError):
    """An ensemble that cannot be formed as asked: the message names the member and the fix."""


@dataclass(frozen=True)
class Member:
    name: str  # as the user named it: a variant name, a variant_id or a store key
    key: str  # the score store member key
    variant_id: str  # the checkpoint's variant
    checkpoint: str | None
    family: str | None
    train_split: str | None
    fold_seed: int | None
    miou_a: float | None  # fold-A mIoU of its stored val scores (the manifest's)
    num_classes: int
    class_names: tuple[str, ...]
    data_fingerprint: str | None = None  # of the val data its scores cover (the manifest's)

    @property
    def label(self) -> str:
        return self.name if self.name == self.key else f"{self.name} ({self.key})"


def member_names(cfg: ExperimentConfig) -> list[str]:
    """``ensemble.members``, else every variant of the experiment, else the base config's id."""

    if cfg.ensemble.members:
        return list(cfg.ensemble.members)
    return [v.name for v in cfg.variants] or [variant_id(cfg)]


def _variant_key(cfg: ExperimentConfig, name: str, layout, stored: set[str]) -> tuple[str, str]:
    """``(store key, checkpoint)`` of a variant: its SWA average's when stored, else its best
    training checkpoint's. ``cfg`` is the experiment as loaded (paths as written), so that the
    variant_id is the one ``vspw-ray train`` computed."""

    resolved = resolve_variant(cfg, name)
    vid = variant_id(resolved)
    data = split_fingerprint(resolved.data.root, resolved.data.val_split)
    try:
        best = best_train_checkpoint(layout, vid, resolved.tune.metric)
    except FileNotFoundError as err:
        raise EnsembleError(f"ensemble member '{name}' (variant {vid}): {err}") from None
    swa = swa_average(layout, resolved, best)
    tried = []
    for folder in ([swa] if swa else []) + [best]:
        header = read_summary(checkpoint_file(folder))
        key = member_key(header["variant_id"], header.get("iteration") or 0, resolved.infer,
                         data)
        if key in stored:
            return key, checkpoint_file(folder)
        tried.append(key)
    raise StoreError(f"ensemble member '{name}' (variant {vid}) has no scores in the store "
                     f"(looked for {' then '.join(tried)}); run vspw-ray infer EXPERIMENT.yaml "
                     f"--variant {name} --split {cfg.data.val_split}")


def _member(name: str, key: str, checkpoint: str | None, manifest: dict,
            val_split: str) -> Member:
    metrics = (manifest.get("splits", {}).get(val_split) or {}).get("metrics") or {}
    return Member(name=name, key=key, variant_id=manifest.get("variant_id") or key,
                  checkpoint=checkpoint or manifest.get("checkpoint"),
                  family=manifest.get("family"), train_split=manifest.get("train_split"),
                  fold_seed=manifest.get("fold_seed"), miou_a=metrics.get(VAL_A_MIOU),
                  num_classes=int(manifest.get("num_classes") or 0),
                  class_names=tuple(manifest.get("class_names") or ()),
                  data_fingerprint=manifest.get("data_fingerprint"))


def load_members(cfg: ExperimentConfig, layout) -> list[Member]:
    """The members ``cfg`` names (see :func:`member_names`), read from the layout's store.

    Raises:
        ConfigError: a name is neither a variant of the experiment nor a store key.
        StoreError: a variant's scores are not stored.
    """
    from vspw_ray.scores.store import ScoreStore  # torch: not loaded to plan the pipeline

    store = ScoreStore(layout.scores)
    stored = set(store.members())
    members = []
    for name in member_names(cfg):
        if name in stored:
            key, checkpoint = name, None
        else:
            try:
                resolve_variant(cfg, name)
            except ConfigError:
                known = [v.name for v in cfg.variants]
                raise ConfigError(
                    f"config key 'ensemble.members': '{name}' is neither a variant of "
                    f"experiment '{cfg.name}' (variants: {known or 'none'}) nor a member of the "
                    f"score store {store.uri}; name variants or store keys") from None
            key, checkpoint = _variant_key(cfg, name, layout, stored)
        members.append(_member(name, key, checkpoint, store.manifest(key), cfg.data.val_split))
    return members


def check_data(members: Sequence[Member], cfg: ExperimentConfig) -> None:
    """Every member's scores are of the val split's data as it is now (a store key named in
    ``ensemble.members`` may hold scores of other data, or of data before fingerprints)."""

    now = split_fingerprint(cfg.data.root, cfg.data.val_split)
    for m in members:
        if m.data_fingerprint != now:
            what = (f"data with fingerprint {m.data_fingerprint}" if m.data_fingerprint
                    else "data stored before fingerprints")
            raise StoreError(f"ensemble member {m.label} holds scores of {what}, not of split "
                             f"'{cfg.data.val_split}' of {cfg.data.root} (fingerprint {now}); "
                             f"run vspw-ray infer for it on this data and name the new member")


def _check_same(members: Sequence[Member], field: str, expected, what: str, fix: str) -> None:
    odd = {m.label: getattr(m, field) for m in members if getattr(m, field) != expected}
    if odd:
        raise EnsembleError(f"members stored with {what} other than {expected!r}: {odd}; {fix}")


def check_members(members: Sequence[Member], cfg: ExperimentConfig, class_names: Sequence[str]
                  ) -> None:
    """At least two distinct members, all stored with the dataset's class table and with
    ``data.fold_seed``."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least two members, got "
                            f"{[m.label for m in members]}; list more in ensemble.members or "
                            f"add variants to the experiment")
    keys = [m.key for m in members]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise EnsembleError(f"ensemble.members names the same stored scores more than once: "
                            f"{twice}")
    _check_same(members, "class_names", tuple(class_names), "a class table",
                f"the dataset {cfg.data.root} has {len(class_names)} classes; re-run vspw-ray "
                f"infer for them on this dataset")
    seed = cfg.data.fold_seed
    _check_same(members, "fold_seed", seed, "a fold seed",
                f"weights are searched on fold A of data.fold_seed={seed} and members ranked by "
                f"their fold-A mIoU there; re-run vspw-ray infer with data.fold_seed={seed}, or "
                f"set data.fold_seed to theirs")


def check_split(members: Sequence[Member], store, root: str, split: str, *,
                masks: bool) -> dict[str, list[str]]:
    """Every member holds scores for exactly the videos of ``split``; with ``masks``, every
    frame of the split has its mask (scores are compared with them). Returns the split's
    frames by video, in order.

    Raises:
        StoreError: a member lacks the split, or holds other videos than the split file lists.
        DataError: ``masks`` and a frame has no mask.
    """

    videos = read_split(root, split)
    for m in members:
        held = store.videos(m.key, split)
        if not held:
            raise StoreError(f"member {m.label} has no scores for split '{split}'; run "
                             f"vspw-ray infer EXPERIMENT.yaml --variant {m.name} --split {split}")
        lacking, extra = sorted(set(videos) - set(held)), sorted(set(held) - set(videos))
        if lacking or extra:
            raise StoreError(f"member {m.label} holds other {split} videos than {root}/"
                             f"{split}.txt lists: lacking {lacking[:5]}, extra {extra[:5]}; "
                             f"run vspw-ray infer for it on this dataset")
    frames = {}
    for video in videos:
        try:
            frames[video] = [f.name for f in list_frames(root, video, require_masks=masks)]
        except DataError as err:
            if not masks:
                raise
            raise DataError(f"{err}: the ensemble scores split '{split}' against its masks; "
                            f"search on a split with masks (data.val_split)") from None
    return frames


def check_scored(members: Sequence[Member], val_split: str) -> None:
    """Every member's manifest holds its fold-A mIoU on ``val_split`` (members are ranked by
    it: the automatic groups and the best single member)."""
    missing = [m.label for m in members if m.miou_a is None]
    if missing:
        raise StoreError(f"members {missing} have no {VAL_A_MIOU} for split '{val_split}' in "
                         f"their manifests (frames were skipped, or the split has no masks); "
                         f"run vspw-ray infer --split {val_split} for them")


def check_leakage(members: Sequence[Member], root: str, val_split: str, *,
                  allow: bool) -> dict[str, list[str]]:
    """Members whose training split shares videos with ``val_split``: ``{member label:
    overlapping videos}``. Refused unless ``allow`` (then returned, to be flagged).

    Raises:
        EnsembleError: a member trained on val videos and ``allow`` is false.
        DataError: a member's training split file is not in ``root`` (nothing to check against).
    """

    val = set(read_split(root, val_split))
    found = {}
    for m in members:
        if not m.train_split:
            continue
        try:
            train = read_split(root, m.train_split)
        except DataError as err:
            raise DataError(f"member {m.label} was trained on split '{m.train_split}', which "
                            f"cannot be checked for val videos: {err}") from None
        overlap = sorted(val.intersection(train))
        if overlap:
            found[m.label] = overlap
    if found and not allow:
        named = "; ".join(f"{k}: '{_split_of(members, k)}' shares {len(v)} videos with "
                          f"'{val_split}' ({', '.join(v[:5])}{' ...' if len(v) > 5 else ''})"
                          for k, v in found.items())
        raise EnsembleError(f"members trained on val videos would make the weights chosen on "
                            f"val look better than they are: {named}. Drop them from "
                            f"ensemble.members, or set ensemble.allow_val_trained=true to keep "
                            f"them (the report flags them)")
    return found


def _split_of(members: Sequence[Member], label: str) -> str | None:
    return next(m.train_split for m in members if m.label == label)


def ensemble_settings(cfg: ExperimentConfig) -> dict:
    """The ``ensemble`` section as an ensemble's identity counts it: without ``members``, which
    counts through the store keys it selects (naming every variant is the default ensemble)."""
    return {k: v for k, v in to_dict(cfg.ensemble).items() if k != "members"}


def ensemble_id(cfg: ExperimentConfig, members: Sequence[Member]) -> str:
    """``<experiment>-ens-<hash>`` of the member keys, the ensemble settings
    (:func:`ensemble_settings`), the val split, its data's fingerprint and the fold seed:
    another member, setting, fold or val data gives another ensemble."""

    identity = {"members": sorted(m.key for m in members), "ensemble": ensemble_settings(cfg),
                "val_split": cfg.data.val_split, "fold_seed": cfg.data.fold_seed,
                "val_data": split_fingerprint(cfg.data.root, cfg.data.val_split)}
    return ids.ensemble_id(cfg.name, identity)

"""Which members form which group: ``ensemble.groups`` as written (any number of groups), or
the seed's rule (:func:`vspw_ray.ensemble.core.fusion.auto_groups`) on the members' fold-A mIoU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vspw_ray.config import EnsembleConfig
from vspw_ray.ensemble.core.fusion import MemberInfo, auto_groups, group_order
from vspw_ray.ensemble.members import EnsembleError, Member

__all__ = ["AUTO_BASE", "resolve_groups", "format_groups"]

AUTO_BASE = "strong"  # the base group of the seed's rule


def _lookup(members: Sequence[Member], name: str, group: str) -> Member:
    for m in members:
        if name in (m.name, m.key, m.variant_id):
            return m
    raise EnsembleError(f"config key 'ensemble.groups.{group}': '{name}' is not an ensemble "
                        f"member (members: {[m.name for m in members]}); list it in "
                        f"ensemble.members or name a member")


def _explicit(ecfg: EnsembleConfig, members: Sequence[Member]) -> dict[str, list[str]]:
    groups, seen = {}, {}
    for group, names in ecfg.groups.items():
        if not names:
            raise EnsembleError(f"config key 'ensemble.groups.{group}': the group is empty")
        keys = []
        for name in names:
            m = _lookup(members, name, group)
            if m.key in seen:
                raise EnsembleError(f"member {m.label} is in groups '{seen[m.key]}' and "
                                    f"'{group}'; put each member in one group")
            seen[m.key] = group
            keys.append(m.key)
        groups[group] = keys
    return {g: groups[g] for g in group_order(groups, ecfg.base_group)}


def resolve_groups(ecfg: EnsembleConfig, members: Sequence[Member]) -> tuple[dict[str, list[str]], str]:
    """``({group: [member key, ...]}, base group)`` with the base group first.

    Raises:
        EnsembleError: a group names a non-member or repeats one, a member lacks the family
            the automatic rule needs, or the grouping leaves fewer than two groups.
    """
    if ecfg.groups:
        groups, base = _explicit(ecfg, members), ecfg.base_group
    else:
        nameless = [m.label for m in members if not m.family]
        if nameless:
            raise EnsembleError(f"members {nameless} record no model family; list "
                                f"ensemble.groups explicitly")
        infos = [MemberInfo(m.key, m.family, float(m.miou_a)) for m in members]
        try:
            found = auto_groups(infos, ecfg.strong, ecfg.auxiliary)
        except ValueError as err:
            raise EnsembleError(str(err)) from None
        groups, base = {g: found[g] for g in group_order(found, AUTO_BASE)}, AUTO_BASE
    if len(groups) < 2 and ecfg.method != "greedy":
        raise EnsembleError(f"the grouping {groups} has one group: there is no weight to "
                            f"search; list ensemble.groups, lower ensemble.strong or raise "
                            f"ensemble.auxiliary")
    return groups, base


def format_groups(groups: Mapping[str, Sequence[str]], weights: Mapping[str, float] | None,
                  members: Sequence[Member]) -> str:
    """One line per group: its weight (the base group's is 1) and its members with their
    family and fold-A mIoU; then the members left out of every group."""
    by_key = {m.key: m for m in members}
    base = next(iter(groups))
    lines = []
    for g, keys in groups.items():
        w = "1 (base)" if g == base else (f"{weights[g]:.3f}" if weights else "searched")
        names = ", ".join(f"{by_key[k].name} [{by_key[k].family}, A {100 * by_key[k].miou_a:.2f}]"
                          for k in keys)
        lines.append(f"  {g:<10} weight {w:<9} {names}")
    grouped = {k for keys in groups.values() for k in keys}
    left = [by_key[m.key].name for m in members if m.key not in grouped]
    if left:
        lines.append(f"  (in no group: {', '.join(left)})")
    return "\n".join(lines)

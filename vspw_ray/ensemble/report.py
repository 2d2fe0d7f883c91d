"""The ensemble's honest report: fold A (where the weights were chosen) and fold B (where they
were not) for the ensemble, the best single member and the plain mean of all members; the
per-class IoU change against the best single member; the selection-optimism verdict of the
chosen weights (:func:`vspw_ray.tune.report.selection_optimism`); and the reminder that weights
chosen on val may not transfer to test. Written as ``report.json`` (the completion record of
the search, read back by a re-run) and ``report.txt`` beside ``trials.csv`` and the charts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vspw_ray.ensemble.members import Member
from vspw_ray.ensemble.methods import Selection
from vspw_ray.ensemble.rescore import VARIANTS
from vspw_ray.metrics import summarize
from vspw_ray.tune.report import TrialRow, ranked, selection_optimism

__all__ = ["TRANSFER_NOTE", "FIGURES", "build_report", "format_report", "write_trials_csv",
           "report_metrics"]

TRANSFER_NOTE = ("Weights chosen on val may not transfer to test: the seed's own val-tuned "
                 "weights gained 3.8 points on val but 1.5 on test. Fold B only shows how much "
                 "of the fold-A gain was selection luck within val; it cannot show a val-test "
                 "shift.")
FIGURES = ("miou", "fwiou", "pixel_acc", "vc8", "vc16")
LABELS = {"ensemble": "ensemble", "single": "best single", "mean": "plain mean"}


def _change(fig: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-class IoU of ``fig`` minus that of ``base`` (None where either is undefined)."""
    a, b = fig["per_class_iou"], base["per_class_iou"]
    return {c: (a[c] - b[c] if a[c] is not None and b[c] is not None else None) for c in a}


def _figures(totals: Mapping, class_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{variant: {fold: summarize(...) + confusion}}`` from the rescoring totals."""
    out = {}
    for variant in VARIANTS:
        out[variant] = {}
        for fold, (matrix, vc) in totals[variant].items():
            fig = summarize(matrix, class_names, vc)
            fig["confusion"] = matrix.tolist()
            out[variant][fold] = fig
    return out


def _member_rows(members: Sequence[Member], flagged: Mapping[str, list[str]]) -> list[dict]:
    return [{"name": m.name, "key": m.key, "variant_id": m.variant_id,
             "checkpoint": m.checkpoint, "family": m.family, "train_split": m.train_split,
             "miou_a": m.miou_a, "val_trained": m.label in flagged,
             "val_overlap": flagged.get(m.label, [])} for m in members]


def build_report(eid: str, sel: Selection, members: Sequence[Member], totals: Mapping,
                 class_names: Sequence[str], *, space: str, split: str, fold_seed: int,
                 flagged: Mapping[str, list[str]],
                 intervals: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as plain JSON data. ``totals``: :func:`vspw_ray.ensemble.rescore.rescore`'s
    result over folds A and B; ``intervals``: name -> :class:`vspw_ray.metrics.Interval` of
    fold-B differences (see :func:`fold_b_intervals`)."""
    best = max(members, key=lambda m: (m.miou_a, m.name))
    figures = _figures(totals, class_names)
    chosen = ranked(sel.rows)[0]
    # weights on a plateau tie the chosen ones on A; the runner-up is the best candidate below
    ties = {r.number for r in sel.rows if r.val_a == chosen.val_a} - {chosen.number}
    optimism = selection_optimism([r for r in sel.rows if r.number not in ties])
    return {
        "ensemble_id": eid, "method": sel.method, "space": space, "split": split,
        "fold_seed": fold_seed, "members": _member_rows(members, flagged),
        "groups": sel.groups, "base_group": next(iter(sel.groups)), "weights": sel.weights,
        "best_single": best.key, "best_single_name": best.name, "figures": figures,
        "per_class_change": {f: _change(figures["ensemble"][f], figures["single"][f])
                             for f in ("A", "B")},
        "selection": {**optimism, "chosen": chosen.number, "ties_on_a": len(ties)},
        "search": sel.stats, "val_trained": dict(flagged), "transfer_note": TRANSFER_NOTE,
        "fold_b_intervals": {k: asdict(v) for k, v in (intervals or {}).items()},
    }


def fold_b_intervals(by_video: Mapping[str, Mapping[str, Any]], videos: Sequence[str],
                     seed: int) -> dict[str, Any]:
    """Bootstrap intervals over fold B's videos of the ensemble's mIoU minus the best single
    member's and minus the plain mean's (``by_video``: rescore's per-video matrices)."""
    from vspw_ray.metrics import bootstrap_miou_difference

    if len(videos) < 2:
        return {}
    return {f"ensemble_minus_{other}": bootstrap_miou_difference(
        [by_video["ensemble"]], [by_video[other]], videos, seed=seed)
        for other in ("single", "mean")}


def _interval_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, iv in report.get("fold_b_intervals", {}).items():
        verdict = "excludes 0" if iv["low"] > 0 or iv["high"] < 0 else "includes 0: noise"
        lines.append(f"fold B {name.replace('_', ' ')}: {100 * iv['value']:+.2f} points, "
                     f"{100 * iv['level']:.0f} % bootstrap interval over videos "
                     f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] ({verdict})")
    return lines


def _pct(v: float | None) -> str:
    return f"{100 * v:6.2f}" if v is not None else "     -"


def _figure_lines(report: Mapping[str, Any]) -> list[str]:
    head = "  ".join(f"{k:>6}" for k in ("mIoU", "fwIoU", "VC8", "VC16"))
    lines = [f"{'':<26} fold A (selection)            fold B (report)",
             f"{'':<26} {head}    {head}"]
    names = {"single": f"best single ({report['best_single_name']})"[:26],
             "mean": f"plain mean ({len(report['members'])})", "ensemble": "ensemble"}
    for v in VARIANTS:
        cells = ["  ".join(_pct(report["figures"][v][f][k]) for k in ("miou", "fwiou", "vc8",
                                                                       "vc16"))
                 for f in ("A", "B")]
        lines.append(f"{names[v]:<26} {cells[0]}    {cells[1]}")
    return lines


def _change_lines(report: Mapping[str, Any], top: int = 5) -> list[str]:
    change = report["per_class_change"]["B"]
    known = sorted(((v, c) for c, v in change.items() if v is not None), reverse=True)
    if not known:
        return ["per-class IoU change on fold B: no class scored"]
    head = (f"per-class IoU change vs the best single member, fold B (points): "
            f"{sum(v > 0 for v, _ in known)} of {len(known)} classes gain")

    def shown(items) -> str:
        return ", ".join(f"{c} {100 * v:+.2f}" for v, c in items)

    if len(known) <= 2 * top:
        return [head, f"  {shown(known)}"]
    return [head, f"  most gained: {shown(known[:top])}",
            f"  most lost:   {shown(known[-top:])}"]


def _selection_lines(report: Mapping[str, Any]) -> list[str]:
    s = report["selection"]
    if "lead_a" not in s:
        return [f"selection optimism: {s['verdict']}"]
    ties = f", {s['ties_on_a']} more tie it on A" if s.get("ties_on_a") else ""
    return [f"selection optimism (the chosen #{s['best']} against the runner-up "
            f"#{s['runner_up']}, the best candidate below it on A{ties}): lead "
            f"{100 * s['lead_a']:+.2f} on A, {100 * s['lead_b']:+.2f} on B (rank "
            f"{s['best_rank_on_b']} of {s['complete']} on B): {s['verdict']}"]


def format_report(report: Mapping[str, Any], groups_text: str) -> str:
    """The printed report: weights and groups, the figures table (points), per-class change,
    selection optimism, flagged members and the transfer note."""
    lines = [f"ensemble {report['ensemble_id']}: method {report['method']}, space "
             f"{report['space']}, weights chosen on fold A of {report['split']} (fold seed "
             f"{report['fold_seed']})", groups_text, ""]
    lines += _figure_lines(report) + [""] + _interval_lines(report) + _change_lines(report)
    lines += _selection_lines(report)
    for label, videos in report["val_trained"].items():
        lines.append(f"FLAGGED: member {label} was trained on {len(videos)} val videos "
                     f"(ensemble.allow_val_trained=true): its val figures are optimistic")
    lines.append(f"note: {report['transfer_note']}")
    return "\n".join(lines)


def write_trials_csv(rows: Sequence[TrialRow], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "val_A_miou", "val_B_miou", *keys])
        for r in rows:
            writer.writerow([r.number, r.val_a, r.val_b, *[r.params.get(k, "") for k in keys]])


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``final/val_A/miou`` ... for the ensemble, ``single/...``, ``mean/...``,
    the weights and the selection numbers."""
    prefix = {"ensemble": "final", "single": "single", "mean": "mean"}
    out = {f"{prefix[v]}/val_{f}/{k}": report["figures"][v][f][k]
           for v in VARIANTS for f in ("A", "B") for k in FIGURES}
    out.update({f"weight/{g}": w for g, w in report["weights"].items()})
    s = report["selection"]
    out.update({f"selection/{k}": s[k] for k in ("lead_a", "lead_b", "excess_gap")
                if s.get(k) is not None})
    if report["search"].get("trials_per_s"):
        out["search/trials_per_s"] = report["search"]["trials_per_s"]
    return {k: float(v) for k, v in out.items() if v is not None}


def dumps(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=1, default=float)

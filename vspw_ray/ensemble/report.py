"""The ensemble's honest report.

Under cross-fitting (``ensemble.selection: crossfit``, the default) the ensemble's fold A figure
is the fusion chosen on fold B and its fold B figure the one chosen on A, so both are out of
fold, and their summed matrices give the **out-of-fold** figure over all of val, with a paired
bootstrap interval over all val videos of its difference from the best single member and from
the plain mean. Under hold-out, fold A chose and fold B reports (intervals over fold B). Beside
them: every candidate's exact figures, which one each fit chose and by how much over the
runner-up, the fusion applied to test (chosen on all of val; its figures are in-sample), a flag
when the folds' choices disagree, how often members agree, the per-class IoU change against the
best single member, the selection-optimism verdict of the search on fold A
(:func:`vspw_ray.selection.selection_optimism`), and the reminder that weights chosen on val
may not transfer to test. Written as ``report.json`` (the completion record of the search, read
back by a re-run) and ``report.txt`` beside ``trials.csv`` and the charts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vspw_ray.ensemble.core.outcome import VARIANTS, Outcome
from vspw_ray.ensemble.members import Member
from vspw_ray.ensemble.methods import Selection
from vspw_ray.metrics import summarize
from vspw_ray.selection import TrialRow, selection_optimism

__all__ = ["TRANSFER_NOTE", "FIGURES", "build_report", "format_report", "write_trials_csv",
           "report_metrics", "intervals", "dumps", "report_mode"]

TRANSFER_NOTE = ("Weights chosen on val may not transfer to test: the seed's own val-tuned "
                 "weights gained 3.8 points on val but 1.5 on test. Out-of-fold figures only "
                 "show how much of the gain was selection luck within val; they cannot show a "
                 "val-test shift.")
FIGURES = ("miou", "fwiou", "pixel_acc", "vc8", "vc16")


def report_mode(report: Mapping[str, Any]) -> str:
    """``crossfit`` or ``holdout`` (reports written before cross-fitting: holdout)."""
    return report.get("selection_mode", "holdout")


def _change(fig: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """Per-class IoU of ``fig`` minus that of ``base`` (None where either is undefined)."""
    a, b = fig["per_class_iou"], base["per_class_iou"]
    return {c: (a[c] - b[c] if a[c] is not None and b[c] is not None else None) for c in a}


def _summaries(parts: Mapping[str, tuple], class_names: Sequence[str]) -> dict[str, dict]:
    out = {}
    for fold, (matrix, vc) in parts.items():
        fig = summarize(matrix, class_names, vc)
        fig["confusion"] = matrix.tolist()
        out[fold] = fig
    return out


def _member_rows(members: Sequence[Member], flagged: Mapping[str, list[str]]) -> list[dict]:
    return [{"name": m.name, "key": m.key, "variant_id": m.variant_id,
             "checkpoint": m.checkpoint, "family": m.family, "train_split": m.train_split,
             "miou_a": m.miou_a, "val_trained": m.label in flagged,
             "val_overlap": flagged.get(m.label, [])} for m in members]


def _candidate_rows(out: Outcome) -> list[dict]:
    scores = {fit: dict(ch.ranking) for fit, ch in out.choices.items()}
    return [{**c.to_dict(), "miou": {fit: scores[fit][c.name] for fit in scores}}
            for c in out.candidates]


def intervals(out: Outcome, seed: int) -> tuple[dict[str, Any], str]:
    """Bootstrap intervals over videos of the ensemble's mIoU minus the best single member's
    and minus the plain mean's: over all val videos out of fold (crossfit), or over fold B
    (holdout); and what they resample."""
    from vspw_ray.metrics import bootstrap_miou_difference

    videos = out.folds["A"] + out.folds["B"] if out.mode == "crossfit" else out.folds["B"]
    over = "all val videos, out of fold" if out.mode == "crossfit" else "fold B videos"
    if len(videos) < 2:
        return {}, over
    return {f"ensemble_minus_{other}": bootstrap_miou_difference(
        [out.by_video["ensemble"]], [out.by_video[other]], videos, seed=seed)
        for other in ("single", "mean")}, over


def build_report(eid: str, out: Outcome, selections: Mapping[str, Selection],
                 members: Sequence[Member], class_names: Sequence[str], *, space: str,
                 split: str, fold_seed: int, flagged: Mapping[str, list[str]],
                 agreement: Mapping[str, Any], seed: int, order: Sequence[str]) -> dict[str, Any]:
    """The report as plain JSON data."""
    figures = {v: _summaries(out.figures[v], class_names) for v in VARIANTS}
    ivs, over = intervals(out, seed)
    first = selections.get("A") or next(iter(selections.values()))
    chosen = {fit: {**ch.to_dict(), "candidate": out.candidate(ch.chosen).to_dict()}
              for fit, ch in out.choices.items()}
    applied = out.applied
    return {
        "ensemble_id": eid, "method": first.method, "space": space, "split": split,
        "fold_seed": fold_seed, "selection_mode": out.mode, "members": _member_rows(members, flagged),
        "groups": applied.groups, "base_group": next(iter(applied.groups)),
        "weights": applied.weights, "inner": applied.inner, "order": list(order),
        "chosen": applied.to_dict(), "fits": chosen, "candidates": _candidate_rows(out),
        "best_single": out.single.groups["single"][0],
        "best_single_name": out.single.name.split(":", 1)[1],
        "figures": figures,
        "out_of_fold": {v: figures[v]["all"] for v in VARIANTS} if out.mode == "crossfit" else None,
        "applied_figures": _summaries(out.applied_figures, class_names),
        "per_class_change": {f: _change(figures["ensemble"][f], figures["single"][f])
                             for f in ("A", "B")},
        "selection": selection_optimism(first.rows), "disagreement": out.disagreement,
        "disagreement_flag": out.flagged,
        "search": {fit: s.stats for fit, s in selections.items()},
        "agreement": agreement, "val_trained": dict(flagged), "transfer_note": TRANSFER_NOTE,
        "intervals": {k: asdict(v) for k, v in ivs.items()}, "intervals_over": over,
    }


def _interval_lines(report: Mapping[str, Any]) -> list[str]:
    ivs = report.get("intervals", report.get("fold_b_intervals", {}))
    over = report.get("intervals_over", "fold B videos")
    lines = []
    for name, iv in ivs.items():
        verdict = "excludes 0" if iv["low"] > 0 or iv["high"] < 0 else "includes 0: noise"
        lines.append(f"{name.replace('_', ' ')}: {100 * iv['value']:+.2f} points, "
                     f"{100 * iv['level']:.0f} % bootstrap interval over {over} "
                     f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] ({verdict})")
    return lines


def _pct(v: float | None) -> str:
    return f"{100 * v:6.2f}" if v is not None else "     -"


def _figure_lines(report: Mapping[str, Any]) -> list[str]:
    head = "  ".join(f"{k:>6}" for k in ("mIoU", "fwIoU", "VC8", "VC16"))
    crossfit = report_mode(report) == "crossfit"
    titles = (("fold A (chosen on B)", "fold B (chosen on A)", "all val, out of fold")
              if crossfit else ("fold A (selection)", "fold B (report)"))
    folds = ("A", "B", "all") if crossfit else ("A", "B")
    lines = [f"{'':<26} " + "".join(f"{t:<34}" for t in titles),
             f"{'':<26} " + "    ".join(head for _ in folds)]
    names = {"single": f"best single ({report['best_single_name']})"[:26],
             "mean": f"plain mean ({len(report['members'])})", "ensemble": "ensemble"}
    for v in VARIANTS:
        cells = ["  ".join(_pct(report["figures"][v][f][k]) for k in ("miou", "fwiou", "vc8",
                                                                       "vc16"))
                 for f in folds]
        lines.append(f"{names[v]:<26} " + "    ".join(cells))
    return lines


def _choice_lines(report: Mapping[str, Any]) -> list[str]:
    """Which candidate each fit chose, by how much, and the fusion applied to test."""
    if "fits" not in report:
        return []
    lines = [f"candidates: {len(report['candidates'])} (the method's best points, every "
             f"member alone, the plain mean), scored on every pixel"]
    for fit, ch in report["fits"].items():
        c = ch["candidate"]
        margin = (f", {100 * ch['margin']:+.2f} over {ch['runner_up']}"
                  if ch.get("runner_up") else "")
        lines.append(f"  chosen on {'all of val' if fit == 'all' else 'fold ' + fit}: "
                     f"{ch['chosen']} ({c['members']} member{'s' * (c['members'] != 1)}) "
                     f"{100 * ch['score']:.2f}{margin}")
    applied = report["chosen"]
    inner = ", ".join(f"{k[:18]} {v:.2f}" for k, v in report.get("inner", {}).items())
    lines.append(f"applied to test: {applied['name']}, weights "
                 f"{json.dumps({g: round(w, 3) for g, w in report['weights'].items()})}"
                 + (f", shares inside groups: {inner}" if inner else ""))
    if report.get("disagreement") is not None:
        flag = "FLAG: the folds chose different fusions" if report.get("disagreement_flag") \
            else "the folds agree"
        lines.append(f"weights chosen on A vs on B: distance {report['disagreement']:.2f} "
                     f"(0 same, 1 disjoint members): {flag}")
    return lines


def _agreement_lines(report: Mapping[str, Any]) -> list[str]:
    agreement = report.get("agreement") or {}
    if not agreement.get("matrix"):
        return []
    names, m = agreement["members"], agreement["matrix"]
    pairs = sorted((m[i][j], names[i], names[j]) for i in range(len(names))
                   for j in range(i + 1, len(names)))
    if not pairs:
        return []
    mean = sum(p[0] for p in pairs) / len(pairs)
    return [f"member agreement (share of val pixels with the same label): mean "
            f"{100 * mean:.1f} %, least {pairs[0][1]} / {pairs[0][2]} {100 * pairs[0][0]:.1f} %, "
            f"most {pairs[-1][1]} / {pairs[-1][2]} {100 * pairs[-1][0]:.1f} %"]


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
    return [f"selection optimism of the search on fold A (its best #{s['best']} against the "
            f"runner-up #{s['runner_up']}): lead {100 * s['lead_a']:+.2f} on A, "
            f"{100 * s['lead_b']:+.2f} on B (rank {s['best_rank_on_b']} of {s['complete']} on "
            f"B): {s['verdict']}"]


def format_report(report: Mapping[str, Any], groups_text: str) -> str:
    """The printed report: groups, the figures table (points), intervals, the choices, member
    agreement, per-class change, selection optimism, flagged members and the transfer note."""
    how = ("cross-fitted: chosen on A scored on B and back" if report_mode(report) == "crossfit"
           else "chosen on fold A, reported on fold B")
    lines = [f"ensemble {report['ensemble_id']}: method {report['method']}, space "
             f"{report['space']}, {how} of {report['split']} (fold seed {report['fold_seed']})",
             groups_text, ""]
    lines += _figure_lines(report) + [""] + _interval_lines(report) + _choice_lines(report)
    lines += _agreement_lines(report) + _change_lines(report) + _selection_lines(report)
    for label, videos in report["val_trained"].items():
        lines.append(f"FLAGGED: member {label} was trained on {len(videos)} val videos "
                     f"(ensemble.allow_val_trained=true): its val figures are optimistic")
    lines.append(f"note: {report['transfer_note']}")
    return "\n".join(lines)


def write_trials_csv(rows: Sequence[TrialRow], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fit", "number", "val_A_miou", "val_B_miou", *keys])
        for r in rows:
            writer.writerow([r.extra.get("fit", "A"), r.number, r.val_a,
                             "" if r.val_b is None else r.val_b,
                             *[r.params.get(k, "") for k in keys]])


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``final/val_A/miou`` ... for the ensemble (out of fold under
    crossfit), ``single/...``, ``mean/...``, ``oof/...`` over all of val, the weights and the
    selection numbers."""
    prefix = {"ensemble": "final", "single": "single", "mean": "mean"}
    out = {f"{prefix[v]}/val_{f}/{k}": report["figures"][v][f][k]
           for v in VARIANTS for f in ("A", "B") for k in FIGURES}
    for v, fig in (report.get("out_of_fold") or {}).items():
        out.update({f"oof/{v}/{k}": fig[k] for k in FIGURES})
    out.update({f"weight/{g}": w for g, w in report["weights"].items()})
    s = report["selection"]
    out.update({f"selection/{k}": s[k] for k in ("lead_a", "lead_b", "excess_gap")
                if s.get(k) is not None})
    for name, iv in report.get("intervals", {}).items():
        out.update({f"interval/{name}/{k}": iv[k] for k in ("value", "low", "high")})
    search = report["search"]
    rate = (search.get("all") or search.get("A") or {}).get("trials_per_s") \
        if "A" in search or "all" in search else search.get("trials_per_s")
    if rate:
        out["search/trials_per_s"] = rate
    return {k: float(v) for k, v in out.items() if v is not None}


def dumps(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=1, default=float)

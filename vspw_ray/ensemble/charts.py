"""The ensemble's charts (matplotlib, Agg backend, imported lazily): fold-A mIoU over the group
weights with the chosen point marked, the per-class IoU change against the best single
member, and every candidate's exact figures with each fit's choice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vspw_ray.ensemble.methods import Heat
from vspw_ray.plots import pyplot

__all__ = ["weights_heatmap", "class_change_chart", "candidates_chart"]


def weights_heatmap(heat: Heat, path: Path) -> Path:
    """Fold-A mIoU (%) over two free weights (a heatmap, chosen point marked) or one (a curve).
    With more than two free weights the others are held at their chosen values (in the title)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.8) if len(heat.names) == 2 else (6, 3.5))
    if len(heat.names) == 2:
        x, y = heat.axes
        mesh = ax.pcolormesh(x, y, 100 * heat.values, shading="nearest", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="fold-A mIoU (%)")
        ax.plot(*heat.chosen, marker="*", color="red", markersize=14, markeredgecolor="white")
        ax.set_ylabel(f"weight of {heat.names[1]}")
    else:
        ax.plot(heat.axes[0], 100 * heat.values, color="tab:blue")
        ax.axvline(heat.chosen[0], color="red", ls="--", lw=1)
        ax.set_ylabel("fold-A mIoU (%)")
    ax.set_xlabel(f"weight of {heat.names[0]}")
    fixed = ", ".join(f"{g}={w:.2f}" for g, w in heat.fixed.items())
    ax.set_title(f"fold-A mIoU from the {heat.source}" + (f"\n(slice at {fixed})" if fixed
                                                          else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def class_change_chart(change: Mapping[str, Mapping[str, float | None]], path: Path,
                       title: str = "") -> Path:
    """Per-class IoU change (points) on folds A and B, sorted by fold B; ``change``:
    ``{"A": {class: delta}, "B": {...}}``, None where a class is not scored."""
    plt = pyplot()
    classes = sorted(change["B"], key=lambda c: (change["B"][c] is None, change["B"][c] or 0.0))
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.25 * len(classes) + 1)))
    pos = range(len(classes))
    for offset, fold, color in ((-0.2, "A", "tab:gray"), (0.2, "B", "tab:blue")):
        ax.barh([p + offset for p in pos], [100 * (change[fold][c] or 0.0) for c in classes],
                height=0.4, color=color, label=f"fold {fold}")
    ax.set_yticks(list(pos), classes, fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("IoU change vs the best single member (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def candidates_chart(report: Mapping, path: Path) -> Path:
    """Every candidate's exact mIoU (%) on each fit's selecting folds, one bar per fit; each
    fit's choice marked with a star."""
    plt = pyplot()
    fits = list(report["fits"])
    cands = sorted(report["candidates"], key=lambda c: -max(c["miou"].values()))
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(cands) * len(fits) ** 0.5 + 1)))
    height = 0.8 / len(fits)
    colors = {"A": "tab:gray", "B": "tab:blue", "all": "tab:green"}
    for j, fit in enumerate(fits):
        pos = [i + (j - (len(fits) - 1) / 2) * height for i in range(len(cands))]
        ax.barh(pos, [100 * c["miou"][fit] for c in cands], height=height,
                color=colors.get(fit, "tab:orange"),
                label="all of val" if fit == "all" else f"fold {fit}")
        chosen = report["fits"][fit]["chosen"]
        for p, c in zip(pos, cands):
            if c["name"] == chosen:
                ax.plot(100 * c["miou"][fit], p, marker="*", color="red", markersize=10)
    ax.set_yticks(range(len(cands)), [c["name"] for c in cands], fontsize=7)
    ax.invert_yaxis()  # the best candidate on top
    lows = [100 * v for c in cands for v in c["miou"].values()]
    ax.set_xlim(max(0.0, min(lows) - 2), min(100.0, max(lows) + 1))
    ax.set_xlabel("mIoU on the fit's selecting folds (%), every pixel; * the fit's choice")
    ax.set_title(f"{report['ensemble_id']}: candidates", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

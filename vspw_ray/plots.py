"""Charts people would rather look at than read. Matplotlib with the Agg backend, imported lazily."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["pyplot", "per_class_iou_chart", "lr_schedule_chart"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), imported when first needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_class_iou_chart(ious: Mapping[str, float], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of per-class IoU, worst first."""
    plt = pyplot()
    items = sorted(ious.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(items) + 1)))
    ax.barh([k for k, _ in items], [100 * v for _, v in items], color="tab:blue")
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def lr_schedule_chart(lrs: Sequence[float], path: str | Path, *, snapshots: Sequence[int] = (),
                      title: str = "") -> Path:
    """Learning rate per iteration (log scale), snapshot iterations marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(range(1, len(lrs) + 1), lrs, color="tab:blue", lw=1.2)
    for it in snapshots:
        ax.axvline(it, color="tab:orange", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_title(title + (" (dashed: snapshots)" if snapshots else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

"""Charts people would rather look at than read. Matplotlib with the Agg backend, imported lazily."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["per_class_iou_chart"]


def per_class_iou_chart(ious: Mapping[str, float], path: str | Path, title: str = "") -> Path:
    """Horizontal bars of per-class IoU, worst first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

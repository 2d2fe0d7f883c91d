"""`vspw-ray data stats`: class frequencies of a split (the seed's Fig. 2) and the class prior.

The prior feeds logit adjustment (``tau * log prior``), so it must be finite for every class.
It is Laplace-smoothed in pixels: ``prior_c = (n_c + alpha) / (N + alpha * C)`` with
``alpha = 1`` by default -- a class with no pixel gets the prior of a class with one pixel, a
tiny but finite value, and classes with pixels are changed by at most ``alpha * C / N``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vspw_ray.data.layout import (
    label_lut,
    list_frames,
    load_class_table,
    read_raw_mask,
    read_split,
    reduce_mask,
)
from vspw_ray.parallel import map_videos

__all__ = ["class_stats", "class_prior", "write_stats", "load_prior"]


def _video_counts(root: str, video: str, num_classes: int) -> tuple[np.ndarray, int]:
    lut = label_lut(num_classes)
    counts = np.zeros(num_classes + 1, np.int64)  # last bin: ignored pixels
    frames = 0
    for frame in list_frames(root, video, require_masks=True):
        reduced = reduce_mask(read_raw_mask(frame), lut, frame)
        counts += np.bincount(np.minimum(reduced.ravel(), num_classes), minlength=num_classes + 1)
        frames += 1
    return counts, frames


def class_stats(root: str | Path, split: str = "train", *, processes: int | None = None,
                progress=None) -> dict:
    """Per-class pixel counts and number of videos each class appears in.

    Returns ``{"split", "num_videos", "num_frames", "ignored_pixels", "classes": [{"name",
    "pixels", "videos"}, ...]}`` in reduced-id order.
    """
    table = load_class_table(root)
    videos = read_split(root, split)
    c = table.num_classes
    pixels, in_videos, frames, ignored = np.zeros(c, np.int64), np.zeros(c, np.int64), 0, 0
    jobs = [(str(root), v, c) for v in videos]
    for counts, n in map_videos(_video_counts, jobs, processes=processes, progress=progress):
        pixels += counts[:c]
        in_videos += counts[:c] > 0
        ignored += int(counts[c])
        frames += n
    return {
        "split": split,
        "num_videos": len(videos),
        "num_frames": frames,
        "ignored_pixels": ignored,
        "classes": [{"name": name, "pixels": int(p), "videos": int(v)}
                    for name, p, v in zip(table.names, pixels, in_videos)],
    }


def class_prior(pixels: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Laplace-smoothed class prior (sums to 1, strictly positive)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if alpha <= 0:
        raise ValueError("the smoothing alpha must be positive to keep log(prior) finite")
    return (pixels + alpha) / (pixels.sum() + alpha * len(pixels))


def write_stats(stats: dict, out: str | Path, *, alpha: float = 1.0) -> dict[str, Path]:
    """Write ``class_stats.json``, ``class_prior.json`` and ``class_stats.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c["name"] for c in stats["classes"]]
    pixels = np.array([c["pixels"] for c in stats["classes"]])
    videos = np.array([c["videos"] for c in stats["classes"]])
    prior = class_prior(pixels, alpha)
    paths = {"stats": out / "class_stats.json", "prior": out / "class_prior.json",
             "chart": out / "class_stats.png"}
    paths["stats"].write_text(json.dumps(stats, indent=1))
    paths["prior"].write_text(json.dumps({
        "names": names, "prior": prior.tolist(), "split": stats["split"],
        "smoothing": f"laplace: (pixels + {alpha}) / (total + {alpha} * num_classes)",
    }, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-pixels, kind="stable")
    width = max(6.0, 0.12 * len(names) + 2)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
    x = np.arange(len(names))
    ax1.bar(x, np.maximum(pixels[order], 1), color="tab:blue")
    ax1.set_yscale("log")
    ax1.set_ylabel("pixels (log)")
    ax1.set_title(f"class frequency, split '{stats['split']}': {stats['num_videos']} videos, "
                  f"{stats['num_frames']} frames")
    ax2.bar(x, np.maximum(videos[order], 1), color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_ylabel("videos containing the class (log)")
    ax2.set_xticks(x)
    ax2.set_xticklabels([names[i] for i in order], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["chart"], dpi=100)
    plt.close(fig)
    return paths


def load_prior(path: str | Path, class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Read ``class_prior.json`` and check it matches the dataset's class table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class prior {path} does not exist; create it with "
                                f"`vspw-ray data stats ROOT --split train --out DIR`")
    data = json.loads(path.read_text())
    if list(data.get("names", [])) != list(class_names):
        raise ValueError(f"class prior {path} was computed for other classes than the dataset's "
                         f"({len(data.get('names', []))} vs {len(class_names)}); recompute it")
    prior = np.asarray(data["prior"], dtype=np.float64)
    if not np.all(prior > 0):
        raise ValueError(f"class prior {path} holds non-positive values; recompute it")
    return prior

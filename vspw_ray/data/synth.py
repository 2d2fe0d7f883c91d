"""`vspw-ray data synth`: a deterministic VSPW-layout dataset of synthetic videos.

Each video has a textured background of two "stuff" classes split by a sloped horizon that pans
with the camera, and a few objects (ellipses and boxes) that move and grow over the frames.
Classes differ by texture (stripe angle and period, checkers, dots) more than by colour -- pairs
of classes share a base colour -- so a model must look at context, and larger crops, OHEM and
ensembles change the result. Class frequencies are long-tailed (Zipf), object borders are void
(255), some regions are "others" (0), and frames get per-video lighting, sensor noise and JPEG
compression. Test videos come with masks so a synthetic run can be scored end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vspw_ray.parallel import map_videos

__all__ = ["SynthSpec", "synthesize", "class_looks", "palette"]


@dataclass(frozen=True)
class SynthSpec:
    videos: int = 12
    frames: int = 10
    classes: int = 8
    height: int = 120
    width: int = 160
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.videos < 3:
            raise ValueError("--videos must be at least 3 (one each for train, val and test)")
        if self.frames < 1:
            raise ValueError("--frames must be at least 1")
        if not 2 <= self.classes <= 254:
            raise ValueError("--classes must be between 2 and 254")
        if self.height < 16 or self.width < 16:
            raise ValueError("--size must be at least 16x16")


def palette() -> list[int]:
    """A fixed 256-colour palette for the mask PNGs (VSPW masks are palette images)."""
    rng = np.random.default_rng(12345)
    pal = rng.integers(0, 256, size=(256, 3))
    pal[0] = (0, 0, 0)
    pal[255] = (255, 255, 255)
    return pal.astype(np.uint8).ravel().tolist()


def class_looks(classes: int, seed: int) -> list[dict]:
    """Colour and texture of each raw class id 1..C (index 0 is "others")."""
    rng = np.random.default_rng([seed, 7])
    n_colors = max(2, (classes + 1) // 2)
    colors = rng.uniform(50, 205, size=(n_colors, 3))
    looks = [{"color": np.array([128.0, 128.0, 128.0]), "kind": "noise", "period": 6.0, "angle": 0.0}]
    kinds = ("stripes", "checker", "dots")
    for c in range(1, classes + 1):
        looks.append({
            "color": colors[(c - 1) // 2] + rng.normal(0, 6, 3),  # pairs share a colour
            "kind": kinds[c % 3],
            "period": float(rng.uniform(3.0, 9.0)),
            "angle": float(rng.uniform(0, np.pi)),
        })
    return looks


def _texture(look: dict, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p, a = look["period"], look["angle"]
    if look["kind"] == "stripes":
        t = np.sin(2 * np.pi * (u * np.cos(a) + v * np.sin(a)) / p)
    elif look["kind"] == "checker":
        t = np.sign(np.sin(np.pi * u / p) * np.sin(np.pi * v / p))
    elif look["kind"] == "dots":
        t = (np.sin(np.pi * u / p) * np.sin(np.pi * v / p)) ** 2 * 2 - 1
    else:
        t = rng.uniform(-1, 1, size=u.shape)
    return t


def _zipf_weights(classes: int) -> np.ndarray:
    w = 1.0 / np.arange(1, classes + 1) ** 1.1
    return w / w.sum()


def _draw_objects(rng, classes: int, weights, h: int, w: int) -> list[dict]:
    """1-4 moving, growing things (a tenth of them void), each an ellipse or a box."""
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        cls = 0 if rng.random() < 0.1 else int(rng.choice(classes, p=weights)) + 1
        objects.append({
            "cls": cls,
            "shape": "ellipse" if rng.random() < 0.5 else "box",
            "center": rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w]),
            "velocity": rng.uniform(-0.03, 0.03, size=2) * np.array([h, w]),
            "radius": rng.uniform(0.08, 0.22, size=2) * np.array([h, w]),
            "growth": rng.uniform(0.98, 1.03),
        })
    return objects


def _paint_object(image, obj: dict, t: int, looks, xx, yy, rng):
    """Paint ``obj`` at frame ``t`` into ``image``; its ``(inside, border)`` pixel masks."""
    cy, cx = obj["center"] + obj["velocity"] * t
    ry, rx = obj["radius"] * obj["growth"] ** t
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if obj["shape"] == "ellipse":
        r = np.sqrt(dy**2 + dx**2)
    else:
        r = np.maximum(np.abs(dy), np.abs(dx))
    inside, border = r <= 1.0, (r > 1.0) & (r <= 1.0 + 2.0 / min(ry, rx))
    tex = _texture(looks[obj["cls"]], xx - cx, yy - cy, rng)
    image[inside] = looks[obj["cls"]]["color"] * (1 + 0.35 * tex[inside, None])
    return inside, border


def _render_video(spec: dict, index: int, name: str, out: str) -> int:
    spec = SynthSpec(**spec)
    out = Path(out)
    rng = np.random.default_rng([spec.seed, index])
    looks = class_looks(spec.classes, spec.seed)
    weights = _zipf_weights(spec.classes)
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # background: two stuff classes (the frequent ones) split by a sloped horizon
    top, bottom = rng.choice(spec.classes, size=2, replace=False, p=weights) + 1
    horizon, slope = rng.uniform(0.3, 0.6) * h, rng.uniform(-0.3, 0.3) * h / w
    pan = rng.uniform(-1.5, 1.5, size=2)
    objects = _draw_objects(rng, spec.classes, weights, h, w)
    light = rng.uniform(0.7, 1.3)

    (out / "data" / name / "origin").mkdir(parents=True, exist_ok=True)
    (out / "data" / name / "mask").mkdir(parents=True, exist_ok=True)
    pal = palette()
    for t in range(spec.frames):
        ox, oy = pan * t
        u, v = xx + ox, yy + oy
        label = np.where(yy < horizon + slope * (xx - w / 2) + oy * 0.2, top, bottom).astype(np.uint8)
        image = np.zeros((h, w, 3), np.float32)
        for cls in (top, bottom):
            tex = _texture(looks[cls], u, v, rng)
            sel = label == cls
            image[sel] = looks[cls]["color"] * (1 + 0.35 * tex[sel, None])
        void = np.zeros((h, w), bool)
        for obj in objects:
            inside, border = _paint_object(image, obj, t, looks, xx, yy, rng)
            label[inside] = obj["cls"]
            void = (void & ~inside) | border
        label[void] = 255
        image = image * light + rng.normal(0, 10, size=image.shape)
        image = np.clip(image, 0, 255).astype(np.uint8)
        stem = f"{t:08d}"
        Image.fromarray(image).save(out / "data" / name / "origin" / f"{stem}.jpg", quality=90)
        mask = Image.frombytes("P", (w, h), label.tobytes())
        mask.putpalette(pal)
        mask.save(out / "data" / name / "mask" / f"{stem}.png")
    return index


def synthesize(out: str | Path, spec: SynthSpec, *, processes: int | None = None,
               progress=None) -> dict[str, list[str]]:
    """Write the dataset under ``out`` and return ``{split: [video, ...]}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"synth_{spec.seed:03d}_{i:05d}" for i in range(spec.videos)]
    n_val = max(1, round(spec.videos * spec.val_fraction))
    n_test = max(1, round(spec.videos * spec.test_fraction))
    n_train = spec.videos - n_val - n_test
    if n_train < 1:
        raise ValueError(f"--videos {spec.videos} leaves no training video after val and test")
    splits = {"train": names[:n_train], "val": names[n_train : n_train + n_val],
              "test": names[n_train + n_val :]}
    table = {"others": 0, **{f"class_{c:03d}": c for c in range(1, spec.classes + 1)}}
    (out / "label_num_dic_final.json").write_text(json.dumps(table, indent=1))
    for split, videos in splits.items():
        (out / f"{split}.txt").write_text("".join(f"{v}\n" for v in videos))
    jobs = [(spec.__dict__, i, name, str(out)) for i, name in enumerate(names)]
    for _ in map_videos(_render_video, jobs, processes=processes, progress=progress):
        pass
    return splits

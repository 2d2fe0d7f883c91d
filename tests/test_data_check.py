import shutil
import subprocess
import sys

import pytest
from PIL import Image

from vspw_ray.data import list_frames, read_split
from vspw_ray.data.check import check_dataset


def _vspw(*args):
    return subprocess.run([sys.executable, "-m", "vspw_ray", *args], capture_output=True, text=True)


def test_camvid_is_clean(camvid_root):
    result = _vspw("data", "check", str(camvid_root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout


@pytest.fixture(params=["synth", "camvid"])
def broken_copy(request, tmp_path):
    """A private copy of the synthetic set or of ../shared/data/camvid to break on purpose."""
    src = request.getfixturevalue("synth_root" if request.param == "synth" else "camvid_root")
    dst = tmp_path / request.param
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # shared/ is read-only in CI
    return dst


def test_every_problem_is_named(broken_copy):
    root = broken_copy
    train = read_split(root, "train")
    v_trunc, v_label, v_missing, v_size = train[:4]
    f_trunc, f_label, f_missing, f_size = (list_frames(root, v)[1] for v in train[:4])
    # truncated JPEG
    jpg = f_trunc.image
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    # a mask containing label 200
    im = Image.open(f_label.mask)
    im.putpixel((3, 3), 200)
    im.save(f_label.mask)
    # a missing mask
    f_missing.mask.unlink()
    # a mask of the wrong size
    Image.open(f_size.mask).resize((40, 32), Image.NEAREST).save(f_size.mask)
    # a split naming a missing video
    with open(root / "val.txt", "a") as f:
        f.write("no_such_video\n")

    problems = [str(p) for p in check_dataset(root)]
    assert any(p.startswith(f"{v_trunc}/{f_trunc.name}:") and "cannot be decoded" in p for p in problems)
    assert any(p.startswith(f"{v_label}/{f_label.name}:") and "[200]" in p for p in problems)
    assert any(p.startswith(f"{v_missing}/{f_missing.name}:") and "missing" in p for p in problems)
    assert any(p.startswith(f"{v_size}/{f_size.name}:") and "40x32" in p for p in problems)
    assert any(p.startswith("no_such_video:") and "val.txt" in p for p in problems)
    assert len(problems) == 5, problems

    result = _vspw("data", "check", str(root), "--split", "train")
    assert result.returncode == 1
    assert f"ERROR {v_trunc}/{f_trunc.name}" in result.stdout and "no_such_video" not in result.stdout


def test_empty_video_and_orphan_mask(synth_copy):
    root = synth_copy
    video = read_split(root, "val")[0]
    other = read_split(root, "train")[0]
    for p in (root / "data" / video / "origin").iterdir():
        p.unlink()
    (root / "data" / other / "origin" / "00000004.jpg").unlink()
    problems = [str(p) for p in check_dataset(root, ["train", "val"])]
    assert f"{video}: video is empty" in " ".join(problems)
    assert any(p.startswith(f"{other}/00000004:") and "has no frame" in p for p in problems)

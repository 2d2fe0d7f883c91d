import subprocess
import sys

from PIL import Image

from vspw_ray.data import read_split
from vspw_ray.data.check import check_dataset


def _vspw(*args):
    return subprocess.run([sys.executable, "-m", "vspw_ray", *args], capture_output=True, text=True)


def test_camvid_is_clean(camvid_root):
    result = _vspw("data", "check", str(camvid_root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout


def test_every_problem_is_named(synth_copy):
    root = synth_copy
    train = read_split(root, "train")
    v_trunc, v_label, v_missing, v_size = train[:4]
    # truncated JPEG
    jpg = root / "data" / v_trunc / "origin" / "00000003.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    # a mask containing label 200
    png = root / "data" / v_label / "mask" / "00000005.png"
    im = Image.open(png)
    im.putpixel((3, 3), 200)
    im.save(png)
    # a missing mask
    (root / "data" / v_missing / "mask" / "00000007.png").unlink()
    # a mask of the wrong size
    png = root / "data" / v_size / "mask" / "00000002.png"
    Image.open(png).resize((40, 32)).save(png)
    # a split naming a missing video
    with open(root / "val.txt", "a") as f:
        f.write("no_such_video\n")

    problems = [str(p) for p in check_dataset(root)]
    assert any(p.startswith(f"{v_trunc}/00000003:") and "cannot be decoded" in p for p in problems)
    assert any(p.startswith(f"{v_label}/00000005:") and "[200]" in p for p in problems)
    assert any(p.startswith(f"{v_missing}/00000007:") and "missing" in p for p in problems)
    assert any(p.startswith(f"{v_size}/00000002:") and "40x32" in p for p in problems)
    assert any(p.startswith("no_such_video:") and "val.txt" in p for p in problems)
    assert len(problems) == 5, problems

    result = _vspw("data", "check", str(root), "--split", "train")
    assert result.returncode == 1
    assert f"ERROR {v_trunc}/00000003" in result.stdout and "no_such_video" not in result.stdout


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

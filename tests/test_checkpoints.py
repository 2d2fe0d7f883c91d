"""Checkpoint folders: the completion record, lookups that skip incomplete folders, clean-up
(local disk and a ``file://`` URI through pyarrow; no Ray)."""

import json
import os
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from vspw_ray.checkpoints import (
    CHECKPOINT_FILE,
    COMPLETE_FILE,
    METRICS_FILE,
    VAL_CONFUSIONS_FILE,
    best_checkpoint,
    is_complete,
    list_checkpoints,
    read_state,
    read_summary,
    read_val_confusions,
    remove_incomplete,
    write_checkpoint,
)


def _state(iteration: int, miou: float) -> dict:
    torch.manual_seed(iteration)
    return {"model": {"w": torch.randn(64, 64)}, "iteration": iteration, "variant_id": "v1",
            "metrics": {"val_A/miou": miou}}


def _truncated(folder: Path, keep_record: bool = True) -> Path:
    """A checkpoint whose checkpoint.pt was cut off half-way, as a lost node leaves it; its
    completion record (copied first) still gives the full size, and its metrics look best."""
    write_checkpoint(str(folder), _state(99, miou=0.99))
    data = (folder / CHECKPOINT_FILE).read_bytes()
    (folder / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    if not keep_record:
        (folder / COMPLETE_FILE).unlink()
    return folder


class _FailsHalfWay:
    """Stops torch.save part-way, as a full disk or a killed process would."""

    def __reduce__(self):
        raise RuntimeError("disk full")


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run folder with two complete checkpoints (iterations 4 and 8, the first scoring
    best), one truncated, one without a completion record, and one unrelated folder."""
    write_checkpoint(str(tmp_path / "checkpoint_1"), _state(4, miou=0.6))
    write_checkpoint(str(tmp_path / "checkpoint_2"), _state(8, miou=0.5))
    _truncated(tmp_path / "checkpoint_3")
    _truncated(tmp_path / "checkpoint_4", keep_record=False)
    (tmp_path / "other").mkdir()
    return tmp_path


def test_written_checkpoint_is_complete_and_reads_back(tmp_path):
    state = _state(4, miou=0.6)
    path = write_checkpoint(str(tmp_path / "checkpoint_1"), state)
    assert path == f"{tmp_path}/checkpoint_1/{CHECKPOINT_FILE}"
    assert is_complete(str(tmp_path / "checkpoint_1"), verify=True)
    record = json.loads((tmp_path / "checkpoint_1" / COMPLETE_FILE).read_text())
    assert record["files"][CHECKPOINT_FILE]["size"] == os.path.getsize(path)
    assert torch.equal(read_state(path)["model"]["w"], state["model"]["w"])
    assert torch.equal(read_state(str(tmp_path / "checkpoint_1"))["model"]["w"], state["model"]["w"])
    assert read_summary(path) == {"variant_id": "v1", "iteration": 4, "kind": "train",
                                  "metrics": {"val_A/miou": 0.6}, "parent_variant_id": None,
                                  "family": None, "train_split": None, "fold_seed": None,
                                  "data_fingerprint": None, "init_data_fingerprint": None}
    described = _state(4, miou=0.6)
    described["config"] = {"model": {"family": "maskformer"},
                           "data": {"train_split": "train_a", "fold_seed": 3}}
    path = write_checkpoint(str(tmp_path / "checkpoint_2"), described)
    summary = read_summary(path)  # what the score store's manifest takes over
    assert (summary["family"], summary["train_split"], summary["fold_seed"]) == (
        "maskformer", "train_a", 3)


def test_truncated_checkpoint_with_a_record_of_another_size_is_incomplete(tmp_path):
    folder = _truncated(tmp_path / "checkpoint_1")
    assert (folder / COMPLETE_FILE).is_file() and (folder / METRICS_FILE).is_file()
    assert not is_complete(str(folder))
    for read in (read_state, read_summary):
        with pytest.raises(ValueError, match=rf"{folder} is incomplete \({CHECKPOINT_FILE} has "
                                             rf"\d+ of its \d+ bytes\)"):
            read(str(folder / CHECKPOINT_FILE))


def test_same_size_but_other_bytes_fails_only_the_sha256_check(tmp_path):
    folder = tmp_path / "checkpoint_1"
    write_checkpoint(str(folder), _state(4, miou=0.6))
    data = bytearray((folder / CHECKPOINT_FILE).read_bytes())
    data[-100] ^= 0xFF
    (folder / CHECKPOINT_FILE).write_bytes(bytes(data))
    assert is_complete(str(folder)) and not is_complete(str(folder), verify=True)


def test_a_rewrite_that_fails_leaves_the_folder_incomplete(tmp_path):
    folder = tmp_path / "checkpoint_1"
    write_checkpoint(str(folder), _state(4, miou=0.6))
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(str(folder), {"iteration": 8, "model": _FailsHalfWay()})
    assert not is_complete(str(folder))  # the old record went before the new file was written


def test_lookups_return_only_complete_checkpoints(run_dir):
    listed = list_checkpoints(str(run_dir))
    assert [(Path(f).name, s["iteration"]) for f, s in listed] == [("checkpoint_1", 4),
                                                                   ("checkpoint_2", 8)]
    # the incomplete folders' metrics.json claim 0.99, but only complete folders compete
    assert best_checkpoint(str(run_dir)) == str(run_dir / "checkpoint_1")
    assert best_checkpoint(str(run_dir), metric="missing") == str(run_dir / "checkpoint_2")
    assert list_checkpoints(str(run_dir / "absent")) == []


def test_best_checkpoint_of_a_run_with_only_incomplete_folders_names_the_run(tmp_path):
    _truncated(tmp_path / "checkpoint_1", keep_record=False)
    with pytest.raises(FileNotFoundError, match=f"no complete training checkpoint under {tmp_path}"):
        best_checkpoint(str(tmp_path))


def test_folder_without_record_reads_as_incomplete_not_as_a_torch_error(run_dir):
    folder = run_dir / "checkpoint_4"
    assert not is_complete(str(folder))
    with pytest.raises(ValueError, match=f"{folder} is incomplete .*no readable completion "
                                         f"record {COMPLETE_FILE}"):
        read_summary(str(folder / CHECKPOINT_FILE))
    with pytest.raises(ValueError, match=f"{folder} is incomplete"):
        read_state(str(folder))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_summary(str(run_dir / "checkpoint_9"))


def test_remove_incomplete_deletes_exactly_the_incomplete_unkept_folders(run_dir):
    _truncated(run_dir / "checkpoint_5")
    removed = remove_incomplete(str(run_dir), keep={str(run_dir / "checkpoint_5")})
    assert sorted(Path(p).name for p in removed) == ["checkpoint_3", "checkpoint_4"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_1", "checkpoint_2",
                                                         "checkpoint_5", "other"]
    assert remove_incomplete(str(run_dir), keep={"checkpoint_5"}) == []  # kept by bare name
    assert [Path(p).name for p in remove_incomplete(str(run_dir), keep=set())] == ["checkpoint_5"]


def test_remove_incomplete_inside_a_given_filesystem(run_dir):
    """As Ray Train gives its storage: a pyarrow filesystem and a path without URI scheme."""
    removed = remove_incomplete(str(run_dir), {"checkpoint_4"}, fs=pyarrow.fs.LocalFileSystem())
    assert removed == [str(run_dir / "checkpoint_3")]
    assert (run_dir / "checkpoint_4").is_dir()


def test_uri_run_folders_list_and_read_through_pyarrow(run_dir):
    uri = f"file://{run_dir}"
    listed = [folder for folder, _ in list_checkpoints(uri)]
    assert listed == [f"{uri}/checkpoint_1", f"{uri}/checkpoint_2"]
    assert read_state(listed[1])["iteration"] == 8
    assert read_summary(f"{listed[0]}/{CHECKPOINT_FILE}")["iteration"] == 4
    assert is_complete(listed[0], verify=True) and not is_complete(f"{uri}/checkpoint_3")
    with pytest.raises(ValueError, match=f"{uri}/checkpoint_3 is incomplete"):
        read_state(f"{uri}/checkpoint_3")
    assert remove_incomplete(uri, set()) == [f"{uri}/checkpoint_3", f"{uri}/checkpoint_4"]


def test_a_bare_state_dict_file_is_read_as_it_is(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    assert torch.equal(read_state(str(tmp_path / "weights.pt"))["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state(str(tmp_path / "missing.pt"))


def test_per_video_confusions_travel_with_the_checkpoint_and_count_for_completeness(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    matrices = {f"video_{i}": rng.integers(0, 10**9, (124, 124)) for i in range(3)}
    folder = tmp_path / "checkpoint_1"
    write_checkpoint(str(folder), _state(4, miou=0.6), val_confusions=matrices)
    back = read_val_confusions(f"file://{folder}")  # a URI as on shared storage: same files
    assert back.keys() == matrices.keys()
    assert all(np.array_equal(back[v], m) and back[v].dtype == np.int64
               for v, m in matrices.items())
    record = json.loads((folder / COMPLETE_FILE).read_text())["files"]
    assert VAL_CONFUSIONS_FILE in record
    data = (folder / VAL_CONFUSIONS_FILE).read_bytes()
    (folder / VAL_CONFUSIONS_FILE).write_bytes(data[: len(data) // 2])
    assert not is_complete(str(folder))  # a cut-off matrix file makes the checkpoint incomplete
    with pytest.raises(ValueError, match="incomplete|missing|bytes"):
        read_val_confusions(str(folder))
    plain = tmp_path / "checkpoint_2"
    write_checkpoint(str(plain), _state(8, miou=0.5))
    with pytest.raises(FileNotFoundError, match=f"{plain} holds no {VAL_CONFUSIONS_FILE}"):
        read_val_confusions(str(plain))

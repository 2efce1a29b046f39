"""The head checkpoint store and its pyarrow filesystem, with the store in-process (no Ray)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

from dgpt.exceptions import CheckpointStoreError, TrainError
from dgpt.train.checkpoint import read_checkpoint, write_checkpoint
from dgpt.train.storage import HeadStore, HeadStoreHandler, as_pyarrow_filesystem, head_filesystem


@pytest.fixture
def store(tmp_path: Path) -> HeadStore:
    return HeadStore(root=tmp_path / "store")


@pytest.fixture
def fs(store: HeadStore) -> pafs.FileSystem:
    return pafs.PyFileSystem(HeadStoreHandler(backend=store))


def test_files_round_trip_through_pyarrow(fs: pafs.FileSystem, store: HeadStore) -> None:
    blob = os.urandom(3 * 2**20 + 17)
    fs.create_dir("runs/a", recursive=True)
    with fs.open_output_stream("runs/a/big.bin") as out:
        for i in range(0, len(blob), 65536):
            out.write(blob[i:i + 65536])
    info = fs.get_file_info("runs/a/big.bin")
    assert info.type == pafs.FileType.File and info.size == len(blob)
    with fs.open_input_file("runs/a/big.bin") as f:
        f.seek(1000)
        assert f.read(10) == blob[1000:1010]
        f.seek(0)
        assert f.read() == blob
    assert (store.root / "runs/a/big.bin").read_bytes() == blob


def test_a_file_is_invisible_until_its_writer_closes_it(fs: pafs.FileSystem, store: HeadStore) -> None:
    out = fs.open_output_stream("runs/x/model.pt")
    out.write(b"half of it")
    assert fs.get_file_info("runs/x/model.pt").type == pafs.FileType.NotFound
    listed = fs.get_file_info(pafs.FileSelector("runs", recursive=True))
    assert [i.path for i in listed] == ["runs/x"], "part files are never listed"
    out.close()
    assert fs.get_file_info("runs/x/model.pt").size == len(b"half of it")
    assert not list(store.root.rglob(".dgpt-part-*"))


def test_a_restarted_store_drops_unfinished_writes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = HeadStore(root=root)
    upload = first.begin_write("runs/r/model.pt")
    first.write_chunk(upload, b"partial")
    assert list(root.rglob(".dgpt-part-*"))
    second = HeadStore(root=root)  # the actor restarted: the writer's upload is gone
    assert not list(root.rglob(".dgpt-part-*"))
    assert second.info(["runs/r/model.pt"])[0]["type"] == "missing"
    with pytest.raises(CheckpointStoreError, match="no write in progress"):
        second.write_chunk(upload, b"more")


@pytest.mark.parametrize("path", ["../outside", "runs/../../etc/passwd", "runs/a/..", "runs/.dgpt-part-x", "a\x00b"])
def test_paths_cannot_leave_the_root(fs: pafs.FileSystem, path: str) -> None:
    with pytest.raises(CheckpointStoreError):
        fs.get_file_info(path)


def test_symlinks_out_of_the_root_are_refused(fs: pafs.FileSystem, store: HeadStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "api_key").write_text("dgpt_api_x")
    (store.root / "runs").mkdir(parents=True)
    os.symlink(secret, store.root / "runs" / "link")
    with pytest.raises(CheckpointStoreError, match="outside"):
        with fs.open_input_stream("runs/link/api_key") as f:
            f.read()


def test_copy_files_and_deletes(fs: pafs.FileSystem, tmp_path: Path) -> None:
    src = tmp_path / "local"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    pafs.copy_files(str(src), "runs/copy", destination_filesystem=fs)
    paths = sorted(i.path for i in fs.get_file_info(pafs.FileSelector("runs/copy", recursive=True)))
    assert paths == ["runs/copy/a.txt", "runs/copy/sub", "runs/copy/sub/b.txt"]
    fs.copy_file("runs/copy/a.txt", "runs/copy/c.txt")
    fs.move("runs/copy/c.txt", "runs/moved/c.txt")
    assert fs.get_file_info("runs/moved/c.txt").size == 1
    fs.delete_file("runs/moved/c.txt")
    fs.delete_dir_contents("runs/copy")
    assert fs.get_file_info(pafs.FileSelector("runs/copy")) == []
    fs.delete_dir("runs/copy")
    assert fs.get_file_info("runs/copy").type == pafs.FileType.NotFound
    with pytest.raises(FileNotFoundError):
        fs.get_file_info(pafs.FileSelector("runs/nowhere"))
    assert fs.get_file_info(pafs.FileSelector("runs/nowhere", allow_not_found=True)) == []


def test_checkpoints_commit_on_the_store(fs: pafs.FileSystem) -> None:
    write_checkpoint(fs, "runs/r/step-00000010-abcdef01", {"model.pt": b"w" * 100}, 10, "periodic")
    assert read_checkpoint(fs, "runs/r/step-00000010-abcdef01").files["model.pt"] == b"w" * 100


def test_the_filesystem_pickles_by_name_for_workers() -> None:
    fs = head_filesystem()
    again = pickle.loads(pickle.dumps(fs))
    assert again.type_name == "py::dgpt-head-store"
    assert again.handler == fs.handler
    with pytest.raises(TrainError, match="local backend"):
        pickle.dumps(HeadStoreHandler(backend=object()))  # type: ignore[arg-type]


def test_any_pyarrow_or_fsspec_filesystem_is_accepted() -> None:
    local = pafs.LocalFileSystem()
    assert as_pyarrow_filesystem(local) is local
    wrapped = as_pyarrow_filesystem(fsspec.filesystem("memory"))
    assert isinstance(wrapped, pafs.PyFileSystem)
    write_checkpoint(wrapped, "/ckpt/step-00000001-abcdef01", {"m": b"1"}, 1, "final")
    assert read_checkpoint(wrapped, "/ckpt/step-00000001-abcdef01").step == 1
    with pytest.raises(TrainError, match="storage_filesystem must be"):
        as_pyarrow_filesystem("/tmp/not-a-filesystem")


# ---------------------------------------------------------------- which store (pure)

SMALL_WARNING = "profile rs-2-of-4 survives only 2 lost donor(s) per segment: ..."


def test_auto_takes_the_donor_tier_only_once_its_profile_is_durable() -> None:
    from dgpt.train.storage import choose_checkpoint_store

    durable = choose_checkpoint_store("auto", "rs-2-of-6", None)
    assert durable.store == "donors" and "rs-2-of-6" in durable.reason
    small = choose_checkpoint_store("auto", "rs-2-of-4", SMALL_WARNING)
    assert small.store == "head" and "rs-2-of-4 survives only 2" in small.reason
    none = choose_checkpoint_store("auto", None, "need 4 donors of distinct owners, have 1")
    assert none.store == "head" and "have 1" in none.reason


def test_forced_stores_are_taken_and_donors_without_a_tier_is_refused_with_the_cause() -> None:
    from dgpt.train.storage import choose_checkpoint_store

    assert choose_checkpoint_store("head", "rs-2-of-6", None).store == "head"
    forced = choose_checkpoint_store("donors", "rs-2-of-4", SMALL_WARNING)
    assert forced.store == "donors" and "survives only 2" in forced.reason, "the warning is passed on"
    with pytest.raises(CheckpointStoreError, match="cannot take a write: need 4 donors") as err:
        choose_checkpoint_store("donors", None, "need 4 donors of distinct owners, have 1")
    assert "checkpoints='auto'" in (err.value.hint or "")
    with pytest.raises(CheckpointStoreError, match="checkpoints must be"):
        choose_checkpoint_store("somewhere", "rs-2-of-6", None)


def test_a_bad_checkpoints_value_is_named_in_the_spec_error() -> None:
    from dgpt.train.plan import parse_spec

    with pytest.raises(TrainError, match=r"checkpoints='disk'"):
        parse_spec(name="r", workers=2, checkpoints="disk")
    assert parse_spec(name="r", workers=2, checkpoints="donors").checkpoints == "donors"


def test_the_head_setting_is_validated_by_name() -> None:
    from dgpt.config import load_settings
    from dgpt.exceptions import ConfigError

    with pytest.raises(ConfigError, match="DGPT_TRAIN_CHECKPOINTS=.disk.: Input should be .auto., .donors. or .head."):
        load_settings({}, env={"DGPT_TRAIN_CHECKPOINTS": "disk"})
    assert load_settings({}, env={}).train_checkpoints == "auto"

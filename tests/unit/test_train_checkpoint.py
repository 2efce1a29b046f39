"""Checkpoint names, the manifest, and the commit protocol, on a real local pyarrow filesystem."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgpt.exceptions import CheckpointCorrupt, CheckpointStoreError
from dgpt.train.checkpoint import (
    MANIFEST_NAME,
    build_manifest,
    checkpoint_dir_name,
    parse_checkpoint_dir_name,
    parse_manifest,
    read_checkpoint,
    write_checkpoint,
)


@given(st.integers(0, 10**8 - 1), st.text("0123456789abcdef", min_size=8, max_size=32))
def test_dir_names_round_trip(step: int, token: str) -> None:
    name = checkpoint_dir_name(step, token)
    assert parse_checkpoint_dir_name(name) == (step, token)


def test_dir_names_sort_by_step_and_refuse_bad_input() -> None:
    names = [checkpoint_dir_name(s, "ab" * 4) for s in (9, 100, 10)]
    assert sorted(names) == [checkpoint_dir_name(s, "ab" * 4) for s in (9, 10, 100)]
    for bad in (-1, 10**8):
        with pytest.raises(ValueError, match="step"):
            checkpoint_dir_name(bad, "abcdef01")
    with pytest.raises(ValueError, match="token"):
        checkpoint_dir_name(1, "XYZ")
    assert parse_checkpoint_dir_name("checkpoint_2026-01-01") is None
    assert parse_checkpoint_dir_name("step-00000001-abc") is None


def test_manifest_refuses_bad_names_and_empty_checkpoints() -> None:
    with pytest.raises(CheckpointCorrupt, match="files"):
        build_manifest(1, "periodic", {}, 1.0)
    for bad in ("../x", "a/b", ".hidden", MANIFEST_NAME):
        with pytest.raises(CheckpointCorrupt, match="file names"):
            build_manifest(1, "periodic", {bad: b"x"}, 1.0)
    with pytest.raises(CheckpointCorrupt, match="not a valid manifest"):
        parse_manifest(b"{not json")
    with pytest.raises(CheckpointCorrupt, match="step"):
        parse_manifest(json.dumps({"format": 1, "step": -3, "kind": "jit", "created_at": 1.0,
                                   "files": {"a": {"size_bytes": 1, "sha256": "0" * 64}}}).encode())


def _fs(tmp_path: Path) -> tuple[pafs.FileSystem, str]:
    return pafs.LocalFileSystem(), str(tmp_path / "run")


def test_written_checkpoint_reads_back_verified(tmp_path: Path) -> None:
    fs, run = _fs(tmp_path)
    files = {"model.pt": b"m" * 1000, "optimizer.pt": bytes(range(256)) * 40}
    path = f"{run}/{checkpoint_dir_name(120, 'deadbeef')}"
    manifest = write_checkpoint(fs, path, files, 120, "jit", now_s=5.0)
    assert manifest.files["model.pt"].size_bytes == 1000
    loaded = read_checkpoint(fs, path)
    assert loaded.step == 120 and loaded.manifest.kind == "jit" and dict(loaded.files) == files
    # The manifest is the last file written: its mtime is not older than any data file.
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(path).iterdir()}
    assert mtimes[MANIFEST_NAME] >= max(mtimes[n] for n in files)


def test_a_writer_stopped_before_the_manifest_leaves_no_checkpoint(tmp_path: Path) -> None:
    fs, run = _fs(tmp_path)
    path = f"{run}/{checkpoint_dir_name(7, 'cafebabe')}"

    class Killed(Exception):
        pass

    def die_after_first(name: str) -> None:
        raise Killed(name)

    with pytest.raises(Killed):
        write_checkpoint(fs, path, {"a.pt": b"aaa", "b.pt": b"bbb"}, 7, "periodic", between_files=die_after_first)
    assert sorted(p.name for p in Path(path).iterdir()) == ["a.pt"]
    with pytest.raises(CheckpointCorrupt, match="never committed"):
        read_checkpoint(fs, path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damage_after_commit_is_detected(tmp_path: Path, damage: str) -> None:
    fs, run = _fs(tmp_path)
    path = f"{run}/{checkpoint_dir_name(3, 'abcdef01')}"
    write_checkpoint(fs, path, {"model.pt": b"0123456789" * 100}, 3, "periodic")
    target = Path(path) / "model.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:500])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(CheckpointCorrupt, match="model.pt"):
        read_checkpoint(fs, path)


def test_write_failure_is_a_storage_error(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointStoreError, match="writing checkpoint"):
        write_checkpoint(fs, f"{blocker}/{checkpoint_dir_name(1, 'abcdef01')}", {"a": b"1"}, 1, "periodic")

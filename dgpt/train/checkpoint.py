"""Checkpoint layout on storage: folder names, the manifest that commits a checkpoint, verification.

A checkpoint is one folder in the run's storage folder, named ``step-<8 digits>-<token>``
(the step it resumes from, and a token unique to the writer, so a retried step never
writes into the leftovers of an earlier attempt). The commit protocol:

1. every file is written into the folder;
2. ``dgpt-manifest.json`` is written last: format, step, kind, and each file's size and
   SHA-256;
3. only then is the folder reported to Ray Train (``ray.train.report``), which registers
   it once every rank has reported.

A folder whose manifest is missing, unreadable, or disagrees with a file (absent, other
size, other hash) is not a checkpoint and is never loaded: a writer killed at any point
before step 2 finished leaves such a folder. The hashes also catch storage that lost or
truncated a file after the commit.

The pure parts (names, manifest model, comparison) need no Ray; reading and writing go
through any ``pyarrow.fs.FileSystem``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dgpt.exceptions import CheckpointCorrupt, CheckpointStoreError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

MANIFEST_NAME = "dgpt-manifest.json"
MANIFEST_FORMAT = 1
CheckpointKind = Literal["periodic", "jit", "final"]

_DIR_RE = re.compile(r"^step-(\d{8})-([0-9a-f]{8,32})$")
# File names inside a checkpoint: flat, portable, not hidden, never the manifest itself.
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Reads stream in chunks this big, so hashing a large file never holds it twice in memory.
_CHUNK_BYTES = 8 * 2**20


def checkpoint_dir_name(step: int, token: str) -> str:
    """The folder name of the checkpoint taken after ``step`` steps by writer ``token``.

    Raises:
        ValueError: ``step`` is negative or beyond 8 digits, or ``token`` is not 8-32 hex digits.
    """
    if not 0 <= step < 10**8:
        raise ValueError(f"checkpoint step must be 0..99999999, got {step!r}")
    name = f"step-{step:08d}-{token}"
    if not _DIR_RE.match(name):
        raise ValueError(f"checkpoint token must be 8-32 lowercase hex digits, got {token!r}")
    return name


def parse_checkpoint_dir_name(name: str) -> tuple[int, str] | None:
    """``(step, token)`` of a checkpoint folder name, or None for any other name."""
    m = _DIR_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


class ManifestEntry(BaseModel):
    """One file of a checkpoint: its size and SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What a committed checkpoint holds; written last, so its presence is the commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    step: int = Field(ge=0, lt=10**8)
    kind: CheckpointKind
    created_at: float = Field(gt=0)
    files: dict[str, ManifestEntry] = Field(min_length=1)

    @field_validator("files")
    @classmethod
    def _names(cls, files: dict[str, ManifestEntry]) -> dict[str, ManifestEntry]:
        bad = sorted(n for n in files if not _FILE_RE.match(n) or n == MANIFEST_NAME)
        if bad:
            raise ValueError(
                f"checkpoint file names must be flat, 1-128 of [A-Za-z0-9._-], not hidden and not "
                f"{MANIFEST_NAME!r}; got {bad}"
            )
        return files


def _entry(data: bytes) -> ManifestEntry:
    return ManifestEntry(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def build_manifest(step: int, kind: CheckpointKind, files: Mapping[str, bytes], now_s: float) -> Manifest:
    """The manifest for ``files`` (name -> contents) of the checkpoint after ``step`` steps.

    Raises:
        CheckpointCorrupt: no files, or a file name that is not allowed (the message names it).
    """
    try:
        return Manifest(step=step, kind=kind, created_at=now_s, files={n: _entry(d) for n, d in files.items()})
    except ValidationError as exc:
        raise CheckpointCorrupt(
            f"cannot build a checkpoint manifest: {_first_error(exc)}",
            hint="return a non-empty {name: bytes} mapping with flat file names like 'model.pt'",
        ) from None


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest in ``raw`` JSON.

    Raises:
        CheckpointCorrupt: the bytes are not a valid manifest.
    """
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise CheckpointCorrupt(f"{MANIFEST_NAME} is not a valid manifest: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    return f"{where}: {err['msg']}"


def mismatches(manifest: Manifest, stat: Callable[[str], ManifestEntry | None]) -> list[str]:
    """What is wrong with a checkpoint's files, compared with its manifest (empty: intact).

    Args:
        manifest: the committed manifest.
        stat: each file's actual size and hash, or None when the file is missing.
    """
    problems = []
    for name, want in sorted(manifest.files.items()):
        have = stat(name)
        if have is None:
            problems.append(f"{name} is missing")
        elif have.size_bytes != want.size_bytes:
            problems.append(f"{name} has {have.size_bytes} bytes, the manifest says {want.size_bytes}")
        elif have.sha256 != want.sha256:
            problems.append(f"{name} does not match its SHA-256 in the manifest")
    return problems


# ---------------------------------------------------------------- I/O over pyarrow filesystems


def _join(dir_path: str, name: str) -> str:
    return f"{dir_path.rstrip('/')}/{name}"


def _write(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _read(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as src:
        chunks = []
        while chunk := src.read(_CHUNK_BYTES):
            chunks.append(chunk)
    return b"".join(chunks)


def write_checkpoint(
    fs: pyarrow.fs.FileSystem,
    dir_path: str,
    files: Mapping[str, bytes],
    step: int,
    kind: CheckpointKind,
    *,
    now_s: float | None = None,
    between_files: Callable[[str], None] | None = None,
) -> Manifest:
    """Write ``files`` into ``dir_path`` on ``fs``, then the manifest that commits them.

    Args:
        fs: the run's storage filesystem.
        dir_path: the checkpoint folder (its name from :func:`checkpoint_dir_name`).
        files: file name -> contents.
        step: steps completed when the state was taken (where a resume starts).
        kind: why it was taken.
        now_s: the clock for ``created_at``.
        between_files: called with each file name after it is written, before the next
            (progress reporting; a slow writer in tests).

    Returns:
        The manifest written.

    Raises:
        CheckpointCorrupt: bad file names or no files.
        CheckpointStoreError: the filesystem refused a write.
    """
    manifest = build_manifest(step, kind, files, time.time() if now_s is None else now_s)
    try:
        fs.create_dir(dir_path, recursive=True)
        for name, data in files.items():
            _write(fs, _join(dir_path, name), data)
            if between_files is not None:
                between_files(name)
        _write(fs, _join(dir_path, MANIFEST_NAME), manifest.model_dump_json(indent=1).encode())
    except (OSError, CheckpointStoreError) as exc:
        raise CheckpointStoreError(f"writing checkpoint {dir_path} failed: {exc}",
                           hint="check that the run's storage is reachable and has room") from exc
    return manifest


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint: its manifest and every file's contents."""

    path: str
    manifest: Manifest
    files: Mapping[str, bytes]

    @property
    def step(self) -> int:
        return self.manifest.step


def read_checkpoint(fs: pyarrow.fs.FileSystem, dir_path: str) -> LoadedCheckpoint:
    """Read and verify the checkpoint in ``dir_path``.

    Raises:
        CheckpointCorrupt: no manifest (the writer never committed), or a file that
            disagrees with it; the message says which.
    """
    raw = _read(fs, _join(dir_path, MANIFEST_NAME))
    if raw is None:
        raise CheckpointCorrupt(f"checkpoint {dir_path} has no {MANIFEST_NAME}: it was never committed",
                                hint="resume from an earlier checkpoint")
    manifest = parse_manifest(raw)
    contents: dict[str, bytes] = {}

    def stat(name: str) -> ManifestEntry | None:
        data = _read(fs, _join(dir_path, name))
        if data is None:
            return None
        contents[name] = data
        return _entry(data)

    problems = mismatches(manifest, stat)
    if problems:
        raise CheckpointCorrupt(f"checkpoint {dir_path} is damaged: {'; '.join(problems)}",
                                hint="resume from an earlier checkpoint")
    return LoadedCheckpoint(path=dir_path, manifest=manifest, files=contents)


def manifest_text(manifest: Manifest) -> str:
    """A one-line summary for logs: step, kind, file count, total size."""
    total = sum(e.size_bytes for e in manifest.files.values())
    return json.dumps({"step": manifest.step, "kind": manifest.kind, "files": len(manifest.files), "bytes": total})

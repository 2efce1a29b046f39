"""Checkpoint storage that survives any donor leaving: the donor tier, or the head's disk through Ray.

A run that names no storage of its own gets one of two stores, picked by
:func:`choose_checkpoint_store`: the donor storage tier (``dgpt://``, erasure-coded over
donors of distinct owners) once its profile is durable against churn, else the head, the
one node that does not churn. :class:`HeadStore` is a detached, restartable actor pinned to the head
(started with the control plane) that keeps files under ``$DGPT_HOME/checkpoints``;
:func:`head_filesystem` is a ``pyarrow.fs.FileSystem`` over it that any Ray worker on any
host can use, since it travels over Ray's own (token-authenticated) connections: no shared
mount, no extra port. Ray Train takes it as ``RunConfig(storage_filesystem=...)``.

Guarantees, and why:
- a file becomes visible only whole: writes go to a hidden part file in the same folder
  and are renamed into place on close (one ``rename``, atomic on POSIX), so a writer that
  dies mid-file leaves nothing a reader can see;
- every path stays under the store's root: ``..``, absolute escapes and symlinks out of it
  are refused, so user work can never read the head's secrets through the store.

:func:`as_pyarrow_filesystem` accepts any pyarrow or fsspec filesystem; the donor tier's
``DonorFileSystem`` is one (its files, too, become visible only whole, at close).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pyarrow
import pyarrow.fs as pafs

from dgpt.config import Settings
from dgpt.exceptions import CheckpointStoreError, TrainError

HEAD_STORE_NAME = "checkpoint-store"
HEAD_STORE_NAMESPACE = "dgpt"
#: Folder under the store's root where Ray Train runs keep their experiment folders.
RUNS_PATH = "runs"
# Hidden part files of unfinished writes; never listed, never readable by their final name.
_PART_PREFIX = ".dgpt-part-"
# One round trip per chunk: large enough that a multi-GiB checkpoint is a few hundred calls,
# small enough that a write never holds much more than this in the actor's memory.
CHUNK_BYTES = 16 * 2**20


def store_root(settings: Settings) -> Path:
    """Where the head store keeps files: beside the head's state folder, never inside it."""
    return settings.home / "checkpoints"


class HeadStore:
    """Files under one root folder on the head; all paths are relative POSIX paths.

    Runs as a Ray actor (``start_head_store``); the methods are plain Python, so tests can
    use an instance directly.
    """

    def __init__(self, settings_json: str | None = None, root: Path | None = None) -> None:
        if root is None:
            if settings_json is None:
                raise TrainError("HeadStore needs settings or a root folder")
            root = store_root(Settings.model_validate_json(settings_json))
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._uploads: dict[str, tuple[Path, Path, Any]] = {}
        self._lock = threading.Lock()
        # Parts left by writes the previous incarnation never finished are garbage now.
        for part in self.root.rglob(f"{_PART_PREFIX}*"):
            part.unlink(missing_ok=True)

    def ping(self) -> str:
        return "ok"

    # paths ------------------------------------------------------------

    def _path(self, rel: str) -> Path:
        """The absolute path of ``rel`` inside the root; refuses anything that escapes it."""
        if not isinstance(rel, str) or "\x00" in rel:
            raise CheckpointStoreError(f"storage path must be a string without NUL bytes, got {rel!r}")
        parts = PurePosixPath(rel.strip("/")).parts
        if ".." in parts or any(p.startswith(_PART_PREFIX) for p in parts):
            raise CheckpointStoreError(f"storage path {rel!r} may not contain '..' or part-file names",
                               hint="use plain relative paths like 'runs/my-run/step-00000100-...'")
        path = self.root.joinpath(*parts)
        resolved = path.resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise CheckpointStoreError(f"storage path {rel!r} leads outside the checkpoint store",
                               hint="checkpoints can only be stored under the store's root")
        return path

    @staticmethod
    def _info(path: Path, rel: str) -> dict[str, Any]:
        try:
            st = path.stat()
        except FileNotFoundError:
            return {"path": rel, "type": "missing", "size": None, "mtime_ns": None}
        kind = "dir" if path.is_dir() else "file"
        return {"path": rel, "type": kind, "size": st.st_size if kind == "file" else None, "mtime_ns": st.st_mtime_ns}

    # queries ----------------------------------------------------------

    def info(self, paths: list[str]) -> list[dict[str, Any]]:
        """Type (``file``/``dir``/``missing``), size and mtime of each path."""
        return [self._info(self._path(p), p) for p in paths]

    def listdir(self, rel: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries under folder ``rel`` (None when it is not a folder); part files are hidden."""
        base = self._path(rel)
        if not base.is_dir():
            return None
        walker = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in sorted(walker):
            if any(part.startswith(_PART_PREFIX) for part in p.relative_to(base).parts):
                continue
            out.append(self._info(p, str(PurePosixPath(rel.strip("/")) / p.relative_to(base).as_posix())))
        return out

    def read(self, rel: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of file ``rel`` from ``offset``."""
        path = self._path(rel)
        if not path.is_file():
            raise FileNotFoundError(f"no file {rel!r} in the checkpoint store")
        with open(path, "rb") as f:
            f.seek(max(0, int(offset)))
            return f.read(max(0, min(int(length), CHUNK_BYTES)))

    # changes ----------------------------------------------------------

    def mkdir(self, rel: str) -> None:
        self._path(rel).mkdir(parents=True, exist_ok=True)

    def delete_file(self, rel: str) -> None:
        path = self._path(rel)
        if not path.is_file():
            raise FileNotFoundError(f"no file {rel!r} in the checkpoint store")
        path.unlink()

    def delete_dir(self, rel: str, contents_only: bool = False, missing_ok: bool = False) -> None:
        path = self._path(rel)
        if not path.is_dir():
            if missing_ok:
                return
            raise FileNotFoundError(f"no folder {rel!r} in the checkpoint store")
        if contents_only or path == self.root:
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            shutil.rmtree(path)

    def move(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        if not source.exists():
            raise FileNotFoundError(f"no {src!r} in the checkpoint store")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def copy(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        if not source.is_file():
            raise FileNotFoundError(f"no file {src!r} in the checkpoint store")
        upload = self.begin_write(dst)
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                self.write_chunk(upload, chunk)
        self.commit_write(upload)
        assert target.is_file()

    # writes: part file, then one rename ---------------------------------

    def begin_write(self, rel: str) -> str:
        """Start writing file ``rel``; returns the upload id for the chunks."""
        final = self._path(rel)
        if final == self.root or final.is_dir():
            raise CheckpointStoreError(f"cannot write a file at {rel!r}: it is a folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        upload_id = uuid.uuid4().hex
        part = final.with_name(f"{_PART_PREFIX}{upload_id}-{final.name}")
        handle = open(part, "wb")  # noqa: SIM115 - closed in commit/abort
        with self._lock:
            self._uploads[upload_id] = (part, final, handle)
        return upload_id

    def _upload(self, upload_id: str) -> tuple[Path, Path, Any]:
        with self._lock:
            entry = self._uploads.get(upload_id)
        if entry is None:
            raise CheckpointStoreError(f"no write in progress with id {upload_id!r} (the store restarted?)",
                               hint="write the file again")
        return entry

    def write_chunk(self, upload_id: str, data: bytes) -> int:
        _, _, handle = self._upload(upload_id)
        handle.write(data)
        return len(data)

    def commit_write(self, upload_id: str) -> None:
        """Make the file visible under its final name, whole (fsync, then rename)."""
        part, final, handle = self._upload(upload_id)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(part, final)
        with self._lock:
            self._uploads.pop(upload_id, None)

    def abort_write(self, upload_id: str) -> None:
        with self._lock:
            entry = self._uploads.pop(upload_id, None)
        if entry is not None:
            part, _, handle = entry
            handle.close()
            part.unlink(missing_ok=True)


# ---------------------------------------------------------------- which store


@dataclass(frozen=True)
class StoreChoice:
    """Where a run's checkpoints go (``donors``: the storage tier; ``head``: the head store) and why."""

    store: Literal["donors", "head"]
    reason: str


def choose_checkpoint_store(mode: str, profile: str | None, problem: str | None) -> StoreChoice:
    """Pick the checkpoint store for a run that names no storage of its own (pure).

    Args:
        mode: ``auto``, ``donors`` or ``head`` (the run's ``checkpoints``, else the head's
            ``train_checkpoints`` setting).
        profile: the erasure-coding profile a write to the donor tier would get now, or
            None when the tier cannot take a write (``problem`` says why).
        problem: the profile's durability warning, or why there is no profile.

    ``auto`` takes the donor tier only when its profile carries no durability warning: a
    checkpoint is the one thing a run cannot lose, and a small profile (a fabric of a few
    owners) survives fewer lost donors than the head's disk.

    Raises:
        CheckpointStoreError: ``donors`` was asked for and the tier cannot take a write.
    """
    if mode == "head":
        return StoreChoice("head", "the head's checkpoint store (checkpoints='head')")
    if mode == "donors":
        if profile is None:
            raise CheckpointStoreError(
                f"checkpoints='donors', but the donor storage tier cannot take a write: {problem}",
                hint="add donors (each owner counts once), or use checkpoints='auto' or 'head'")
        note = f"; {problem}" if problem else ""
        return StoreChoice("donors", f"the donor storage tier, {profile} (checkpoints='donors'){note}")
    if mode != "auto":
        raise CheckpointStoreError(f"checkpoints must be 'auto', 'donors' or 'head', got {mode!r}")
    if profile is not None and problem is None:
        return StoreChoice("donors", f"the donor storage tier, {profile}: durable against churn (checkpoints='auto')")
    why = problem or "the donor tier cannot take a write"
    return StoreChoice("head", f"the head's checkpoint store, as the donor tier is not durable yet: {why} "
                               "(checkpoints='auto')")


# ---------------------------------------------------------------- pyarrow filesystem


class _RemoteReader(io.RawIOBase):
    """A seekable read-only file over :meth:`HeadStore.read`."""

    def __init__(self, call: Callable[..., Any], path: str, size: int) -> None:
        super().__init__()
        self._call, self._path, self._size, self._pos = call, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def size(self) -> int:
        return self._size

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._call("read", self._path, self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _RemoteWriter(io.RawIOBase):
    """A write-only file that streams chunks to the store and commits on close."""

    def __init__(self, call: Callable[..., Any], path: str) -> None:
        super().__init__()
        self._call = call
        self._upload = call("begin_write", path)
        self._buffer = bytearray()
        self._written = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written + len(self._buffer)

    def write(self, data: Any) -> int:
        self._buffer += bytes(data)
        if len(self._buffer) >= CHUNK_BYTES:
            self._flush_chunk()
        return len(data)

    def _flush_chunk(self) -> None:
        if self._buffer:
            self._call("write_chunk", self._upload, bytes(self._buffer))
            self._written += len(self._buffer)
            self._buffer.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush_chunk()
            self._call("commit_write", self._upload)
        except BaseException:
            self._call("abort_write", self._upload)
            raise
        finally:
            super().close()


class HeadStoreHandler(pafs.FileSystemHandler):  # type: ignore[misc]
    """``pyarrow.fs.FileSystemHandler`` for :class:`HeadStore`; wrap it in ``pyarrow.fs.PyFileSystem``.

    Picklable (it holds the actor's name only), so Ray Train ships it to every worker,
    which looks the actor up on first use. ``backend`` (a local :class:`HeadStore`) skips
    Ray entirely; tests use it.
    """

    def __init__(self, name: str = HEAD_STORE_NAME, namespace: str = HEAD_STORE_NAMESPACE,
                 backend: HeadStore | None = None) -> None:
        self._name, self._namespace, self._backend = name, namespace, backend
        self._actor: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        if self._backend is not None:
            raise TrainError("a HeadStoreHandler with a local backend cannot leave this process")
        return (HeadStoreHandler, (self._name, self._namespace))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, HeadStoreHandler) and (other._name, other._namespace) == (self._name, self._namespace)
                and other._backend is self._backend)

    def __hash__(self) -> int:
        return hash((self._name, self._namespace))

    def equals(self, other: Any) -> bool:
        return self == other

    def _call(self, method: str, *args: Any) -> Any:
        if self._backend is not None:
            return getattr(self._backend, method)(*args)
        import ray

        if self._actor is None:
            try:
                self._actor = ray.get_actor(self._name, namespace=self._namespace)
            except ValueError:
                raise CheckpointStoreError(
                    "this Ray cluster has no dgpt checkpoint store on its head",
                    hint="run against a dgpt fabric (`dgpt up`), or pass storage= to dgpt.train.configure",
                ) from None
        try:
            return ray.get(getattr(self._actor, method).remote(*args))
        except ray.exceptions.RayTaskError as exc:
            # The store's own errors (missing file, refused path) keep their type.
            raise exc.as_instanceof_cause() from None

    # -- FileSystemHandler ------------------------------------------------

    def get_type_name(self) -> str:
        return "dgpt-head-store"

    def normalize_path(self, path: str) -> str:
        return str(PurePosixPath("/", path.strip("/")))[1:]

    def _file_info(self, entry: dict[str, Any]) -> Any:
        kind = {"file": pafs.FileType.File, "dir": pafs.FileType.Directory}.get(entry["type"], pafs.FileType.NotFound)
        return pafs.FileInfo(entry["path"], kind, size=entry["size"], mtime_ns=entry["mtime_ns"])

    def get_file_info(self, paths: list[str]) -> list[Any]:
        return [self._file_info(e) for e in self._call("info", list(paths))]

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        entries = self._call("listdir", selector.base_dir, bool(selector.recursive))
        if entries is None:
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(f"no folder {selector.base_dir!r} in the checkpoint store")
        return [self._file_info(e) for e in entries]

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call("mkdir", path)

    def delete_dir(self, path: str) -> None:
        self._call("delete_dir", path, False, False)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call("delete_dir", path, True, missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._call("delete_dir", "", True, False)

    def delete_file(self, path: str) -> None:
        self._call("delete_file", path)

    def move(self, src: str, dest: str) -> None:
        self._call("move", src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._call("copy", src, dest)

    def _open_reader(self, path: str) -> Any:
        (entry,) = self._call("info", [path])
        if entry["type"] != "file":
            raise FileNotFoundError(f"no file {path!r} in the checkpoint store")
        return pyarrow.PythonFile(_RemoteReader(self._call, path, int(entry["size"])), mode="r")

    def open_input_stream(self, path: str) -> Any:
        return self._open_reader(path)

    def open_input_file(self, path: str) -> Any:
        return self._open_reader(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return pyarrow.PythonFile(_RemoteWriter(self._call, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        raise CheckpointStoreError("the checkpoint store does not append to files",
                           hint="write each checkpoint file whole")


def head_filesystem() -> Any:
    """A ``pyarrow.fs.FileSystem`` over the head's checkpoint store (usable from any Ray process)."""
    return pafs.PyFileSystem(HeadStoreHandler())


def as_pyarrow_filesystem(fs: Any, field: str = "storage_filesystem") -> Any:
    """``fs`` as a ``pyarrow.fs.FileSystem``: pyarrow ones as they are, fsspec ones wrapped.

    Raises:
        TrainError: ``fs`` is neither (the message names ``field``).
    """
    if isinstance(fs, pafs.FileSystem):
        return fs
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with ray[train]
        fsspec = None
    if fsspec is not None and isinstance(fs, fsspec.AbstractFileSystem):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    raise TrainError(f"{field} must be a pyarrow.fs.FileSystem or an fsspec filesystem, got {type(fs).__name__}",
                     hint="pass e.g. pyarrow.fs.LocalFileSystem(), fsspec.filesystem('memory'), or leave it unset "
                          "for the head's checkpoint store")


def start_head_store(settings: Settings) -> None:
    """Start the store actor on the head (detached, restartable) if it does not run; the head calls this."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Pinned by node identity (this process runs on the head), like the control plane.
    actor: Any = ray.remote(HeadStore).options(  # type: ignore[attr-defined]
        name=HEAD_STORE_NAME, namespace=HEAD_STORE_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, max_concurrency=16, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(settings.model_dump_json())
    ray.get(actor.ping.remote(), timeout=120)

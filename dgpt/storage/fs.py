"""``dgpt://``: the storage tier as an fsspec filesystem (and a pyarrow one for Ray Train).

    fs = DonorFileSystem()                    # the fabric's head (fabric://), inside Ray or out
    fs = DonorFileSystem("local:///path/to/storage")     # a service in this process
    with fs.open("data/part-0.parquet", "wb") as f: ...
    ray.data.read_parquet("dgpt://data/", filesystem=fs)
    ray.train.RunConfig(storage_filesystem=pyarrow_filesystem(fs), storage_path="ckpt")

The constructor takes one string, ``metadata``: where the metadata service is. Its scheme
picks a *connector* (:func:`register_connector`) that returns the metadata client and the
piece transport, so the same filesystem works in-process (``local://<folder>``: a metadata
service over the SQLite file in that folder, for tests and one-machine fabrics), through
the head's Ray actor, or over its REST API (``fabric://``, ``http://``: :mod:`~dgpt.storage.connectors`). Because the
arguments are plain strings, the instance is deterministic (``_fs_token``) and pickles
into Ray tasks as ``(class, args)``; each process connects lazily on first use.

Semantics: files are immutable versions; a write becomes visible at close, atomically,
replacing any older version; a reader keeps reading the version it opened. Directories are
implied by the files under them, and ``mkdir`` also records empty ones.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from dgpt.exceptions import InvalidRequest, NotFound, WriteConflict
from dgpt.storage import PROTOCOL, connectors
from dgpt.storage.datapath import FileReader, FileWriter, StorageClient
from dgpt.storage.models import Entry
from dgpt.storage.service import MetadataClient
from dgpt.storage.transport import PieceTransport

Connector = Callable[[str], tuple[MetadataClient, PieceTransport]]
_CONNECTORS: dict[str, Connector] = {}
_CLIENTS: dict[tuple[str, int], StorageClient] = {}
_CLIENTS_LOCK = threading.Lock()


def register_connector(scheme: str, connector: Connector) -> None:
    """Make ``DonorFileSystem("<scheme>://...")`` use ``connector(url) -> (metadata, transport)``."""
    _CONNECTORS[scheme] = connector


def _local_connector(url: str) -> tuple[MetadataClient, PieceTransport]:
    """``local:///folder``: a metadata service in this process, over ``folder/metadata.sqlite``."""
    from dgpt.storage.local import open_local_service
    from dgpt.storage.transport import HttpTransport

    folder = urlparse(url).path
    if not folder:
        raise InvalidRequest(f"metadata url {url!r} must name a folder: local:///path/to/storage", 400)
    return open_local_service(Path(folder)), HttpTransport()


register_connector("local", _local_connector)
register_connector("fabric", connectors.fabric_connector)
register_connector("http", connectors.http_connector)
register_connector("https", connectors.http_connector)


def storage_client(metadata: str, io_workers: int = 16) -> StorageClient:
    """The process-wide storage client for a metadata url (connected on first use)."""
    key = (metadata, io_workers)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            scheme = urlparse(metadata).scheme
            connector = _CONNECTORS.get(scheme)
            if connector is None:
                raise InvalidRequest(
                    f"metadata url {metadata!r} has unknown scheme {scheme!r}", 400,
                    hint=f"use one of: {', '.join(sorted(f'{s}://' for s in _CONNECTORS))}",
                )
            meta, transport = connector(metadata)
            client = StorageClient(meta, transport, io_workers=io_workers)
            _CLIENTS[key] = client
        return client


def _oserror(exc: Exception, path: str, conflict: type[OSError] = FileExistsError) -> OSError:
    """The OSError an fsspec caller expects for a storage error on ``path``."""
    if isinstance(exc, NotFound):
        return FileNotFoundError(errno.ENOENT, exc.message, path)
    if isinstance(exc, WriteConflict):
        code = {FileExistsError: errno.EEXIST, IsADirectoryError: errno.EISDIR,
                NotADirectoryError: errno.ENOTDIR}.get(conflict, errno.ENOTEMPTY)
        return conflict(code, exc.message, path)
    if isinstance(exc, InvalidRequest):
        return ValueError(exc.message)  # type: ignore[return-value]
    return OSError(errno.EIO, str(exc), path)


class DonorFileSystem(AbstractFileSystem):
    """The donor storage tier as an fsspec filesystem (protocol ``dgpt``)."""

    protocol = (PROTOCOL,)
    root_marker = ""
    #: A write buffers at most this much before handing it to the segment writer.
    blocksize = 8 << 20

    def __init__(self, metadata: str = "fabric://", io_workers: int = 16, **storage_options: Any) -> None:
        """
        Args:
            metadata: where the metadata service is: ``fabric://`` (the default: the fabric's
                head, through its actor inside Ray or its REST API outside,
                :mod:`~dgpt.storage.connectors`), ``http://HEAD:PORT``, or
                ``local:///srv/dgpt/storage`` (a service in this process).
            io_workers: parallel piece transfers per process.
        """
        super().__init__(metadata=metadata, io_workers=io_workers, **storage_options)
        if not isinstance(metadata, str) or "://" not in metadata:
            raise ValueError(f"metadata must be a url like 'local:///path', got {metadata!r}")
        self.metadata_url = metadata
        self.io_workers = io_workers

    @property
    def client(self) -> StorageClient:
        return storage_client(self.metadata_url, self.io_workers)

    @property
    def fsid(self) -> str:
        return f"dgpt-{self._fs_token}"

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = fsspec.utils.stringify_path(path)
        if text.startswith(f"{PROTOCOL}://"):
            text = text[len(PROTOCOL) + 3 :]
        elif text.startswith(f"{PROTOCOL}::"):
            text = text[len(PROTOCOL) + 2 :]
        return text.strip("/")

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    # ------------------------------------------------------------------ namespace

    @staticmethod
    def _detail(e: Entry) -> dict[str, Any]:
        out: dict[str, Any] = {"name": e.path, "size": e.size, "type": e.type}
        if e.created_at is not None:
            out["created"] = e.created_at
        if e.file_id is not None:
            out["file_id"] = e.file_id
            out["profile"] = e.profile
        return out

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            entries = self.client.metadata.ls(path)
        except (NotFound, InvalidRequest) as exc:
            raise _oserror(exc, path) from None
        return [self._detail(e) for e in entries] if detail else [e.path for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        try:
            return self._detail(self.client.metadata.info(path))
        except (NotFound, InvalidRequest) as exc:
            raise _oserror(exc, path) from None

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
            return True
        except (FileNotFoundError, ValueError):
            return False

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.metadata.mkdir(path, parents=create_parents, exist_ok=False)
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, path) from None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.metadata.mkdir(path, parents=True, exist_ok=exist_ok)
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, path) from None

    def rmdir(self, path: str) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.metadata.rmdir(path)
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, path, OSError) from None

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.metadata.delete(path)
        except (NotFound, InvalidRequest) as exc:
            raise _oserror(exc, path) from None

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        for p in reversed(paths):  # children before their directories
            try:
                kind = self.info(p)["type"]
            except FileNotFoundError:
                continue  # an implied directory that vanished with its last file
            if kind == "file":
                self.rm_file(p)
            else:
                try:
                    self.rmdir(p)
                except FileNotFoundError:
                    pass

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any) -> None:
        if isinstance(path1, str) and isinstance(path2, str) and self.isfile(path1):
            src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
            if self.isdir(dst):
                dst = f"{dst}/{src.rsplit('/', 1)[-1]}"
            try:
                self.client.metadata.rename(src, dst)  # metadata only: no bytes move
            except (NotFound, WriteConflict, InvalidRequest) as exc:
                raise _oserror(exc, dst) from None
            return
        super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        try:
            if self.info(src)["type"] == "directory":
                self.makedirs(dst, exist_ok=True)
                return
            self.client.copy(src, dst)
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, dst, IsADirectoryError) from None

    def created(self, path: str) -> datetime:
        created = self.info(path).get("created")
        if created is None:
            raise FileNotFoundError(errno.ENOENT, "directory has no creation time", path)
        return datetime.fromtimestamp(created, tz=timezone.utc)

    def modified(self, path: str) -> datetime:
        return self.created(path)  # files are immutable versions: written once

    def ukey(self, path: str) -> str:
        return str(self.info(path).get("file_id") or self._strip_protocol(path))

    # ------------------------------------------------------------------ bytes

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        try:
            reader = self.client.reader(path)
        except (NotFound, InvalidRequest) as exc:
            raise _oserror(exc, path) from None
        size = reader.size
        lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
        hi = size if end is None else (end if end >= 0 else max(0, size + end))
        return reader.read(lo, hi)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.write_bytes(path, value, overwrite=mode != "create")
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, path) from None

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> AbstractBufferedFile:
        path = self._strip_protocol(path)
        if mode == "rb":
            return DonorReadFile(self, path, block_size=block_size, cache_options=cache_options, **kwargs)
        if mode in ("wb", "xb", "ab"):
            return DonorWriteFile(self, path, mode=mode, block_size=block_size, autocommit=autocommit, **kwargs)
        raise ValueError(f"mode {mode!r} is not supported: use rb, wb, xb or ab")


class DonorReadFile(AbstractBufferedFile):
    """A read-only file: fsspec's buffering over verified range reads of one file version."""

    def __init__(self, fs: DonorFileSystem, path: str, block_size: int | None = None,
                 cache_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            self.reader: FileReader = fs.client.reader(path)
        except (NotFound, InvalidRequest) as exc:
            if isinstance(exc, NotFound) and fs.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path) from None
            raise _oserror(exc, path) from None
        kwargs.setdefault("cache_type", "readahead")
        super().__init__(fs, path, mode="rb", block_size=block_size or fs.blocksize,
                         cache_options=cache_options, size=self.reader.size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.reader.read(start, end)


class DonorWriteFile(AbstractBufferedFile):
    """A file being written: buffered blocks feed one :class:`FileWriter`; close commits."""

    def __init__(self, fs: DonorFileSystem, path: str, mode: str = "wb", block_size: int | None = None,
                 autocommit: bool = True, **kwargs: Any) -> None:
        if fs.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if mode == "xb" and fs.exists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path)
        self.writer: FileWriter | None = None
        super().__init__(fs, path, mode=mode, block_size=block_size or fs.blocksize, autocommit=autocommit, **kwargs)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # fsspec's files commit on any exit; a write that failed must not become visible.
        if exc_type is None:
            self.close()
            return
        self.discard()
        self.closed = True

    def __del__(self) -> None:
        # Only close() or a clean `with` commits; a writer dropped half-way is abandoned.
        if not getattr(self, "closed", True):
            self.discard()
            self.closed = True

    def _initiate_upload(self) -> None:
        fs: DonorFileSystem = self.fs
        try:
            self.writer = fs.client.writer(self.path, overwrite=self.mode != "xb")
            if self.mode == "ab" and fs.isfile(self.path):
                for chunk in fs.client.reader(self.path).iter_segments():
                    self.writer.write(chunk)
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, self.path) from None

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self.writer is not None
        self.writer.write(self.buffer.getbuffer())
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
        except (NotFound, WriteConflict, InvalidRequest) as exc:
            raise _oserror(exc, self.path) from None

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def pyarrow_filesystem(fs: DonorFileSystem) -> Any:
    """``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))``: what Ray Train's ``storage_filesystem`` takes."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


fsspec.register_implementation(PROTOCOL, DonorFileSystem, clobber=True)

"""A donor's pieces on its own disk, within the capacity it offered (``--disk-gb``).

Layout under ``root``::

    pieces/<id[:2]>/<id>    one file per piece: the piece, its leaf hashes, a 16-byte footer
    tmp/                    puts in flight (emptied at start)

A put streams into ``tmp/``, checks the bytes against the claimed id (the BLAKE3 Merkle root,
:mod:`dgpt.storage.merkle`) and only then renames the file into place, so a piece on disk
always matches its name. **fsync policy**: with ``fsync=True`` (the default) the file is
fsynced before the rename and its directory after it, so a put that answered "stored"
survives a power cut; deletes are not fsynced (a piece that reappears after a crash is
garbage the head collects again). The leaf hashes are kept so audits and range reads can be
answered with Merkle paths without rehashing the piece.

Capacity counts whole files (piece + hashes + footer). A put reserves its size before it
writes a byte and is refused with :class:`~dgpt.exceptions.StoreFull` if it would not fit.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dgpt.exceptions import InvalidRequest, NotFound, PieceCorrupt, StoreFull
from dgpt.storage import merkle

_FOOTER = struct.Struct("<8sII")
_MAGIC = b"DGPTPC1\x00"
FOOTER_BYTES = _FOOTER.size
#: One piece is at most a segment's worth (64 MiB for k=1) plus fragment headers.
MAX_PIECE_BYTES = 80 << 20


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a piece store holds, for the head's placement and the donor's status view."""

    used_bytes: int
    capacity_bytes: int
    pieces: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)


@dataclass(frozen=True, slots=True)
class PieceInfo:
    piece_id: str
    piece_bytes: int
    leaf_bytes: int


def stored_bytes(piece_bytes: int, leaf_bytes: int) -> int:
    """Disk bytes a piece occupies in a store (what capacity is charged)."""
    return piece_bytes + merkle.HASH_BYTES * merkle.leaf_count(piece_bytes, leaf_bytes) + FOOTER_BYTES


class PieceStore:
    """Pieces in a folder, within ``capacity_bytes``; thread-safe."""

    def __init__(self, root: Path | str, capacity_bytes: int, fsync: bool = True) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity_bytes = int(capacity_bytes)
        self.fsync = fsync
        self._pieces_dir = self.root / "pieces"
        self._tmp_dir = self.root / "tmp"
        self._pieces_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._reserved = 0
        for stale in self._tmp_dir.iterdir():  # puts a crash interrupted
            stale.unlink(missing_ok=True)
        for shard in self._pieces_dir.iterdir():
            for path in shard.iterdir():
                if merkle.is_piece_id(path.name):
                    self._sizes[path.name] = path.stat().st_size
        self._used = sum(self._sizes.values())

    # ------------------------------------------------------------------ paths

    def _path(self, piece_id: str) -> Path:
        if not merkle.is_piece_id(piece_id):
            raise InvalidRequest(f"piece_id {piece_id[:80]!r} is not 64 lower-case hex digits", 400)
        return self._pieces_dir / piece_id[:2] / piece_id

    # ------------------------------------------------------------------ writes

    def put(self, piece_id: str, chunks: Iterable[bytes | memoryview], piece_bytes: int, leaf_bytes: int) -> bool:
        """Store a piece given as consecutive chunks; returns False if it was already stored.

        Raises:
            InvalidRequest: bad id, sizes out of range, or the body is not ``piece_bytes`` long.
            StoreFull: the piece would not fit in the capacity left.
            PieceCorrupt: the bytes do not hash to ``piece_id``. Nothing is kept.
        """
        path = self._path(piece_id)
        if not 0 < piece_bytes <= MAX_PIECE_BYTES:
            raise InvalidRequest(f"piece_bytes must be in 1..{MAX_PIECE_BYTES}, got {piece_bytes}", 400)
        if not 0 < leaf_bytes <= piece_bytes:
            raise InvalidRequest(f"leaf_bytes must be in 1..piece_bytes ({piece_bytes}), got {leaf_bytes}", 400)
        need = stored_bytes(piece_bytes, leaf_bytes)
        with self._lock:
            if piece_id in self._sizes:
                return False
            free = self.capacity_bytes - self._used - self._reserved
            if need > free:
                raise StoreFull(
                    f"piece store is full: the piece needs {need} bytes, {max(free, 0)} of "
                    f"{self.capacity_bytes} are free",
                    hint="the head places the piece elsewhere; offer more disk with `dgpt donor join --disk-gb`",
                )
            self._reserved += need
        tmp = self._tmp_dir / f"{piece_id}.{uuid.uuid4().hex[:8]}"
        try:
            hasher = merkle.PieceHasher(leaf_bytes)
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    if hasher.size + len(chunk) > piece_bytes:
                        raise InvalidRequest(f"piece body is longer than piece_bytes={piece_bytes}", 400)
                    hasher.update(chunk)
                    f.write(chunk)
                if hasher.size != piece_bytes:
                    raise InvalidRequest(f"piece body has {hasher.size} bytes, piece_bytes says {piece_bytes}", 400)
                actual, hashes = hasher.finish()
                if actual != piece_id:
                    raise PieceCorrupt(
                        f"piece body hashes to {actual[:16]}..., not the claimed {piece_id[:16]}...; not stored",
                        hint="the upload was corrupted in transit; the client retries",
                    )
                f.write(b"".join(hashes))
                f.write(_FOOTER.pack(_MAGIC, leaf_bytes, len(hashes)))
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= need
            raise
        with self._lock:
            self._reserved -= need
            created = piece_id not in self._sizes
            if created:
                self._sizes[piece_id] = need
                self._used += need
        return created

    def delete(self, piece_id: str) -> bool:
        """Remove a piece; returns False if it was not there."""
        path = self._path(piece_id)
        with self._lock:
            size = self._sizes.pop(piece_id, None)
            if size is None:
                return False
            self._used -= size
            path.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ reads

    def _open_footer(self, piece_id: str) -> tuple[Path, int, int, int]:
        """(path, piece_bytes, leaf_bytes, leaf count)."""
        path = self._path(piece_id)
        if piece_id not in self._sizes:
            raise NotFound(f"no piece {piece_id[:16]}... on this donor", 404, hint="the head repairs it elsewhere")
        try:
            with open(path, "rb") as f:
                f.seek(-FOOTER_BYTES, os.SEEK_END)
                magic, leaf_bytes, count = _FOOTER.unpack(f.read(FOOTER_BYTES))
                size = f.tell()
        except (OSError, struct.error):
            raise NotFound(f"piece {piece_id[:16]}... is unreadable on this donor", 404, hint="the head repairs it elsewhere") from None
        if magic != _MAGIC:
            raise NotFound(f"piece {piece_id[:16]}... has a damaged footer", 404, hint="the head repairs it elsewhere")
        piece_bytes = size - FOOTER_BYTES - merkle.HASH_BYTES * count
        return path, piece_bytes, leaf_bytes, count

    def info(self, piece_id: str) -> PieceInfo:
        _, piece_bytes, leaf_bytes, _ = self._open_footer(piece_id)
        return PieceInfo(piece_id, piece_bytes, leaf_bytes)

    def get(self, piece_id: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of a piece (``end`` clipped to its length).

        Raises:
            NotFound: no such piece. InvalidRequest: the range starts past the end.
        """
        path, piece_bytes, _, _ = self._open_footer(piece_id)
        stop = piece_bytes if end is None else min(end, piece_bytes)
        if not 0 <= start < stop:
            raise InvalidRequest(f"range [{start}, {end}) is outside the piece's {piece_bytes} bytes", 416)
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)

    def leaf_hashes(self, piece_id: str) -> tuple[int, int, bytes]:
        """(piece_bytes, leaf_bytes, concatenated leaf hashes) as stored at put."""
        path, piece_bytes, leaf_bytes, count = self._open_footer(piece_id)
        with open(path, "rb") as f:
            f.seek(piece_bytes)
            return piece_bytes, leaf_bytes, f.read(merkle.HASH_BYTES * count)

    def audit(self, piece_id: str, leaf_index: int, nonce: str) -> merkle.LeafProof:
        """One leaf of a piece and its Merkle path (the answer to an audit challenge)."""
        path, piece_bytes, leaf_bytes, count = self._open_footer(piece_id)
        if not 0 <= leaf_index < count:
            raise InvalidRequest(f"leaf_index {leaf_index} is outside 0..{count - 1}", 400)
        with open(path, "rb") as f:
            f.seek(leaf_index * leaf_bytes)
            leaf = f.read(min(leaf_bytes, piece_bytes - leaf_index * leaf_bytes))
            f.seek(piece_bytes)
            blob = f.read(merkle.HASH_BYTES * count)
        hashes = [blob[i : i + merkle.HASH_BYTES] for i in range(0, len(blob), merkle.HASH_BYTES)]
        return merkle.LeafProof(piece_id, leaf_index, leaf, tuple(merkle.proof(hashes, leaf_index)), nonce)

    def list(self) -> list[tuple[str, int]]:
        """(piece id, stored bytes) of every piece, sorted by id."""
        with self._lock:
            return sorted(self._sizes.items())

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._used + self._reserved, self.capacity_bytes, len(self._sizes))

    def has(self, piece_id: str) -> bool:
        with self._lock:
            return piece_id in self._sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

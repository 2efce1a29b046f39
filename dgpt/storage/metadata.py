"""The storage tier's SQLite database: files, segments, piece locations, donors, garbage, audits.

Plain Python over one SQLite file in WAL mode, like the registry's store: every public method
is one transaction, so a crash leaves either all of a change or none of it. Commits are
``synchronous=FULL``: once ``commit_write`` returns, the file survives a power cut of the
head, not only a killed process. Times are passed in (``now``) so tests control the clock.

A write is two-phase. ``begin_write`` creates an *open* file row with no path (invisible);
``add_segment`` records a segment and *reservations*: pieces promised to donors, charged to
their space, not yet confirmed. ``commit_write`` turns the confirmed reservations into
piece locations and gives the file its path, replacing an older version in the same
transaction. Everything a write or repair reserved and did not commit, and every piece of a
deleted or replaced file, becomes *garbage*: rows naming (donor, piece) that the collector
deletes from donors after a grace period and then forgets.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from dgpt.exceptions import InvalidRequest, NotFound, StorageError, WriteConflict
from dgpt.sqlite import connect as sqlite_connect
from dgpt.sqlite import immediate as sqlite_tx
from dgpt.storage.codec import Profile
from dgpt.storage.models import DonorSpec, DonorStorageView, Entry, SegmentInfo
from dgpt.storage.placement import Candidate

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS donors (
    donor_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    capacity_bytes INTEGER NOT NULL,
    used_bytes INTEGER NOT NULL DEFAULT 0,
    reliability REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('online', 'offline', 'leaving', 'gone')),
    state_since REAL NOT NULL,
    audits_passed INTEGER NOT NULL DEFAULT 0,
    audits_failed INTEGER NOT NULL DEFAULT 0,
    last_audit_at REAL
);
CREATE TABLE IF NOT EXISTS dirs (path TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY,
    path TEXT,
    target_path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed')),
    overwrite INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    k INTEGER NOT NULL,
    n INTEGER NOT NULL,
    repair_at INTEGER NOT NULL,
    segment_bytes INTEGER NOT NULL,
    stripe_plain_bytes INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at REAL NOT NULL,
    committed_at REAL,
    expires_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS files_by_path ON files(path) WHERE path IS NOT NULL;
CREATE TABLE IF NOT EXISTS segments (
    file_id TEXT NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
    segment INTEGER NOT NULL,
    plain_bytes INTEGER NOT NULL,
    piece_bytes INTEGER NOT NULL,
    leaf_bytes INTEGER NOT NULL,
    PRIMARY KEY (file_id, segment)
);
CREATE TABLE IF NOT EXISTS pieces (
    file_id TEXT NOT NULL,
    segment INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    piece_id TEXT NOT NULL,
    donor_id TEXT NOT NULL REFERENCES donors(donor_id),
    stored_bytes INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('stored', 'bad')),
    bad_reason TEXT,
    PRIMARY KEY (file_id, segment, idx),
    FOREIGN KEY (file_id, segment) REFERENCES segments(file_id, segment) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS pieces_by_donor ON pieces(donor_id);
CREATE TABLE IF NOT EXISTS reservations (
    file_id TEXT NOT NULL,
    segment INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    piece_id TEXT NOT NULL,
    donor_id TEXT NOT NULL REFERENCES donors(donor_id),
    stored_bytes INTEGER NOT NULL,
    purpose TEXT NOT NULL CHECK (purpose IN ('write', 'repair')),
    expires_at REAL NOT NULL,
    PRIMARY KEY (file_id, segment, idx, donor_id)
);
CREATE INDEX IF NOT EXISTS reservations_by_expiry ON reservations(expires_at);
CREATE TABLE IF NOT EXISTS garbage (
    donor_id TEXT NOT NULL REFERENCES donors(donor_id),
    piece_id TEXT NOT NULL,
    stored_bytes INTEGER NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (donor_id, piece_id)
);
CREATE TABLE IF NOT EXISTS audits (
    audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    donor_id TEXT NOT NULL,
    piece_id TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('passed', 'failed', 'unreachable')),
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audits_by_donor ON audits(donor_id, audit_id);
"""

#: Donor states in which a donor's pieces still exist (``gone`` ones are lost for good).
DURABLE_STATES = ("online", "offline", "leaving")
#: Donor states in which its pieces can be read right now.
READABLE_STATES = ("online", "leaving")


@dataclass(frozen=True, slots=True)
class FileRow:
    file_id: str
    path: str | None
    target_path: str
    state: str
    overwrite: bool
    size: int
    profile: Profile
    segment_bytes: int
    stripe_plain_bytes: int
    wrapped_key: bytes
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class PieceRow:
    """One piece location, with its donor's address and state."""

    file_id: str
    segment: int
    index: int
    piece_id: str
    donor_id: str
    owner: str
    url: str
    donor_state: str
    state: str
    stored_bytes: int


@dataclass(frozen=True, slots=True)
class SegmentRow:
    file_id: str
    segment: int
    plain_bytes: int
    piece_bytes: int
    leaf_bytes: int


@dataclass(frozen=True, slots=True)
class SegmentCounts:
    """How many pieces of a segment are durable (stored, on donors not gone), readable now, and bad."""

    file_id: str
    path: str
    segment: int
    profile: Profile
    durable: int
    readable: int
    bad: int = 0


@dataclass(frozen=True, slots=True)
class GarbageRow:
    donor_id: str
    piece_id: str
    url: str
    donor_state: str


def _parent_dirs(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _prefix_bounds(path: str) -> tuple[str, str]:
    """Keys ``>= lo`` and ``< hi`` are exactly the paths strictly inside directory ``path``."""
    if not path:
        return "", "\U0010ffff"
    return path + "/", path + "0"  # '0' is the character after '/'


class MetadataStore:
    """Files, segments, piece locations and donors in one SQLite file (WAL)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite_connect(self.path)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_tx(self._db, self._lock)

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # ---------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0]["value"]) if rows else None

    def set_meta_once(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless one is there; returns the stored value."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return str(db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()["value"])

    # ---------------------------------------------------------------- donors

    def upsert_donor(self, spec: DonorSpec, now: float) -> None:
        """Add a donor or update its address, owner, capacity and reliability.

        A donor that was ``gone`` comes back ``online`` with an empty slate (its old pieces
        were written off); one that is ``leaving`` stays leaving.
        """
        with self._tx() as db:
            row = db.execute("SELECT state FROM donors WHERE donor_id=?", (spec.donor_id,)).fetchone()
            if row is None:
                db.execute(
                    """INSERT INTO donors(donor_id, owner, url, capacity_bytes, reliability, state, state_since)
                       VALUES (?,?,?,?,?, 'online', ?)""",
                    (spec.donor_id, spec.owner, spec.url, spec.capacity_bytes, spec.reliability, now),
                )
                return
            state = "leaving" if row["state"] == "leaving" else "online"
            db.execute(
                """UPDATE donors SET owner=?, url=?, capacity_bytes=?, reliability=?, state=?,
                   state_since=CASE WHEN state=? THEN state_since ELSE ? END WHERE donor_id=?""",
                (spec.owner, spec.url, spec.capacity_bytes, spec.reliability, state, state, now, spec.donor_id),
            )

    def set_donor_state(self, donor_id: str, state: str, now: float) -> None:
        if state not in ("online", "offline", "leaving", "gone"):
            raise ValueError(f"donor state must be online, offline, leaving or gone, got {state!r}")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE donors SET state=?, state_since=CASE WHEN state=? THEN state_since ELSE ? END WHERE donor_id=?",
                (state, state, now, donor_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no storage donor {donor_id!r}", 404, hint="register it with the metadata service first")

    def set_reliability(self, donor_id: str, reliability: float) -> None:
        if not 0.0 <= reliability <= 1.0:
            raise ValueError(f"reliability must be in [0, 1], got {reliability}")
        with self._tx() as db:
            db.execute("UPDATE donors SET reliability=? WHERE donor_id=?", (reliability, donor_id))

    def donor_state(self, donor_id: str) -> str:
        rows = self._read("SELECT state FROM donors WHERE donor_id=?", (donor_id,))
        if not rows:
            raise NotFound(f"no storage donor {donor_id!r}", 404, hint="register it with the metadata service first")
        return str(rows[0]["state"])

    def donors(self) -> list[DonorStorageView]:
        rows = self._read(
            """SELECT d.*, (SELECT COUNT(*) FROM pieces p WHERE p.donor_id=d.donor_id) AS pieces
               FROM donors d ORDER BY d.donor_id"""
        )
        return [
            DonorStorageView(
                donor_id=r["donor_id"], owner=r["owner"], url=r["url"], state=r["state"],
                capacity_bytes=r["capacity_bytes"], used_bytes=r["used_bytes"], pieces=r["pieces"],
                reliability=r["reliability"], audits_passed=r["audits_passed"], audits_failed=r["audits_failed"],
            )
            for r in rows
        ]

    def candidates(self) -> list[Candidate]:
        """Donors that may take new pieces: online, with their free space."""
        rows = self._read(
            "SELECT donor_id, owner, url, capacity_bytes - used_bytes AS free, reliability FROM donors "
            "WHERE state='online' ORDER BY donor_id"
        )
        return [Candidate(r["donor_id"], r["owner"], max(0, int(r["free"])), float(r["reliability"]), r["url"]) for r in rows]

    def donor_url(self, donor_id: str) -> tuple[str, str]:
        rows = self._read("SELECT url, state FROM donors WHERE donor_id=?", (donor_id,))
        if not rows:
            raise NotFound(f"no storage donor {donor_id!r}", 404)
        return str(rows[0]["url"]), str(rows[0]["state"])

    # ---------------------------------------------------------------- namespace

    def _file_at(self, db: sqlite3.Connection, path: str) -> sqlite3.Row | None:
        return db.execute("SELECT * FROM files WHERE path=? AND state='committed'", (path,)).fetchone()

    def _is_dir(self, db: sqlite3.Connection, path: str) -> bool:
        if not path:
            return True
        if db.execute("SELECT 1 FROM dirs WHERE path=?", (path,)).fetchone():
            return True
        lo, hi = _prefix_bounds(path)
        if db.execute("SELECT 1 FROM dirs WHERE path>=? AND path<? LIMIT 1", (lo, hi)).fetchone():
            return True
        return db.execute(
            "SELECT 1 FROM files WHERE path>=? AND path<? AND state='committed' LIMIT 1", (lo, hi)
        ).fetchone() is not None

    def _check_no_file_parent(self, db: sqlite3.Connection, path: str) -> None:
        for parent in _parent_dirs(path):
            if self._file_at(db, parent) is not None:
                raise WriteConflict(f"{parent!r} is a file, so {path!r} cannot be created under it",
                                    hint="choose another path or remove the file")

    def info(self, path: str) -> Entry:
        with self._lock:
            row = self._file_at(self._db, path)
            if row is not None:
                return _entry(row)
            if self._is_dir(self._db, path):
                created = self._db.execute("SELECT created_at FROM dirs WHERE path=?", (path,)).fetchone()
                return Entry(path=path, type="directory", created_at=created["created_at"] if created else None)
        raise NotFound(f"no such file or directory: {path!r}", 404, hint="list what exists with `fs.ls(...)`")

    def ls(self, path: str) -> list[Entry]:
        """Children of directory ``path`` (a file lists as itself).

        Raises:
            NotFound: nothing at ``path``.
        """
        with self._lock:
            row = self._file_at(self._db, path)
            if row is not None:
                return [_entry(row)]
            lo, hi = _prefix_bounds(path)
            files = self._db.execute(
                "SELECT * FROM files WHERE path>=? AND path<? AND state='committed' ORDER BY path", (lo, hi)
            ).fetchall()
            dirs = self._db.execute("SELECT path, created_at FROM dirs WHERE path>=? AND path<? ORDER BY path", (lo, hi)).fetchall()
            exists = bool(files or dirs) or self._is_dir(self._db, path)
        if not exists:
            raise NotFound(f"no such file or directory: {path!r}", 404, hint="list what exists with `fs.ls(...)`")
        out: dict[str, Entry] = {}
        for f in files:
            rest = f["path"][len(lo):]
            if "/" not in rest:
                out[f["path"]] = _entry(f)
            else:
                child = lo + rest.split("/", 1)[0]
                out.setdefault(child, Entry(path=child, type="directory"))
        for d in dirs:
            child = lo + d["path"][len(lo):].split("/", 1)[0]
            if child == d["path"]:
                out[child] = Entry(path=child, type="directory", created_at=d["created_at"])
            else:
                out.setdefault(child, Entry(path=child, type="directory"))
        return [out[p] for p in sorted(out)]

    def find_files(self, path: str) -> list[Entry]:
        """Every committed file at or under ``path``."""
        with self._lock:
            row = self._file_at(self._db, path)
            lo, hi = _prefix_bounds(path)
            files = self._db.execute(
                "SELECT * FROM files WHERE path>=? AND path<? AND state='committed' ORDER BY path", (lo, hi)
            ).fetchall()
        return ([_entry(row)] if row is not None else []) + [_entry(f) for f in files]

    def mkdir(self, path: str, now: float, parents: bool, exist_ok: bool) -> None:
        """Create directory ``path`` (and, with ``parents``, its missing parents).

        Raises:
            WriteConflict: a file is at ``path`` or above it, or the directory exists and not
                ``exist_ok``. NotFound: a parent is missing and not ``parents``.
        """
        if not path:
            if exist_ok:
                return
            raise WriteConflict("the root directory always exists")
        with self._tx() as db:
            if self._file_at(db, path) is not None:
                raise WriteConflict(f"{path!r} is a file", hint="choose another path or remove the file")
            self._check_no_file_parent(db, path)
            if self._is_dir(db, path):
                if exist_ok:
                    return
                raise WriteConflict(f"directory {path!r} already exists")
            parents_list = _parent_dirs(path)
            if parents_list and not parents and not self._is_dir(db, parents_list[-1]):
                raise NotFound(f"parent directory {parents_list[-1]!r} does not exist", 404,
                               hint="create it first, or pass create_parents=True")
            for p in [*parents_list, path] if parents else [path]:
                db.execute("INSERT OR IGNORE INTO dirs(path, created_at) VALUES (?, ?)", (p, now))

    def rmdir(self, path: str) -> None:
        """Remove an empty directory.

        Raises:
            NotFound: no directory there. WriteConflict: it is not empty (or is a file).
        """
        if not path:
            return
        with self._tx() as db:
            if self._file_at(db, path) is not None:
                raise WriteConflict(f"{path!r} is a file, not a directory", hint="remove files with rm")
            lo, hi = _prefix_bounds(path)
            if db.execute("SELECT 1 FROM files WHERE path>=? AND path<? AND state='committed' LIMIT 1", (lo, hi)).fetchone() or \
                    db.execute("SELECT 1 FROM dirs WHERE path>=? AND path<? LIMIT 1", (lo, hi)).fetchone():
                raise WriteConflict(f"directory {path!r} is not empty", hint="remove what it holds first (rm recursive=True)")
            if db.execute("DELETE FROM dirs WHERE path=?", (path,)).rowcount == 0:
                raise NotFound(f"no such directory: {path!r}", 404)

    def delete_file(self, path: str, now: float) -> Entry:
        """Remove a committed file; its pieces become garbage. Raises NotFound."""
        with self._tx() as db:
            row = self._file_at(db, path)
            if row is None:
                raise NotFound(f"no such file: {path!r}", 404, hint="list what exists with `fs.ls(...)`")
            self._drop_file(db, row["file_id"], now)
            return _entry(row)

    def rename(self, src: str, dst: str, now: float) -> Entry:
        """Move a committed file to ``dst`` (replacing a file there), atomically."""
        with self._tx() as db:
            row = self._file_at(db, src)
            if row is None:
                raise NotFound(f"no such file: {src!r}", 404)
            if src == dst:
                return _entry(row)
            if self._is_dir(db, dst):
                raise WriteConflict(f"{dst!r} is a directory", hint="name the destination file")
            self._check_no_file_parent(db, dst)
            old = self._file_at(db, dst)
            if old is not None:
                self._drop_file(db, old["file_id"], now)
            db.execute("UPDATE files SET path=? WHERE file_id=?", (dst, row["file_id"]))
            return _entry(db.execute("SELECT * FROM files WHERE file_id=?", (row["file_id"],)).fetchone())

    def _drop_file(self, db: sqlite3.Connection, file_id: str, now: float) -> None:
        """Delete a file's rows; its pieces and reservations become garbage (same transaction)."""
        for p in db.execute("SELECT donor_id, piece_id, stored_bytes FROM pieces WHERE file_id=?", (file_id,)).fetchall():
            self._to_garbage(db, p["donor_id"], p["piece_id"], p["stored_bytes"], now)
        for r in db.execute("SELECT donor_id, piece_id, stored_bytes FROM reservations WHERE file_id=?", (file_id,)).fetchall():
            self._to_garbage(db, r["donor_id"], r["piece_id"], r["stored_bytes"], now)
        db.execute("DELETE FROM reservations WHERE file_id=?", (file_id,))
        db.execute("DELETE FROM pieces WHERE file_id=?", (file_id,))
        db.execute("DELETE FROM files WHERE file_id=?", (file_id,))

    def _charge(self, db: sqlite3.Connection, donor_id: str, piece_id: str, stored_bytes: int) -> None:
        """Charge a new piece or reservation to its donor, unless the same bytes wait there as garbage."""
        cur = db.execute("DELETE FROM garbage WHERE donor_id=? AND piece_id=?", (donor_id, piece_id))
        if cur.rowcount == 0:
            db.execute("UPDATE donors SET used_bytes=used_bytes+? WHERE donor_id=?", (stored_bytes, donor_id))

    def _to_garbage(self, db: sqlite3.Connection, donor_id: str, piece_id: str, stored_bytes: int, now: float) -> None:
        # The bytes stay charged to the donor until the collector has deleted them.
        cur = db.execute(
            "INSERT OR IGNORE INTO garbage(donor_id, piece_id, stored_bytes, since) VALUES (?,?,?,?)",
            (donor_id, piece_id, stored_bytes, now),
        )
        if cur.rowcount == 0:  # already garbage: it was charged once
            db.execute("UPDATE donors SET used_bytes=MAX(0, used_bytes-?) WHERE donor_id=?", (stored_bytes, donor_id))

    # ---------------------------------------------------------------- writes

    def begin_write(self, file_id: str, path: str, profile: Profile, segment_bytes: int, stripe_plain_bytes: int,
                    wrapped_key: bytes, overwrite: bool, now: float, expires_at: float) -> None:
        """Open a write of ``path`` (invisible until committed).

        Raises:
            WriteConflict: ``path`` is a directory, lies under a file, or is a file and not
                ``overwrite``.
        """
        if not path:
            raise InvalidRequest("cannot write to the root directory; name a file", 400)
        with self._tx() as db:
            if self._is_dir(db, path):
                raise WriteConflict(f"{path!r} is a directory", hint="name a file inside it")
            self._check_no_file_parent(db, path)
            if not overwrite and self._file_at(db, path) is not None:
                raise WriteConflict(f"{path!r} already exists", hint="open it with mode 'wb' to overwrite")
            db.execute(
                """INSERT INTO files(file_id, path, target_path, state, overwrite, k, n, repair_at, segment_bytes,
                   stripe_plain_bytes, wrapped_key, created_at, expires_at)
                   VALUES (?, NULL, ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (file_id, path, int(overwrite), profile.k, profile.n, profile.repair_at, segment_bytes,
                 stripe_plain_bytes, wrapped_key, now, expires_at),
            )

    def _open_write(self, db: sqlite3.Connection, file_id: str, now: float) -> sqlite3.Row:
        row = db.execute("SELECT * FROM files WHERE file_id=?", (file_id,)).fetchone()
        if row is None:
            raise WriteConflict(f"write {file_id} is unknown, aborted or expired", hint="start the write again")
        if row["state"] != "open":
            raise WriteConflict(f"write {file_id} is already committed", hint="start a new write")
        if row["expires_at"] is not None and now > row["expires_at"]:
            raise WriteConflict(f"write {file_id} expired", hint="start the write again; large files need fewer stalls")
        return row

    def add_segment(self, file_id: str, segment: int, plain_bytes: int, piece_bytes: int, leaf_bytes: int,
                    placements: Sequence[tuple[int, str, str, int]], now: float, expires_at: float) -> None:
        """Record a segment of an open write and reserve its pieces: ``(index, piece_id, donor_id, bytes)``.

        Placing the same index again (an upload failed) replaces its reservation; the old one
        becomes garbage, since the donor may hold the piece already.
        """
        with self._tx() as db:
            row = self._open_write(db, file_id, now)
            if not 0 < plain_bytes <= row["segment_bytes"]:
                raise InvalidRequest(f"segment plain_bytes {plain_bytes} is outside 1..{row['segment_bytes']}", 400)
            known = db.execute("SELECT * FROM segments WHERE file_id=? AND segment=?", (file_id, segment)).fetchone()
            if known is None:
                db.execute(
                    "INSERT INTO segments(file_id, segment, plain_bytes, piece_bytes, leaf_bytes) VALUES (?,?,?,?,?)",
                    (file_id, segment, plain_bytes, piece_bytes, leaf_bytes),
                )
            elif (known["plain_bytes"], known["piece_bytes"], known["leaf_bytes"]) != (plain_bytes, piece_bytes, leaf_bytes):
                raise WriteConflict(f"segment {segment} of write {file_id} was placed with other sizes")
            for index, piece_id, donor_id, stored in placements:
                for old in db.execute(
                    "SELECT donor_id, piece_id, stored_bytes FROM reservations WHERE file_id=? AND segment=? AND idx=?",
                    (file_id, segment, index),
                ).fetchall():
                    self._to_garbage(db, old["donor_id"], old["piece_id"], old["stored_bytes"], now)
                db.execute("DELETE FROM reservations WHERE file_id=? AND segment=? AND idx=?", (file_id, segment, index))
                db.execute(
                    """INSERT INTO reservations(file_id, segment, idx, piece_id, donor_id, stored_bytes, purpose, expires_at)
                       VALUES (?,?,?,?,?,?, 'write', ?)""",
                    (file_id, segment, index, piece_id, donor_id, stored, expires_at),
                )
                self._charge(db, donor_id, piece_id, stored)
            db.execute("UPDATE files SET expires_at=MAX(expires_at, ?) WHERE file_id=?", (expires_at, file_id))

    def segment_donors(self, file_id: str, segment: int) -> list[tuple[int, str, str, str]]:
        """(index, donor_id, owner, donor state) of every piece and reservation of a segment."""
        rows = self._read(
            """SELECT x.idx, x.donor_id, d.owner, d.state FROM (
                   SELECT idx, donor_id FROM pieces WHERE file_id=? AND segment=?
                   UNION ALL SELECT idx, donor_id FROM reservations WHERE file_id=? AND segment=?) x
               JOIN donors d ON d.donor_id = x.donor_id""",
            (file_id, segment, file_id, segment),
        )
        return [(int(r["idx"]), str(r["donor_id"]), str(r["owner"]), str(r["state"])) for r in rows]

    def commit_write(self, file_id: str, size: int, stored: Iterable[tuple[int, int, str]], min_pieces: int,
                     now: float) -> Entry:
        """Make an open write visible at its path, atomically.

        Args:
            stored: ``(segment, index, donor_id)`` of every piece the client confirmed.
            min_pieces: fewest confirmed pieces each segment needs.
        Raises:
            WriteConflict: the write is not open (or expired), or the path was taken meanwhile
                by a file when the write does not overwrite.
            InvalidRequest: segments missing or not adding up to ``size``, a confirmed piece
                that was never reserved, or a segment with fewer than ``min_pieces``.
        """
        confirmed = {(s, i): d for s, i, d in stored}
        with self._tx() as db:
            row = self._open_write(db, file_id, now)
            segs = db.execute("SELECT segment, plain_bytes FROM segments WHERE file_id=? ORDER BY segment", (file_id,)).fetchall()
            if [s["segment"] for s in segs] != list(range(len(segs))):
                raise InvalidRequest(f"write {file_id} has segments {[s['segment'] for s in segs]}, not 0..{len(segs) - 1}", 400)
            total = sum(s["plain_bytes"] for s in segs)
            if total != size:
                raise InvalidRequest(f"write {file_id}: segments hold {total} bytes, the client says size={size}", 400)
            reserved = db.execute("SELECT * FROM reservations WHERE file_id=? AND purpose='write'", (file_id,)).fetchall()
            by_key = {(r["segment"], r["idx"], r["donor_id"]): r for r in reserved}
            for (s, i), d in confirmed.items():
                if (s, i, d) not in by_key:
                    raise InvalidRequest(f"piece {i} of segment {s} was not placed on donor {d!r}", 400)
            per_segment = {s["segment"]: 0 for s in segs}
            for (s, _), _d in confirmed.items():
                per_segment[s] = per_segment.get(s, 0) + 1
            short = {s: c for s, c in per_segment.items() if c < min_pieces}
            if short:
                raise InvalidRequest(
                    f"write {file_id}: segments {sorted(short)[:5]} have fewer than {min_pieces} stored pieces", 400,
                    hint="retry the failed uploads on other donors before committing",
                )
            path = row["target_path"]
            self._check_no_file_parent(db, path)
            if self._is_dir(db, path) and self._file_at(db, path) is None:
                raise WriteConflict(f"{path!r} became a directory during the write")
            old = self._file_at(db, path)
            if old is not None:
                if not row["overwrite"]:
                    raise WriteConflict(f"{path!r} was created by another writer meanwhile", hint="open with 'wb' to overwrite")
                self._drop_file(db, old["file_id"], now)
            for r in reserved:
                key = (r["segment"], r["idx"])
                if confirmed.get(key) == r["donor_id"]:
                    db.execute(
                        """INSERT INTO pieces(file_id, segment, idx, piece_id, donor_id, stored_bytes, state)
                           VALUES (?,?,?,?,?,?, 'stored')""",
                        (file_id, r["segment"], r["idx"], r["piece_id"], r["donor_id"], r["stored_bytes"]),
                    )
                else:
                    self._to_garbage(db, r["donor_id"], r["piece_id"], r["stored_bytes"], now)
            db.execute("DELETE FROM reservations WHERE file_id=?", (file_id,))
            db.execute(
                "UPDATE files SET path=?, state='committed', size=?, committed_at=?, expires_at=NULL WHERE file_id=?",
                (path, size, now, file_id),
            )
            return _entry(db.execute("SELECT * FROM files WHERE file_id=?", (file_id,)).fetchone())

    def abort_write(self, file_id: str, now: float) -> bool:
        """Drop an open write; what it reserved becomes garbage. False if it was not open."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM files WHERE file_id=?", (file_id,)).fetchone()
            if row is None or row["state"] != "open":
                return False
            self._drop_file(db, file_id, now)
            return True

    def expire(self, now: float) -> tuple[int, int]:
        """Abort open writes past their expiry and drop expired repair reservations.

        Returns:
            (writes aborted, repair reservations dropped)
        """
        with self._tx() as db:
            writes = [r["file_id"] for r in db.execute(
                "SELECT file_id FROM files WHERE state='open' AND expires_at < ?", (now,)).fetchall()]
            for file_id in writes:
                self._drop_file(db, file_id, now)
            stale = db.execute("SELECT * FROM reservations WHERE purpose='repair' AND expires_at < ?", (now,)).fetchall()
            for r in stale:
                self._to_garbage(db, r["donor_id"], r["piece_id"], r["stored_bytes"], now)
            db.execute("DELETE FROM reservations WHERE purpose='repair' AND expires_at < ?", (now,))
            return len(writes), len(stale)

    # ---------------------------------------------------------------- reads

    def file_row(self, path: str | None = None, file_id: str | None = None) -> FileRow:
        """A committed file by path, or any file by id. Raises NotFound."""
        if path is not None:
            rows = self._read("SELECT * FROM files WHERE path=? AND state='committed'", (path,))
        else:
            rows = self._read("SELECT * FROM files WHERE file_id=?", (file_id,))
        if not rows:
            raise NotFound(f"no such file: {path if path is not None else file_id!r}", 404,
                           hint="list what exists with `fs.ls(...)`")
        r = rows[0]
        return FileRow(
            file_id=r["file_id"], path=r["path"], target_path=r["target_path"], state=r["state"],
            overwrite=bool(r["overwrite"]), size=r["size"], profile=Profile(r["k"], r["n"], r["repair_at"]),
            segment_bytes=r["segment_bytes"], stripe_plain_bytes=r["stripe_plain_bytes"],
            wrapped_key=bytes(r["wrapped_key"]), created_at=r["committed_at"] or r["created_at"], expires_at=r["expires_at"],
        )

    def segments(self, file_id: str) -> list[SegmentRow]:
        rows = self._read("SELECT * FROM segments WHERE file_id=? ORDER BY segment", (file_id,))
        return [SegmentRow(r["file_id"], r["segment"], r["plain_bytes"], r["piece_bytes"], r["leaf_bytes"]) for r in rows]

    def segment_infos(self, file_id: str) -> list[SegmentInfo]:
        out, offset = [], 0
        for s in self.segments(file_id):
            out.append(SegmentInfo(segment=s.segment, offset=offset, plain_bytes=s.plain_bytes))
            offset += s.plain_bytes
        return out

    def segment(self, file_id: str, segment: int) -> SegmentRow:
        rows = self._read("SELECT * FROM segments WHERE file_id=? AND segment=?", (file_id, segment))
        if not rows:
            raise NotFound(f"no segment {segment} in file {file_id}", 404)
        r = rows[0]
        return SegmentRow(r["file_id"], r["segment"], r["plain_bytes"], r["piece_bytes"], r["leaf_bytes"])

    def pieces(self, file_id: str, segment: int | None = None) -> list[PieceRow]:
        sql = """SELECT p.*, d.owner, d.url, d.state AS donor_state FROM pieces p JOIN donors d ON d.donor_id=p.donor_id
                 WHERE p.file_id=?""" + (" AND p.segment=?" if segment is not None else "") + " ORDER BY p.segment, p.idx"
        rows = self._read(sql, (file_id, segment) if segment is not None else (file_id,))
        return [_piece(r) for r in rows]

    def pieces_on_donor(self, donor_id: str) -> list[PieceRow]:
        rows = self._read(
            """SELECT p.*, d.owner, d.url, d.state AS donor_state FROM pieces p JOIN donors d ON d.donor_id=p.donor_id
               WHERE p.donor_id=? ORDER BY p.file_id, p.segment, p.idx""",
            (donor_id,),
        )
        return [_piece(r) for r in rows]

    def mark_bad(self, file_id: str, segment: int, index: int, piece_id: str, donor_id: str, reason: str) -> bool:
        """Mark one stored piece bad (it no longer counts); False if it is not (or no longer) there."""
        with self._tx() as db:
            cur = db.execute(
                """UPDATE pieces SET state='bad', bad_reason=? WHERE file_id=? AND segment=? AND idx=?
                   AND piece_id=? AND donor_id=? AND state='stored'""",
                (reason[:500], file_id, segment, index, piece_id, donor_id),
            )
            return cur.rowcount > 0

    # ---------------------------------------------------------------- health and repair

    def segment_counts(self) -> list[SegmentCounts]:
        """Durable and readable piece counts of every segment of every committed file."""
        rows = self._read(
            f"""SELECT f.file_id, f.path, f.k, f.n, f.repair_at, s.segment,
                   SUM(CASE WHEN p.state='stored' AND d.state IN {DURABLE_STATES} THEN 1 ELSE 0 END) AS durable,
                   SUM(CASE WHEN p.state='stored' AND d.state IN {READABLE_STATES} THEN 1 ELSE 0 END) AS readable,
                   SUM(CASE WHEN p.state='bad' THEN 1 ELSE 0 END) AS bad
                FROM files f JOIN segments s ON s.file_id=f.file_id
                LEFT JOIN pieces p ON p.file_id=s.file_id AND p.segment=s.segment
                LEFT JOIN donors d ON d.donor_id=p.donor_id
                WHERE f.state='committed'
                GROUP BY f.file_id, s.segment ORDER BY f.file_id, s.segment"""
        )
        return [
            SegmentCounts(r["file_id"], r["path"], r["segment"], Profile(r["k"], r["n"], r["repair_at"]),
                          int(r["durable"] or 0), int(r["readable"] or 0), int(r["bad"] or 0))
            for r in rows
        ]

    def reserve_repair(self, file_id: str, segment: int, placements: Sequence[tuple[int, str, str, int]],
                       expires_at: float) -> None:
        """Reserve new locations ``(index, piece_id, donor_id, bytes)`` for a repair or a move."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM files WHERE file_id=? AND state='committed'", (file_id,)).fetchone() is None:
                raise NotFound(f"file {file_id} is gone; nothing to repair", 404)
            for index, piece_id, donor_id, stored in placements:
                cur = db.execute(
                    """UPDATE reservations SET expires_at=MAX(expires_at, ?) WHERE file_id=? AND segment=? AND idx=?
                       AND donor_id=? AND piece_id=?""",
                    (expires_at, file_id, segment, index, donor_id, piece_id),
                )
                if cur.rowcount:
                    continue
                db.execute(
                    """INSERT INTO reservations(file_id, segment, idx, piece_id, donor_id, stored_bytes,
                       purpose, expires_at) VALUES (?,?,?,?,?,?, 'repair', ?)""",
                    (file_id, segment, index, piece_id, donor_id, stored, expires_at),
                )
                self._charge(db, donor_id, piece_id, stored)

    def commit_repair(self, file_id: str, segment: int, moved: Iterable[tuple[int, str]], now: float) -> int:
        """Point pieces ``(index, new donor)`` at their new, confirmed copies, atomically.

        The old location of each becomes garbage; repair reservations of the segment that
        were not confirmed become garbage too. Returns how many locations changed.

        Raises:
            InvalidRequest: a confirmed copy was never reserved.
        """
        changed = 0
        moved = list(moved)
        with self._tx() as db:
            reserved = {
                (r["idx"], r["donor_id"]): r
                for r in db.execute(
                    "SELECT * FROM reservations WHERE file_id=? AND segment=? AND purpose='repair'", (file_id, segment)
                ).fetchall()
            }
            file_alive = db.execute("SELECT 1 FROM files WHERE file_id=? AND state='committed'", (file_id,)).fetchone()
            for index, donor_id in moved:
                r = reserved.pop((index, donor_id), None)
                if r is None:
                    raise InvalidRequest(f"piece {index} of segment {segment} was not reserved on {donor_id!r}", 400)
                if not file_alive:
                    self._to_garbage(db, r["donor_id"], r["piece_id"], r["stored_bytes"], now)
                    continue
                old = db.execute(
                    "SELECT * FROM pieces WHERE file_id=? AND segment=? AND idx=?", (file_id, segment, index)
                ).fetchone()
                if old is not None:
                    self._to_garbage(db, old["donor_id"], old["piece_id"], old["stored_bytes"], now)
                db.execute(
                    """INSERT OR REPLACE INTO pieces(file_id, segment, idx, piece_id, donor_id, stored_bytes, state)
                       VALUES (?,?,?,?,?,?, 'stored')""",
                    (file_id, segment, index, r["piece_id"], donor_id, r["stored_bytes"]),
                )
                changed += 1
            for r in reserved.values():
                self._to_garbage(db, r["donor_id"], r["piece_id"], r["stored_bytes"], now)
            db.execute("DELETE FROM reservations WHERE file_id=? AND segment=? AND purpose='repair'", (file_id, segment))
        return changed

    # ---------------------------------------------------------------- garbage

    def garbage(self, older_than: float, limit: int = 1000) -> list[GarbageRow]:
        """Garbage collectable now (since before ``older_than``), and not referenced by a live piece."""
        rows = self._read(
            """SELECT g.donor_id, g.piece_id, d.url, d.state FROM garbage g JOIN donors d ON d.donor_id=g.donor_id
               WHERE g.since < ? AND NOT EXISTS (
                   SELECT 1 FROM pieces p WHERE p.donor_id=g.donor_id AND p.piece_id=g.piece_id)
               AND NOT EXISTS (
                   SELECT 1 FROM reservations r WHERE r.donor_id=g.donor_id AND r.piece_id=g.piece_id)
               ORDER BY g.since LIMIT ?""",
            (older_than, limit),
        )
        return [GarbageRow(r["donor_id"], r["piece_id"], r["url"], r["state"]) for r in rows]

    def forget_garbage(self, items: Iterable[tuple[str, str]]) -> int:
        """Drop garbage rows ``(donor_id, piece_id)`` (deleted, or their donor is gone); frees their bytes."""
        n = 0
        with self._tx() as db:
            for donor_id, piece_id in items:
                row = db.execute("SELECT stored_bytes FROM garbage WHERE donor_id=? AND piece_id=?", (donor_id, piece_id)).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM garbage WHERE donor_id=? AND piece_id=?", (donor_id, piece_id))
                db.execute("UPDATE donors SET used_bytes=MAX(0, used_bytes-?) WHERE donor_id=?", (row["stored_bytes"], donor_id))
                n += 1
        return n

    def garbage_count(self) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM garbage")[0]["n"])

    # ---------------------------------------------------------------- audits

    def sample_pieces(self, count: int) -> list[PieceRow]:
        """Up to ``count`` random stored pieces on readable donors."""
        rows = self._read(
            f"""SELECT p.*, d.owner, d.url, d.state AS donor_state FROM pieces p JOIN donors d ON d.donor_id=p.donor_id
                WHERE p.state='stored' AND d.state IN {READABLE_STATES} ORDER BY random() LIMIT ?""",
            (count,),
        )
        return [_piece(r) for r in rows]

    def record_audit(self, donor_id: str, piece_id: str, outcome: str, reason: str, now: float) -> None:
        if outcome not in ("passed", "failed", "unreachable"):
            raise ValueError(f"audit outcome must be passed, failed or unreachable, got {outcome!r}")
        with self._tx() as db:
            db.execute("INSERT INTO audits(at, donor_id, piece_id, outcome, reason) VALUES (?,?,?,?,?)",
                       (now, donor_id, piece_id, outcome, reason[:500]))
            if outcome != "unreachable":
                column = "audits_passed" if outcome == "passed" else "audits_failed"
                db.execute(f"UPDATE donors SET {column}={column}+1, last_audit_at=? WHERE donor_id=?", (now, donor_id))

    def audits(self, since_id: int = 0, limit: int = 1000) -> list[tuple[int, float, str, str, str, str]]:
        """(audit_id, at, donor_id, piece_id, outcome, reason) after ``since_id``, oldest first."""
        rows = self._read("SELECT * FROM audits WHERE audit_id > ? ORDER BY audit_id LIMIT ?", (since_id, limit))
        return [(r["audit_id"], r["at"], r["donor_id"], r["piece_id"], r["outcome"], r["reason"]) for r in rows]

    # ---------------------------------------------------------------- accounting checks

    def charged_bytes(self) -> dict[str, int]:
        """donor -> bytes its pieces, reservations and garbage add up to (``used_bytes`` must equal it)."""
        rows = self._read(
            """SELECT donor_id, SUM(b) AS b FROM (
                   SELECT donor_id, stored_bytes AS b FROM pieces
                   UNION ALL SELECT donor_id, stored_bytes FROM reservations
                   UNION ALL SELECT donor_id, stored_bytes FROM garbage) GROUP BY donor_id"""
        )
        return {r["donor_id"]: int(r["b"]) for r in rows}


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        path=row["path"], type="file", size=row["size"], created_at=row["committed_at"] or row["created_at"],
        file_id=row["file_id"], profile=Profile(row["k"], row["n"], row["repair_at"]).name,
    )


def _piece(r: sqlite3.Row) -> PieceRow:
    return PieceRow(
        file_id=r["file_id"], segment=r["segment"], index=r["idx"], piece_id=r["piece_id"], donor_id=r["donor_id"],
        owner=r["owner"], url=r["url"], donor_state=r["donor_state"], state=r["state"], stored_bytes=r["stored_bytes"],
    )


def check_invariant_used_bytes(store: MetadataStore) -> None:
    """Raise StorageError if any donor's ``used_bytes`` differs from what its rows add up to."""
    charged = store.charged_bytes()
    for d in store.donors():
        if d.used_bytes != charged.get(d.donor_id, 0):
            raise StorageError(f"donor {d.donor_id} is charged {d.used_bytes} bytes, rows say {charged.get(d.donor_id, 0)}")

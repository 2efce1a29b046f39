"""The one way dgpt's SQLite files are opened and written (registry, storage metadata, overlay peers).

Each store keeps one connection in autocommit mode behind its own re-entrant lock and writes
in explicit ``BEGIN IMMEDIATE`` transactions: a writer takes the write lock up front, so two
processes on one file (a restarted control plane and its predecessor's last flush) wait
instead of failing mid-transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    """A WAL-mode connection in autocommit mode, usable from every thread (callers lock)."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    return db


@contextmanager
def immediate(db: sqlite3.Connection, lock: threading.RLock) -> Iterator[sqlite3.Connection]:
    """A write transaction under ``lock``: committed on success, rolled back on any exception."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

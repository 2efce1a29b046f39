"""Sealing and opening segments on every core: worker processes over shared-memory slots.

Erasure coding (pyeclib) and BLAKE3 hold the GIL, so threads cannot spread them over cores.
:class:`SegmentPool` starts ``workers`` processes once and a few fixed *slots* of shared
memory (files in ``/dev/shm``, unlinked as soon as they are created and handed to the
workers as open file descriptors, so nothing is left behind even if the client is killed).
A segment's stripes are split between the workers:

- **seal**: the parent copies the plaintext into a slot; each worker encrypts and encodes
  its stripes, writes the fragments straight into the pieces' places in the slot, and
  returns their leaf hashes; the parent uploads the pieces from the slot without a copy.
- **open**: the parent copies the k verified pieces into a slot; each worker decodes and
  decrypts its stripes into the slot's output area; the parent copies the plaintext out.

Slots are reused, so their pages are touched once. A slot is held until the caller releases
it (after uploading, or after copying the plaintext out). Work too big for a slot, or a
pool that cannot start, falls back to the inline path in the caller's thread; results are
byte-for-byte the same (tests check both paths).
"""

from __future__ import annotations

import logging
import mmap
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dgpt.exceptions import StorageError
from dgpt.storage import merkle
from dgpt.storage.codec import codec_for
from dgpt.storage.crypto import TAG_BYTES, StripeCipher
from dgpt.storage.segment import SEGMENT_BYTES, SealedSegment, SegmentLayout

log = logging.getLogger(__name__)

#: One slot holds a full segment's plaintext and its pieces at up to 3x overhead (every
#: default profile), plus fragment headers.
SLOT_BYTES = 4 * SEGMENT_BYTES + (8 << 20)

# --------------------------------------------------------------------------- worker side

_SLOTS: list[mmap.mmap] = []


def _worker_main(argv: list[str]) -> int:
    """``python -m dgpt.storage.pool READ_FD WRITE_FD SLOT_BYTES SLOT_FD...``: serve jobs until EOF."""
    from multiprocessing.connection import Connection

    rfd, wfd, size, slot_fds = int(argv[0]), int(argv[1]), int(argv[2]), [int(a) for a in argv[3:]]
    for fd in slot_fds:
        _SLOTS.append(mmap.mmap(fd, size))
        os.close(fd)
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    outbox.send(("ready", None))
    jobs: dict[str, Callable[..., Any]] = {"seal": _seal_stripes, "open": _open_stripes}
    while True:
        try:
            name, args = inbox.recv()
        except EOFError:
            return 0
        try:
            outbox.send(("ok", jobs[name](*args)))
        except Exception as exc:  # the parent raises it; the worker serves on
            outbox.send(("error", f"{type(exc).__name__}: {exc}"))


def _seal_stripes(slot: int, k: int, n: int, plain_bytes: int, stripe_plain: int, segment: int, key: bytes,
                  file_id: str, first: int, stop: int) -> list[list[bytes]]:
    """Seal stripes [first, stop) of the segment in ``slot``; returns their leaf hashes per piece."""
    view = memoryview(_SLOTS[slot])
    layout = SegmentLayout(k, n, plain_bytes, stripe_plain)
    codec = codec_for(k, n)
    cipher = StripeCipher(key, file_id)
    piece_bytes, leaf_bytes = layout.piece_bytes, layout.leaf_bytes
    out = _out_offset(plain_bytes)
    hashes: list[list[bytes]] = [[] for _ in range(n)]
    for j in range(first, stop):
        start = j * stripe_plain
        frags = codec.encode(cipher.seal(segment, j, view[start : start + layout.stripe_plain(j)]))
        for i, frag in enumerate(frags):
            dst = out + i * piece_bytes + j * leaf_bytes
            view[dst : dst + len(frag)] = frag
            hashes[i].append(merkle.leaf_hash(frag))
    return hashes


def _open_stripes(slot: int, k: int, n: int, plain_bytes: int, stripe_plain: int, segment: int, key: bytes,
                  file_id: str, indexes: list[int], span_start: int, span_len: int, first: int, stop: int) -> None:
    """Decode and decrypt stripes [first, stop) from the pieces in ``slot`` into its output area."""
    view = memoryview(_SLOTS[slot])
    layout = SegmentLayout(k, n, plain_bytes, stripe_plain)
    codec = codec_for(k, n)
    cipher = StripeCipher(key, file_id)
    out = _out_offset(len(indexes) * span_len)
    for j in range(first, stop):
        lo, hi = layout.fragment_span(j)
        frags = {idx: view[r * span_len + lo - span_start : r * span_len + hi - span_start]
                 for r, idx in enumerate(indexes)}
        sealed = codec.decode(frags)
        dst = out + j * stripe_plain
        plain = len(sealed) - TAG_BYTES
        cipher.decrypt_into(segment, j, sealed, view[dst : dst + plain])


def _out_offset(in_bytes: int) -> int:
    # Output starts on a page boundary after the input.
    return -(-in_bytes // mmap.PAGESIZE) * mmap.PAGESIZE


# --------------------------------------------------------------------------- parent side


@dataclass
class Slot:
    """A shared-memory slot lent to one seal or open; give it back with :meth:`release`."""

    index: int
    view: memoryview
    _pool: SegmentPool = field(repr=False)
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._give_back(self)


@dataclass(frozen=True)
class PooledSeal:
    """A sealed segment whose pieces live in a slot until :meth:`release`."""

    sealed: SealedSegment
    slot: Slot

    def release(self) -> None:
        self.slot.release()


def _arena_dir() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


class SegmentPool:
    """Worker processes that seal and open segments in shared memory, using every core."""

    def __init__(self, workers: int | None = None, slots: int = 2, slot_bytes: int = SLOT_BYTES) -> None:
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.slot_bytes = slot_bytes
        self._slot_count = slots
        self._lock = threading.Lock()
        self._free = threading.Semaphore(0)
        self._available: list[int] = []
        self._workers: list[_Worker] = []
        self._maps: list[mmap.mmap] = []
        self._broken = False
        self._pid = os.getpid()

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> bool:
        with self._lock:
            if self._workers and self._pid == os.getpid():
                return True
            if self._broken:
                return False
            fds: list[int] = []
            try:
                for _ in range(self._slot_count):
                    # Unlinked at once: the slots live only as long as the processes holding
                    # them, so nothing is left in /dev/shm even if this process is killed.
                    fd, path = tempfile.mkstemp(prefix="dgpt-slot-", dir=_arena_dir())
                    os.unlink(path)
                    fds.append(fd)
                    os.ftruncate(fd, self.slot_bytes)
                    self._maps.append(mmap.mmap(fd, self.slot_bytes))
                # Plain subprocesses, not multiprocessing: nothing re-imports the caller's
                # __main__, so scripts without a main guard (and Ray workers) are safe. The
                # slots reach them as inherited file descriptors.
                self._workers = [_Worker.start(fds, self.slot_bytes) for _ in range(self.workers)]
                for w in self._workers:
                    w.wait_ready()
                self._pid = os.getpid()
            except Exception as exc:  # no /dev/shm, no processes: the inline path still works
                log.warning("segment pool unavailable, sealing inline: %s", exc)
                self._broken = True
                for w in self._workers:
                    w.stop()
                self._workers = []
                for m in self._maps:
                    m.close()
                self._maps.clear()
                return False
            finally:
                for fd in fds:
                    os.close(fd)
            self._available = list(range(self._slot_count))
            for _ in range(self._slot_count):
                self._free.release()
            return True

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers = []
            for m in self._maps:
                try:
                    m.close()
                except BufferError:  # a caller still holds a view; the OS frees it at exit
                    pass
            self._maps.clear()

    def _run(self, jobs: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run one job per worker at once; results in job order."""
        assert len(jobs) <= len(self._workers)
        workers = self._workers[: len(jobs)]
        for w in workers:
            w.lock.acquire()
        try:
            for w, job in zip(workers, jobs, strict=True):
                w.send(job)
            results = [w.receive() for w in workers]
        except (EOFError, OSError) as exc:
            self._broken = True
            raise StorageError(f"a segment worker died: {exc}", hint="retry; the client now seals inline") from exc
        finally:
            for w in workers:
                w.lock.release()
        failed = [r for status, r in results if status != "ok"]
        if failed:
            raise StorageError(f"segment worker failed: {failed[0]}")
        return [r for _, r in results]

    def usable(self, needed_bytes: int) -> bool:
        """True if work needing ``needed_bytes`` of slot can run here."""
        return needed_bytes <= self.slot_bytes and not self._broken and self._start()

    def _take(self) -> Slot:
        self._free.acquire()
        with self._lock:
            index = self._available.pop()
        return Slot(index, memoryview(self._maps[index]), self)

    def _give_back(self, slot: Slot) -> None:
        slot.view.release()
        with self._lock:
            self._available.append(slot.index)
        self._free.release()

    def _split(self, stripes: range) -> list[range]:
        parts = min(self.workers, len(stripes))
        size = -(-len(stripes) // parts)
        return [range(s, min(s + size, stripes.stop)) for s in range(stripes.start, stripes.stop, size)]

    # ------------------------------------------------------------------ work

    def seal(self, file_key: bytes, file_id: str, k: int, n: int, segment: int, plaintext: memoryview,
             stripe_plain_bytes: int) -> PooledSeal:
        """Seal one segment on the workers; the pieces stay in the returned slot until released."""
        layout = SegmentLayout(k, n, len(plaintext), stripe_plain_bytes)
        slot = self._take()
        try:
            slot.view[: len(plaintext)] = plaintext
            results = self._run([
                ("seal", (slot.index, k, n, len(plaintext), stripe_plain_bytes, segment, file_key, file_id,
                          part.start, part.stop))
                for part in self._split(range(layout.stripes))
            ])
            hashes: list[list[bytes]] = [[] for _ in range(n)]
            for part_hashes in results:  # in stripe order
                for i, h in enumerate(part_hashes):
                    hashes[i].extend(h)
            out = _out_offset(len(plaintext))
            pb = layout.piece_bytes
            pieces = tuple((slot.view[out + i * pb : out + (i + 1) * pb],) for i in range(n))
            ids = tuple(merkle.piece_id_from_hashes(h, pb, layout.leaf_bytes) for h in hashes)
        except BaseException:
            slot.release()
            raise
        return PooledSeal(SealedSegment(layout, pieces, ids), slot)

    def open(self, file_key: bytes, file_id: str, layout: SegmentLayout, segment: int, stripes: range,
             pieces: Mapping[int, bytes | memoryview]) -> tuple[list[memoryview], Slot]:
        """Decode and decrypt ``stripes`` on the workers; returns per-stripe views into a slot."""
        chosen = sorted(pieces)[: layout.k]
        span_start, span_end = layout.piece_span(stripes)
        span = span_end - span_start
        slot = self._take()
        try:
            for r, idx in enumerate(chosen):
                slot.view[r * span : (r + 1) * span] = pieces[idx]
            self._run([
                ("open", (slot.index, layout.k, layout.n, layout.plain_bytes, layout.stripe_plain_bytes, segment,
                          file_key, file_id, chosen, span_start, span, part.start, part.stop))
                for part in self._split(stripes)
            ])
            out = _out_offset(len(chosen) * span)
            views = []
            for j in stripes:
                dst = out + j * layout.stripe_plain_bytes
                views.append(slot.view[dst : dst + layout.stripe_plain(j)])
        except BaseException:
            slot.release()
            raise
        return views, slot

    @staticmethod
    def open_bytes_needed(layout: SegmentLayout, stripes: range) -> int:
        lo, hi = layout.piece_span(stripes)
        return _out_offset(layout.k * (hi - lo)) + stripes.stop * layout.stripe_plain_bytes

    @staticmethod
    def seal_bytes_needed(layout: SegmentLayout) -> int:
        return _out_offset(layout.plain_bytes) + layout.n * layout.piece_bytes


class _Worker:
    """One worker process and the pipes to it."""

    def __init__(self, proc: subprocess.Popen[bytes], inbox: Any, outbox: Any) -> None:
        self.proc = proc
        self._to = outbox
        self._from = inbox
        self.lock = threading.Lock()

    @classmethod
    def start(cls, slot_fds: list[int], slot_bytes: int) -> _Worker:
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        argv = [sys.executable, "-m", "dgpt.storage.pool", str(to_child_r), str(from_child_w), str(slot_bytes),
                *map(str, slot_fds)]
        try:
            proc = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w, *slot_fds), stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        return cls(proc, Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        if not self._from.poll(timeout_s):
            raise StorageError(f"segment worker {self.proc.pid} did not start within {timeout_s:.0f}s")
        status, _ = self._from.recv()
        if status != "ready":
            raise StorageError(f"segment worker {self.proc.pid} failed to start")

    def send(self, job: tuple[str, tuple[Any, ...]]) -> None:
        self._to.send(job)

    def receive(self) -> tuple[str, Any]:
        return self._from.recv()  # type: ignore[no-any-return]

    def stop(self) -> None:
        for conn in (self._to, self._from):
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


_DEFAULT: SegmentPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SegmentPool:
    """The process-wide pool (started on first use)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SegmentPool()
        return _DEFAULT


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

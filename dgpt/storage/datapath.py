"""The client data path: seal and upload segments, fetch and open them, verified piece by piece.

Writes (:class:`FileWriter`): bytes accumulate into segments; each full segment is sealed
(encrypted, erasure-coded, hashed: :func:`~dgpt.storage.segment.seal_segment`) on the
caller's thread while the previous one uploads on the I/O pool, so CPU and network overlap.
A piece whose upload fails is placed again on another donor (up to :data:`UPLOAD_ATTEMPTS`
times); the commit then makes the file visible atomically. Any error aborts the write, so a
failed write leaves no visible file and its uploaded pieces become garbage.

Reads (:class:`FileReader`): for the stripes a range covers, fetch ``k + extra`` pieces in
parallel (data pieces first, so the systematic shortcut usually applies), verify each
against its id (whole pieces by their Merkle root; ranges leaf by leaf against the leaf
hashes, themselves checked against the root), and use the first ``k`` that verify; a
failed or corrupt fetch starts the next candidate. Corrupt or missing pieces are reported
so the repairer rebuilds them. The next segment's fetches start before the current one is
decoded.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

from dgpt.exceptions import (
    AuthError,
    DataUnavailable,
    DgptError,
    NotEnoughDonors,
    NotFound,
    PieceCorrupt,
    StorageError,
)
from dgpt.storage import merkle
from dgpt.storage.codec import Codec, codec_for
from dgpt.storage.crypto import StripeCipher
from dgpt.storage.models import (
    BadPiece,
    Entry,
    FileLayout,
    PieceLocation,
    PieceSpec,
    SegmentGrant,
    StoredPiece,
    WritePlan,
)
from dgpt.storage.pool import PooledSeal, SegmentPool, default_pool
from dgpt.storage.segment import SealedSegment, SegmentLayout, open_stripes, seal_segment
from dgpt.storage.service import MetadataClient
from dgpt.storage.transport import PieceTransport

#: Placement attempts per piece before a write gives up on it (the commit decides if enough landed).
UPLOAD_ATTEMPTS = 3
#: Renew read grants this long before they expire.
GRANT_MARGIN_S = 60.0
#: Segments at least this big are sealed and opened on the worker pool (every core); smaller
#: ones inline, where starting processes and copying into shared memory would cost more.
POOL_MIN_BYTES = 4 << 20
#: Leaf-hash lists kept per reader (one per piece touched by range reads; 2 KiB each for 64 leaves).
LEAF_CACHE = 4096


def default_extra_reads(k: int) -> int:
    """Pieces fetched beyond k: one per eight needed, at least one, so one slow or dead donor
    never stalls a read while a wide read does not fetch far more than it uses."""
    return max(1, -(-k // 8))


@dataclass
class ReadStats:
    """What reads did (for benchmarks and tests): fetches, failures, decodes avoided."""

    fetched: int = 0
    failed: int = 0
    corrupt: int = 0
    systematic: int = 0
    decoded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class StorageClient:
    """Reads and writes files of the storage tier; share one per process (it is thread-safe)."""

    def __init__(self, metadata: MetadataClient, transport: PieceTransport, io_workers: int = 16,
                 extra_reads: Callable[[int], int] = default_extra_reads, clock: Callable[[], float] = time.time,
                 pool: SegmentPool | None | str = "auto") -> None:
        """
        Args:
            metadata: the metadata service (in-process, actor proxy or REST client).
            transport: how to reach piece servers.
            io_workers: parallel piece transfers.
            extra_reads: pieces fetched beyond k, as a function of k.
            pool: worker processes for big segments: ``"auto"`` (the process-wide pool,
                started on first big segment), a pool, or ``None`` (always inline).
        """
        self.metadata = metadata
        self.transport = transport
        self._segment_pool = pool
        self.extra_reads = extra_reads
        self.clock = clock
        self.stats = ReadStats()
        self._leaves: OrderedDict[str, list[bytes]] = OrderedDict()
        self._leaves_lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="dgpt-storage-io")
        # Segment uploads wait on piece uploads; they run apart so they can never starve them.
        self._control = cf.ThreadPoolExecutor(max_workers=32, thread_name_prefix="dgpt-storage-upload")

    def close(self) -> None:
        self._control.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def pool_for(self, plain_bytes: int, needed_bytes: int) -> SegmentPool | None:
        """The worker pool if a segment of ``plain_bytes`` should use it (and fits a slot)."""
        if self._segment_pool is None or plain_bytes < POOL_MIN_BYTES:
            return None
        pool = default_pool() if isinstance(self._segment_pool, str) else self._segment_pool
        return pool if pool.usable(needed_bytes) else None

    def submit(self, fn: Callable[..., object], *args: object) -> cf.Future[object]:
        """Run one piece transfer on the I/O pool."""
        return self._pool.submit(fn, *args)

    def submit_control(self, fn: Callable[..., object], *args: object) -> cf.Future[object]:
        return self._control.submit(fn, *args)

    def leaf_cache_get(self, piece_id: str) -> list[bytes] | None:
        with self._leaves_lock:
            hashes = self._leaves.get(piece_id)
            if hashes is not None:
                self._leaves.move_to_end(piece_id)
            return hashes

    def leaf_cache_put(self, piece_id: str, hashes: list[bytes]) -> None:
        with self._leaves_lock:
            self._leaves[piece_id] = hashes
            while len(self._leaves) > LEAF_CACHE:
                self._leaves.popitem(last=False)

    # ------------------------------------------------------------------ writes

    def writer(self, path: str, overwrite: bool = True) -> FileWriter:
        return FileWriter(self, self.metadata.begin_write(path, overwrite))

    def write_bytes(self, path: str, data: bytes | memoryview, overwrite: bool = True) -> Entry:
        with self.writer(path, overwrite) as w:
            w.write(data)
        assert w.entry is not None
        return w.entry

    # ------------------------------------------------------------------ reads

    def reader(self, path: str) -> FileReader:
        return FileReader(self, self.metadata.open_read(path))

    def read_bytes(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        return self.reader(path).read(start, end)

    def copy(self, src: str, dst: str, overwrite: bool = True) -> Entry:
        """Copy a file (re-sealed under a new key: the copy shares no pieces with the original)."""
        reader = self.reader(src)
        with self.writer(dst, overwrite) as w:
            for chunk in reader.iter_segments():
                w.write(chunk)
        assert w.entry is not None
        return w.entry


class FileWriter:
    """One open write: feed bytes with :meth:`write`, then :meth:`close` commits (or :meth:`abort`)."""

    def __init__(self, client: StorageClient, plan: WritePlan) -> None:
        self.client = client
        self.plan = plan
        profile = plan.profile.profile()
        self.codec: Codec = codec_for(profile.k, profile.n)
        self.cipher = StripeCipher(plan.file_key, plan.file_id)
        self.entry: Entry | None = None
        self._buffer = bytearray()
        self._segment = 0
        self._size = 0
        self._stored: list[StoredPiece] = []
        self._inflight: list[tuple[cf.Future[object], PooledSeal | None]] = []
        self._closed = False

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise StorageError(f"write of {self.plan.path!r} is already closed")
        view = memoryview(data)
        seg_bytes = self.plan.segment_bytes
        try:
            while len(view):
                if not self._buffer and len(view) >= seg_bytes:
                    self._seal_and_send(view[:seg_bytes])  # a whole segment straight from the caller
                    view = view[seg_bytes:]
                    continue
                take = min(len(view), seg_bytes - len(self._buffer))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == seg_bytes:
                    self._seal_and_send(memoryview(self._buffer))
                    self._buffer = bytearray()
        except BaseException:
            self.abort()
            raise
        return len(data)

    def _seal_and_send(self, plaintext: memoryview) -> None:
        layout = SegmentLayout(self.codec.k, self.codec.n, len(plaintext), self.plan.stripe_plain_bytes)
        pool = self.client.pool_for(len(plaintext), SegmentPool.seal_bytes_needed(layout))
        pooled: PooledSeal | None = None
        if pool is not None:
            pooled = pool.seal(self.plan.file_key, self.plan.file_id, self.codec.k, self.codec.n, self._segment,
                               plaintext, self.plan.stripe_plain_bytes)
            sealed = pooled.sealed
        else:
            sealed = seal_segment(self.cipher, self.codec, self._segment, plaintext, self.plan.stripe_plain_bytes)
        self._size += len(plaintext)
        # At most one segment uploads while the next is sealed: bounded memory, overlapped CPU.
        try:
            self._drain(keep=0)
        except BaseException:
            if pooled is not None:
                pooled.release()
            raise
        fut = self.client.submit_control(self._upload_segment, self._segment, sealed, pooled)
        self._inflight.append((fut, pooled))
        self._segment += 1

    def _drain(self, keep: int) -> None:
        while len(self._inflight) > keep:
            fut, _ = self._inflight.pop(0)
            self._stored.extend(fut.result())  # type: ignore[arg-type]

    def _upload_segment(self, segment: int, sealed: SealedSegment, pooled: PooledSeal | None) -> list[StoredPiece]:
        try:
            return self._upload_pieces(segment, sealed)
        finally:
            if pooled is not None:
                pooled.release()

    def _upload_pieces(self, segment: int, sealed: SealedSegment) -> list[StoredPiece]:
        layout = sealed.layout
        specs = {
            i: PieceSpec(index=i, piece_id=sealed.piece_ids[i], piece_bytes=layout.piece_bytes, leaf_bytes=layout.leaf_bytes)
            for i in range(len(sealed.piece_ids))
        }
        todo = sorted(specs)
        failed_donors: list[str] = []
        stored: list[StoredPiece] = []
        for _ in range(UPLOAD_ATTEMPTS):
            if not todo:
                break
            try:
                placement = self.client.metadata.place_segment(
                    self.plan.write_id, segment, layout.plain_bytes, [specs[i] for i in todo], failed_donors or None
                )
            except NotEnoughDonors:
                if not stored:
                    raise
                break  # keep what landed; the commit says whether it is enough
            futures = {
                self.client.submit(self.client.transport.put, t.url, t.piece_id, sealed.pieces[t.index],
                                   layout.leaf_bytes, t.capability): t
                for t in placement.targets
            }
            todo = []
            for fut in cf.as_completed(futures):
                target = futures[fut]
                try:
                    fut.result()
                    stored.append(StoredPiece(segment=segment, index=target.index, donor_id=target.donor_id))
                except DgptError:
                    todo.append(target.index)
                    failed_donors.append(target.donor_id)
            todo.sort()
        return stored

    def close(self) -> Entry:
        """Seal what is buffered, wait for uploads, commit. Aborts the write on any error."""
        if self._closed:
            if self.entry is None:
                raise StorageError(f"write of {self.plan.path!r} was aborted")
            return self.entry
        try:
            if self._buffer:
                self._seal_and_send(memoryview(self._buffer))
                self._buffer = bytearray()
            self._drain(keep=0)
            self.entry = self.client.metadata.commit_write(self.plan.write_id, self._size, self._stored)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.entry

    def abort(self) -> None:
        """Drop the write; nothing becomes visible, uploaded pieces become garbage."""
        if self._closed:
            return
        self._closed = True
        for fut, pooled in self._inflight:
            if fut.cancel() and pooled is not None:
                pooled.release()  # it never ran, so it never gave its slot back
        for fut, _ in self._inflight:
            try:
                fut.result()
            except BaseException:  # noqa: S110 - the write is being abandoned anyway
                pass
        self._inflight.clear()
        try:
            self.client.metadata.abort_write(self.plan.write_id)
        except DgptError:
            pass  # expiry collects it


class FileReader:
    """Random-access reads of one committed file version (the one open when it was created)."""

    def __init__(self, client: StorageClient, layout: FileLayout) -> None:
        self.client = client
        self.layout = layout
        profile = layout.profile.profile()
        self.k = profile.k
        self.n = profile.n
        self.codec = codec_for(profile.k, profile.n)
        self.cipher = StripeCipher(layout.file_key, layout.file_id)
        self._grants: dict[int, SegmentGrant] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.layout.size

    def grant(self, segment: int, refresh: bool = False) -> SegmentGrant:
        """Read grant of ``segment`` (fetched with the next few, renewed before expiry)."""
        with self._lock:
            grant = self._grants.get(segment)
        if refresh or grant is None or grant.expires_at - self.client.clock() < GRANT_MARGIN_S:
            wanted = [segment] + [s.segment for s in self.layout.segments[segment + 1 : segment + 8]
                                  if s.segment not in self._grants]
            fresh = self.client.metadata.grant_read(self.layout.file_id, wanted)
            with self._lock:
                for g in fresh:
                    self._grants[g.segment] = g
                grant = self._grants[segment]
        return grant

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the file (``end`` clipped to its size).

        Raises:
            DataUnavailable: fewer than k pieces of a segment could be read.
        """
        stop = self.size if end is None else min(end, self.size)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if start >= stop:
            return b""
        parts = [chunk for seg in self._iter_range(start, stop) for chunk in seg]
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def iter_segments(self) -> Iterator[bytes]:
        """The whole file, one segment at a time."""
        if self.size:
            for chunks in self._iter_range(0, self.size):
                yield b"".join(chunks)

    def _iter_range(self, start: int, stop: int) -> Iterator[list[bytes | memoryview]]:
        parts = []
        for info in self.layout.segments:
            lo, hi = max(start, info.offset), min(stop, info.offset + info.plain_bytes)
            if lo < hi:
                parts.append((info.segment, lo - info.offset, hi - info.offset, info.plain_bytes))
        pending = self._start(*parts[0]) if parts else None
        for i, part in enumerate(parts):
            assert pending is not None
            current = pending
            # Fetch the next segment while this one is opened.
            pending = self._start(*parts[i + 1]) if i + 1 < len(parts) else None
            yield self._finish(current, part[1], part[2])

    def _start(self, segment: int, lo: int, hi: int, plain_bytes: int) -> HedgedFetch:
        layout = SegmentLayout(self.k, self.n, plain_bytes, self.layout.stripe_plain_bytes)
        return HedgedFetch(
            self.client, self.layout.file_id, segment, layout, layout.stripes_for(lo, hi),
            self.grant(segment).pieces, refresh=lambda: self.grant(segment, refresh=True).pieces,
        )

    def _finish(self, fetch: HedgedFetch, lo: int, hi: int) -> list[bytes | memoryview]:
        """The plaintext of ``[lo, hi)`` of the fetched segment, as per-stripe chunks."""
        pieces = fetch.result()
        self.client.stats.add(**({"systematic": 1} if all(i in pieces for i in range(self.k)) else {"decoded": 1}))
        plain = sum(fetch.layout.stripe_plain(j) for j in fetch.stripes)
        pool = self.client.pool_for(plain, SegmentPool.open_bytes_needed(fetch.layout, fetch.stripes))
        slot = None
        if pool is not None:
            views, slot = pool.open(self.layout.file_key, self.layout.file_id, fetch.layout, fetch.segment,
                                    fetch.stripes, pieces)
            chunks: list[bytes | memoryview] = list(views)
        else:
            chunks = list(open_stripes(self.cipher, self.codec, fetch.layout, fetch.segment, fetch.stripes, pieces))
        try:
            return self._trim(chunks, fetch, lo, hi, copy=slot is not None)
        finally:
            if slot is not None:
                slot.release()

    @staticmethod
    def _trim(chunks: list[bytes | memoryview], fetch: HedgedFetch, lo: int, hi: int,
              copy: bool) -> list[bytes | memoryview]:
        """Cut the stripes to ``[lo, hi)``; with ``copy``, into one new bytes (the slot goes back)."""
        stripe = fetch.layout.stripe_plain_bytes
        head = lo - fetch.stripes.start * stripe
        tail = (fetch.stripes.stop - 1) * stripe + len(chunks[-1]) - hi
        if head or tail:
            if len(chunks) == 1:
                chunks[0] = memoryview(chunks[0])[head : len(chunks[0]) - tail]
            else:
                chunks[0] = memoryview(chunks[0])[head:]
                chunks[-1] = memoryview(chunks[-1])[: len(chunks[-1]) - tail]
        return [b"".join(chunks)] if copy else chunks


def leaf_hashes(client: StorageClient, loc: PieceLocation, layout: SegmentLayout) -> list[bytes]:
    """The leaf hashes of a piece, checked against its id (cached: ids never change meaning)."""
    cached = client.leaf_cache_get(loc.piece_id)
    if cached is not None:
        return cached
    piece_bytes, leaf_bytes, blob = client.transport.leaves(loc.url, loc.piece_id, loc.capability)
    hashes = [blob[i : i + merkle.HASH_BYTES] for i in range(0, len(blob), merkle.HASH_BYTES)]
    if (piece_bytes, leaf_bytes) != (layout.piece_bytes, layout.leaf_bytes) or not hashes or \
            merkle.piece_id_from_hashes(hashes, piece_bytes, leaf_bytes) != loc.piece_id:
        raise PieceCorrupt(f"leaf hashes of piece {loc.piece_id[:16]}... from {loc.donor_id} do not match its id")
    client.leaf_cache_put(loc.piece_id, hashes)
    return hashes


def fetch_verified(client: StorageClient, loc: PieceLocation, layout: SegmentLayout, stripes: range) -> bytes:
    """The bytes of ``stripes`` in piece ``loc``, verified against its id.

    A whole piece is checked by recomputing its Merkle root; a range leaf by leaf against the
    piece's leaf hashes (themselves checked against the root).

    Raises:
        PieceCorrupt: the bytes do not match. Transport errors pass through.
    """
    lo, hi = layout.piece_span(stripes)
    transport = client.transport
    if lo == 0 and hi == layout.piece_bytes:
        data = transport.get(loc.url, loc.piece_id, loc.capability)
        if len(data) != layout.piece_bytes or merkle.piece_id(data, layout.leaf_bytes) != loc.piece_id:
            raise PieceCorrupt(f"piece {loc.piece_id[:16]}... from {loc.donor_id} does not match its id")
        return data
    hashes = leaf_hashes(client, loc, layout)
    data = transport.get(loc.url, loc.piece_id, loc.capability, lo, hi)
    if len(data) != hi - lo:
        raise PieceCorrupt(f"piece {loc.piece_id[:16]}... from {loc.donor_id} returned {len(data)} of {hi - lo} bytes")
    view = memoryview(data)
    for j in stripes:
        a, b = layout.fragment_span(j)
        if merkle.leaf_hash(view[a - lo : b - lo]) != hashes[j]:
            raise PieceCorrupt(f"leaf {j} of piece {loc.piece_id[:16]}... from {loc.donor_id} does not match its id")
    return data


class HedgedFetch:
    """Verified fetch of one segment's stripes from k + extra pieces at once; the first k good ones win.

    Data pieces are tried first (no decode if they all arrive), then parity, by index. A
    fetch that fails starts the next untried piece; a corrupt or missing piece is reported
    to the metadata service. When every candidate failed, the grant is renewed once
    (``refresh``: capabilities may have expired, donors may be back) before giving up.
    """

    def __init__(self, client: StorageClient, file_id: str, segment: int, layout: SegmentLayout, stripes: range,
                 locations: Sequence[PieceLocation], refresh: Callable[[], Sequence[PieceLocation]] | None = None,
                 exclude_donors: Collection[str] = ()) -> None:
        self.client = client
        self.file_id = file_id
        self.segment = segment
        self.layout = layout
        self.stripes = stripes
        self.k = layout.k
        self._refresh_fn = refresh
        self._futures: dict[cf.Future[object], PieceLocation] = {}
        self._errors: list[str] = []
        self._bad_donors: set[str] = set(exclude_donors)
        self._queue = self._order(locations, set())
        for _ in range(min(len(self._queue), self.k + client.extra_reads(self.k))):
            self._launch()

    def _order(self, locations: Sequence[PieceLocation], have: set[int]) -> list[PieceLocation]:
        return sorted((p for p in locations if p.index not in have and p.donor_id not in self._bad_donors),
                      key=lambda p: (p.index >= self.k, p.index))

    def _launch(self) -> bool:
        if not self._queue:
            return False
        loc = self._queue.pop(0)
        fut = self.client.submit(fetch_verified, self.client, loc, self.layout, self.stripes)
        self._futures[fut] = loc
        return True

    def _report(self, loc: PieceLocation, reason: str) -> None:
        try:
            self.client.metadata.report_bad([BadPiece(file_id=self.file_id, segment=self.segment, index=loc.index,
                                                      piece_id=loc.piece_id, donor_id=loc.donor_id, reason=reason[:500])])
        except DgptError:
            pass  # a report is advice; the auditor finds the piece too

    def result(self) -> dict[int, bytes]:
        """index -> verified bytes for exactly k pieces.

        Raises:
            DataUnavailable: fewer than k pieces could be read and verified.
        """
        stats = self.client.stats
        got: dict[int, bytes] = {}
        refreshed = self._refresh_fn is None
        try:
            while len(got) < self.k:
                if not self._futures and not self._launch():
                    if not refreshed:
                        refreshed = True
                        assert self._refresh_fn is not None
                        self._queue = self._order(self._refresh_fn(), set(got))
                        continue
                    raise DataUnavailable(
                        f"segment {self.segment} of file {self.file_id}: only {len(got)} of the {self.k} pieces "
                        f"needed could be read ({'; '.join(self._errors[-4:]) or 'no readable donors'})",
                        hint="donors holding this file are offline; retry later (the head repairs lost pieces)",
                    )
                done, _ = cf.wait(self._futures, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    loc = self._futures.pop(fut)
                    try:
                        got[loc.index] = fut.result()  # type: ignore[assignment]
                        stats.add(fetched=1)
                        continue
                    except PieceCorrupt as exc:
                        stats.add(failed=1, corrupt=1)
                        self._errors.append(f"{loc.donor_id}: corrupt")
                        self._bad_donors.add(loc.donor_id)
                        self._report(loc, str(exc))
                    except NotFound as exc:
                        stats.add(failed=1)
                        self._errors.append(f"{loc.donor_id}: missing")
                        self._bad_donors.add(loc.donor_id)
                        self._report(loc, f"missing: {exc.message}")
                    except AuthError:
                        stats.add(failed=1)
                        self._errors.append(f"{loc.donor_id}: capability refused")
                    except DgptError as exc:
                        stats.add(failed=1)
                        self._errors.append(f"{loc.donor_id}: {type(exc).__name__}")
                        self._bad_donors.add(loc.donor_id)
                    self._launch()
        finally:
            for fut in self._futures:
                fut.cancel()
        return dict(sorted(got.items())[: self.k]) if len(got) > self.k else got

"""Keeping pieces alive: the repair checker (pure), the repairer, graceful leave, audits, garbage.

**Checker** (:func:`endangered`): a segment needs repair when its *durable* pieces (stored,
not found bad, on donors that are not gone) fall to its profile's ``repair_at``, or when one
of its pieces was found bad (corrupt or missing: an integrity failure, not churn, so it is
not left to wait for the threshold). The most endangered go first: fewest durable pieces
beyond k (the losses it can still absorb), then fewest readable ones. Offline donors still
count as durable: a donor that sleeps at night comes back with its pieces; only the head
declaring it gone (a long silence) writes them off. Waiting for the threshold instead of
repairing every loss is what keeps repair traffic low under churn (Storj's lazy repair).

**Repairer** (:class:`Repairer`): fetches k verified pieces of the segment (the read path's
hedged fetch), rebuilds only the missing indexes stripe by stripe (no file key needed:
pieces are ciphertext), checks each rebuilt piece against the id it had, places it on a
donor and owner new to the segment, uploads, and commits all moves in one transaction.

**Graceful leave** (:meth:`Repairer.drain_donor`): the donor is marked ``leaving`` (no new
pieces, still readable and still counted), then each of its pieces is copied to a new donor
and the location switched atomically; only when none is left is it ``gone``. A segment
never loses a durable piece on the way.

**Audits** (:class:`Auditor`): random stored pieces; the donor must answer a random leaf
and its Merkle path, checked against the piece id. A wrong answer or a missing piece fails
the audit: the piece is marked bad (the repairer rebuilds it elsewhere) and the outcome goes
to an :class:`AuditSink` (the registry's reliability record, once wired). No answer is
"unreachable": an offline donor is not a cheat.

**Garbage** (:func:`collect_garbage`): deletes what writes, repairs and deletions left
behind, after the grace period, and forgets garbage on donors that are gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from dgpt.exceptions import DgptError, NotFound, PieceCorrupt, PieceServerUnreachable, StorageError
from dgpt.storage import merkle
from dgpt.storage.codec import codec_for
from dgpt.storage.datapath import HedgedFetch, StorageClient, fetch_verified
from dgpt.storage.metadata import SegmentCounts
from dgpt.storage.models import PieceSpec
from dgpt.storage.segment import rebuild_pieces
from dgpt.storage.service import AuditTask, StorageService

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- checker (pure)


def needs_repair(durable: int | IntArray, repair_at: int | IntArray) -> bool | npt.NDArray[np.bool_]:
    """True where a segment's durable pieces have fallen to its repair threshold (vectorises)."""
    return durable <= repair_at  # type: ignore[return-value]


def margin(durable: int | IntArray, k: int | IntArray) -> int | IntArray:
    """Pieces a segment can still lose before it is gone (negative: already lost)."""
    return durable - k  # type: ignore[return-value]


def endangered(counts: Iterable[SegmentCounts]) -> list[SegmentCounts]:
    """Segments that need repair, most endangered first (smallest margin, then fewest readable)."""
    due = [c for c in counts if needs_repair(c.durable, c.profile.repair_at) or c.bad > 0]
    return sorted(due, key=lambda c: (margin(c.durable, c.profile.k), c.readable - c.profile.k, c.file_id, c.segment))


def lost(counts: Iterable[SegmentCounts]) -> list[SegmentCounts]:
    """Segments with fewer than k durable pieces: their data is gone."""
    return [c for c in counts if c.durable < c.profile.k]


# --------------------------------------------------------------------------- repairer


@dataclass(frozen=True, slots=True)
class RepairOutcome:
    """What repairing (or moving) one segment did."""

    file_id: str
    segment: int
    rebuilt: tuple[int, ...]
    moved_to: tuple[str, ...]
    bytes_read: int
    bytes_written: int
    seconds: float


class Repairer:
    """Rebuilds missing pieces and moves pieces off leaving donors (runs on the head)."""

    def __init__(self, service: StorageService, client: StorageClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.client = client
        self._clock = clock

    def repair_segment(self, file_id: str, segment: int) -> RepairOutcome:
        """Rebuild every non-durable piece of one segment on new donors.

        Raises:
            DataUnavailable: fewer than k pieces are readable now (retry later).
            NotEnoughDonors: no new donor/owner has room.
            StorageError: a rebuilt piece does not match its recorded id.
        """
        started = self._clock()
        plan = self.service.plan_repair(file_id, segment)
        if not plan.missing:
            return RepairOutcome(file_id, segment, (), (), 0, 0, 0.0)
        layout = plan.layout
        whole = range(0, layout.stripes)
        sources = HedgedFetch(self.client, file_id, segment, layout, whole, plan.sources).result()
        rebuilt = rebuild_pieces(codec_for(layout.k, layout.n), layout, sources, list(plan.missing))
        specs = []
        for index, data in rebuilt.items():
            pid = merkle.piece_id(data, layout.leaf_bytes)
            known = plan.known_ids.get(index)
            if known is not None and known != pid:
                raise StorageError(f"rebuilt piece {index} of segment {segment} of {file_id} hashes to {pid[:16]}..., "
                                   f"not its recorded {known[:16]}...")
            specs.append(PieceSpec(index=index, piece_id=pid, piece_bytes=layout.piece_bytes, leaf_bytes=layout.leaf_bytes))
        targets = self.service.place_repair(file_id, segment, specs, minimum=1)
        futures = {
            self.client.submit(self.client.transport.put, t.url, t.piece_id, rebuilt[t.index], layout.leaf_bytes,
                               t.capability): t
            for t in targets
        }
        moved = []
        for fut in cf.as_completed(futures):
            t = futures[fut]
            try:
                fut.result()
                moved.append((t.index, t.donor_id))
            except DgptError as exc:
                log.warning("repair upload of piece %d of %s/%d to %s failed: %s", t.index, file_id, segment, t.donor_id, exc)
        self.service.commit_repair(file_id, segment, moved)
        return RepairOutcome(
            file_id, segment, tuple(sorted(i for i, _ in moved)), tuple(d for _, d in sorted(moved)),
            bytes_read=layout.piece_bytes * len(sources), bytes_written=layout.piece_bytes * len(moved),
            seconds=self._clock() - started,
        )

    def run_once(self, max_segments: int = 100) -> list[RepairOutcome]:
        """Repair up to ``max_segments`` endangered segments, most endangered first.

        One segment's failure (no readable sources, no room) is logged and skipped; the next
        pass retries it.
        """
        done = []
        for c in endangered(self.service.segment_counts())[:max_segments]:
            try:
                done.append(self.repair_segment(c.file_id, c.segment))
            except DgptError as exc:
                log.warning("repair of %s segment %d skipped: %s", c.path, c.segment, exc)
        return done

    def drain_donor(self, donor_id: str, on_moved: Callable[[RepairOutcome], None] | None = None) -> list[RepairOutcome]:
        """Gracefully move every piece off ``donor_id``, then mark it gone.

        Each piece is copied (verified) from the leaving donor, or rebuilt from the others if
        that fails, to a donor and owner new to its segment; the location switches atomically.

        Raises:
            NotEnoughDonors: some piece has nowhere to go; the donor stays ``leaving``
                (still serving) and the call can be retried when donors join.
        """
        self.service.set_donor_state(donor_id, "leaving")
        outcomes = []
        for p in self.service.pieces_on(donor_id):
            if p.state != "stored":
                continue  # a bad piece is repaired, not moved
            started = self._clock()
            piece_bytes, leaf_bytes = self.service.segment_spec(p.file_id, p.segment)
            spec = PieceSpec(index=p.index, piece_id=p.piece_id, piece_bytes=piece_bytes, leaf_bytes=leaf_bytes)
            (target,) = self.service.place_repair(p.file_id, p.segment, [spec], minimum=1)
            plan = self.service.plan_repair(p.file_id, p.segment)
            layout = plan.layout
            try:
                data = fetch_verified(self.client, self.service.grant_piece(p), layout, range(layout.stripes))
                read = layout.piece_bytes
            except DgptError as exc:
                log.info("copying piece %d of %s/%d off %s failed (%s); rebuilding it", p.index, p.file_id, p.segment,
                         donor_id, exc)
                others = [s for s in plan.sources if s.donor_id != donor_id]
                sources = HedgedFetch(self.client, p.file_id, p.segment, layout, range(layout.stripes), others).result()
                data = rebuild_pieces(codec_for(layout.k, layout.n), layout, sources, [p.index])[p.index]
                read = layout.piece_bytes * len(sources)
            self.client.transport.put(target.url, target.piece_id, data, leaf_bytes, target.capability)
            self.service.commit_repair(p.file_id, p.segment, [(p.index, target.donor_id)])
            outcome = RepairOutcome(p.file_id, p.segment, (p.index,), (target.donor_id,), read, layout.piece_bytes,
                                    self._clock() - started)
            outcomes.append(outcome)
            if on_moved is not None:
                on_moved(outcome)
        if not [p for p in self.service.pieces_on(donor_id) if p.state == "stored"]:
            self.service.set_donor_state(donor_id, "gone")
        return outcomes


# --------------------------------------------------------------------------- audits


@dataclass(frozen=True, slots=True)
class AuditResult:
    """One audit's outcome, in the shape the registry's reliability record takes."""

    donor_id: str
    piece_id: str
    outcome: str  # passed | failed | unreachable
    reason: str
    at: float


class AuditSink(Protocol):
    """Where audit outcomes go besides the metadata store (e.g. the registry's reliability record)."""

    def record(self, result: AuditResult) -> None: ...


class Auditor:
    """Challenges random pieces; a donor that fails has those pieces repaired elsewhere."""

    def __init__(self, service: StorageService, client: StorageClient, sink: AuditSink | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.client = client
        self.sink = sink
        self.rng = rng or random.Random()
        self._clock = clock

    def check(self, task: AuditTask) -> tuple[str, str]:
        """Send one challenge; returns (outcome, reason)."""
        count = merkle.leaf_count(task.piece_bytes, task.leaf_bytes)
        leaf_index = self.rng.randrange(count)
        nonce = secrets.token_hex(16)
        try:
            proof = self.client.transport.audit(task.url, task.piece_id, leaf_index, nonce, task.capability)
        except PieceServerUnreachable as exc:
            return "unreachable", exc.message
        except NotFound:
            return "failed", "piece missing"
        except DgptError as exc:
            return "failed", f"{type(exc).__name__}: {exc.message}"
        if proof.nonce != nonce or proof.piece_id != task.piece_id or proof.leaf_index != leaf_index:
            return "failed", "answer is for another challenge"
        if not merkle.verify_leaf(task.piece_id, task.piece_bytes, task.leaf_bytes, leaf_index, proof.leaf, proof.path):
            return "failed", f"leaf {leaf_index} does not match the piece id"
        return "passed", ""

    def run_once(self, count: int = 32, follow_up: int = 64) -> list[AuditResult]:
        """Audit up to ``count`` random pieces (in parallel) and record every outcome.

        A donor that fails one gets up to ``follow_up`` more of its pieces audited at once:
        rot or cheating on one disk rarely stops at one piece.
        """
        results = self._audit(self.service.audit_tasks(count))
        done = {r.piece_id for r in results}
        for donor_id in sorted({r.donor_id for r in results if r.outcome == "failed"}):
            more = [t for t in self.service.audit_tasks_on(donor_id, follow_up) if t.piece_id not in done]
            results += self._audit(more)
        return results

    def _audit(self, tasks: list[AuditTask]) -> list[AuditResult]:
        futures = {self.client.submit(self.check, t): t for t in tasks}
        results = []
        for fut in cf.as_completed(futures):
            task = futures[fut]
            outcome, reason = cast(tuple[str, str], fut.result())
            self.service.record_audit(task, outcome, reason)
            result = AuditResult(task.donor_id, task.piece_id, outcome, reason, self._clock())
            results.append(result)
            if self.sink is not None:
                try:
                    self.sink.record(result)
                except Exception:  # a sink must not stop audits
                    log.exception("audit sink failed on %s", result)
        return results


# --------------------------------------------------------------------------- garbage


@dataclass(frozen=True, slots=True)
class GarbageOutcome:
    writes_aborted: int
    deleted: int
    unreachable: int


def collect_garbage(service: StorageService, client: StorageClient, limit: int = 1000) -> GarbageOutcome:
    """Abort expired writes, then delete collectable garbage from its donors."""
    aborted, _ = service.expire()
    done: list[tuple[str, str]] = []
    unreachable = 0
    for batch in service.delete_batches(limit):
        for piece_id in batch.piece_ids:
            try:
                client.transport.delete(batch.url, piece_id, batch.capability)
                done.append((batch.donor_id, piece_id))
            except NotFound:
                done.append((batch.donor_id, piece_id))
            except (PieceServerUnreachable, PieceCorrupt, DgptError):
                unreachable += 1
    service.forget_garbage(done)
    return GarbageOutcome(aborted, len(done), unreachable)

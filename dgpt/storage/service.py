"""The metadata service: namespace, two-phase writes, read grants, repair and audit plans.

:class:`StorageService` is plain Python over a :class:`~dgpt.storage.metadata.MetadataStore`
and the cluster secret; the head wraps it in a Ray actor (for Ray tasks on the fabric) and
in REST endpoints (for the CLI and SDK). Clients see it only through the small
:class:`MetadataClient` protocol, whose arguments and answers are the pydantic models of
:mod:`dgpt.storage.models` (picklable, JSON-able), so the same data path works in-process,
through an actor handle, or over HTTP.

What it decides: the profile of a new file (by eligible donors, :func:`choose_profile`),
where each piece goes (:func:`~dgpt.storage.placement.place_pieces`), which capabilities a
client gets (only for the pieces it was just given), and when a write is visible (at
commit, atomically). What it never does: touch piece bytes. Repair, audits and garbage
collection move bytes in :mod:`dgpt.storage.repair`, using the plans made here.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from dgpt.exceptions import InvalidRequest, NotFound, StorageError, WriteConflict
from dgpt.storage import capability, crypto
from dgpt.storage.capability import Op
from dgpt.storage.codec import DEFAULT_PROFILES, Profile, choose_profile
from dgpt.storage.metadata import (
    DURABLE_STATES,
    READABLE_STATES,
    FileRow,
    MetadataStore,
    PieceRow,
    SegmentCounts,
)
from dgpt.storage.models import (
    BadPiece,
    DonorSpec,
    DonorStorageView,
    Entry,
    FileLayout,
    PieceLocation,
    PieceSpec,
    PieceTarget,
    ProfileSpec,
    SegmentGrant,
    SegmentPlacement,
    StoredPiece,
    WritePlan,
    check_path,
)
from dgpt.storage.piece_store import stored_bytes
from dgpt.storage.placement import Candidate, eligible_owners, place_pieces
from dgpt.storage.segment import SEGMENT_BYTES, STRIPE_PLAIN_BYTES, SegmentLayout

Clock = Callable[[], float]


class StorageOptions(BaseModel):
    """Knobs of the metadata service; the head maps its settings onto these."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    capability_ttl_s: float = Field(default=capability.DEFAULT_TTL_S, gt=0, le=capability.MAX_TTL_S,
                                    description="Life of each capability the service issues.")
    write_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 86_400,
                               description="An open write idle this long is aborted and its pieces collected.")
    gc_grace_s: float = Field(default=3600.0, ge=0, le=30 * 86_400,
                              description="Pieces of deleted or replaced files stay this long, for readers still on them.")
    segment_bytes: int = Field(default=SEGMENT_BYTES, ge=1, le=SEGMENT_BYTES, description="Plaintext bytes per segment.")
    stripe_plain_bytes: int = Field(default=STRIPE_PLAIN_BYTES, ge=1, le=STRIPE_PLAIN_BYTES,
                                    description="Plaintext bytes per stripe (range-read granularity).")
    profile: ProfileSpec | None = Field(default=None, description="Force one profile instead of choosing by fleet size.")


@runtime_checkable
class MetadataClient(Protocol):
    """What a storage client needs from the metadata service (in-process, Ray actor or REST)."""

    def info(self, path: str) -> Entry: ...

    def ls(self, path: str) -> list[Entry]: ...

    def find(self, path: str) -> list[Entry]: ...

    def mkdir(self, path: str, parents: bool = True, exist_ok: bool = False) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def delete(self, path: str) -> Entry: ...

    def rename(self, src: str, dst: str) -> Entry: ...

    def begin_write(self, path: str, overwrite: bool = True) -> WritePlan: ...

    def place_segment(self, write_id: str, segment: int, plain_bytes: int, pieces: list[PieceSpec],
                      exclude_donors: list[str] | None = None) -> SegmentPlacement: ...

    def commit_write(self, write_id: str, size: int, stored: list[StoredPiece]) -> Entry: ...

    def abort_write(self, write_id: str) -> None: ...

    def open_read(self, path: str) -> FileLayout: ...

    def grant_read(self, file_id: str, segments: list[int]) -> list[SegmentGrant]: ...

    def report_bad(self, reports: list[BadPiece]) -> None: ...


@dataclass(frozen=True, slots=True)
class RepairPlan:
    """What a repair of one segment needs: readable sources, the indexes to rebuild, known ids."""

    file_id: str
    segment: int
    profile: Profile
    layout: SegmentLayout
    sources: tuple[PieceLocation, ...]
    missing: tuple[int, ...]
    known_ids: dict[int, str]


@dataclass(frozen=True, slots=True)
class AuditTask:
    """One audit challenge to send: which piece, where, and how to check the answer."""

    file_id: str
    segment: int
    index: int
    piece_id: str
    donor_id: str
    url: str
    capability: str
    piece_bytes: int
    leaf_bytes: int


@dataclass(frozen=True, slots=True)
class DeleteBatch:
    """Garbage on one donor and the capability to delete it."""

    donor_id: str
    url: str
    piece_ids: tuple[str, ...]
    capability: str


def load_or_create_secret(path: Path) -> bytes:
    """The cluster storage secret kept in ``path`` (hex, owner-only), created on first use."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = crypto.new_secret()
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def _path(path: str, what: str = "path") -> str:
    try:
        return check_path(path, what)
    except ValueError as exc:
        raise InvalidRequest(str(exc), 400, hint="paths are '/'-separated names, like 'data/train.parquet'") from None


class StorageService:
    """The metadata service (implements :class:`MetadataClient`, plus the head's side)."""

    def __init__(self, store: MetadataStore, cluster_secret: bytes, options: StorageOptions | None = None,
                 clock: Clock = time.time) -> None:
        self.store = store
        self.options = options or StorageOptions()
        self._secret = cluster_secret
        self._wrap_key = crypto.wrapping_key(cluster_secret)
        self._clock = clock
        # The store remembers a fingerprint of the secret: a head restarted with another
        # secret would otherwise hand out keys that unwrap nothing.
        fingerprint = crypto.secret_fingerprint(cluster_secret)
        if store.set_meta_once("secret_fingerprint", fingerprint) != fingerprint:
            raise StorageError(
                f"the storage secret does not match the one {store.path} was created with",
                hint="start the head with the storage secret it had before (DGPT_HOME/storage/secret)",
            )

    # ------------------------------------------------------------------ donors (head side)

    def donor_key(self, donor_id: str) -> bytes:
        """``K_d`` for a donor: the head hands it to the donor agent at registration."""
        return crypto.donor_storage_key(self._secret, donor_id)

    def register_donor(self, spec: DonorSpec) -> None:
        self.store.upsert_donor(spec, self._clock())

    def set_donor_state(self, donor_id: str, state: str) -> None:
        """online / offline (transient) / leaving (migrate first) / gone (its pieces are lost)."""
        self.store.set_donor_state(donor_id, state, self._clock())

    def set_reliability(self, donor_id: str, reliability: float) -> None:
        self.store.set_reliability(donor_id, reliability)

    def donors(self) -> list[DonorStorageView]:
        return self.store.donors()

    def candidates(self) -> list[Candidate]:
        return self.store.candidates()

    def _cap(self, donor_id: str, ops: Sequence[Op], pieces: Sequence[str]) -> str:
        return capability.issue(self.donor_key(donor_id), donor_id, ops, pieces, self._clock(), self.options.capability_ttl_s)

    def admin_capability(self, donor_id: str, ops: Sequence[Op], pieces: Sequence[str] = ()) -> str:
        """A capability for the head's own maintenance (list, stats, delete)."""
        return self._cap(donor_id, ops, pieces)

    # ------------------------------------------------------------------ namespace

    def info(self, path: str) -> Entry:
        return self.store.info(_path(path))

    def ls(self, path: str) -> list[Entry]:
        return self.store.ls(_path(path))

    def find(self, path: str) -> list[Entry]:
        return self.store.find_files(_path(path))

    def mkdir(self, path: str, parents: bool = True, exist_ok: bool = False) -> None:
        self.store.mkdir(_path(path), self._clock(), parents, exist_ok)

    def rmdir(self, path: str) -> None:
        self.store.rmdir(_path(path))

    def delete(self, path: str) -> Entry:
        return self.store.delete_file(_path(path), self._clock())

    def rename(self, src: str, dst: str) -> Entry:
        return self.store.rename(_path(src, "src"), _path(dst, "dst"), self._clock())

    # ------------------------------------------------------------------ writes

    def choose_profile(self) -> Profile:
        """The profile a write started now gets."""
        if self.options.profile is not None:
            return self.options.profile.profile()
        return choose_profile(eligible_owners(self.store.candidates()), DEFAULT_PROFILES)

    def begin_write(self, path: str, overwrite: bool = True) -> WritePlan:
        """Open a write of ``path``: invisible until :meth:`commit_write`.

        Raises:
            InvalidRequest: bad path. WriteConflict: the path is a directory, under a file, or
            exists and not ``overwrite``. NotEnoughDonors: too few donors for any profile.
        """
        path = _path(path)
        profile = self.choose_profile()
        now = self._clock()
        file_id = uuid.uuid4().hex
        file_key = crypto.new_file_key()
        wrapped = crypto.wrap_file_key(self._wrap_key, file_key, file_id)
        expires_at = now + self.options.write_ttl_s
        self.store.begin_write(file_id, path, profile, self.options.segment_bytes, self.options.stripe_plain_bytes,
                               wrapped, overwrite, now, expires_at)
        return WritePlan(
            write_id=file_id, file_id=file_id, path=path, profile=ProfileSpec.of(profile),
            segment_bytes=self.options.segment_bytes, stripe_plain_bytes=self.options.stripe_plain_bytes,
            file_key=file_key, expires_at=expires_at,
        )

    def place_segment(self, write_id: str, segment: int, plain_bytes: int, pieces: list[PieceSpec],
                      exclude_donors: list[str] | None = None) -> SegmentPlacement:
        """Choose donors for a sealed segment's pieces and grant the uploads.

        Call it again with the indexes whose upload failed (and those donors excluded) to
        get new targets.

        Raises:
            InvalidRequest: sizes that do not match the profile's layout, duplicate or
                out-of-range indexes. WriteConflict: the write is not open.
            NotEnoughDonors: not enough distinct donors and owners with room.
        """
        row = self._write_row(write_id)
        profile = row.profile
        if segment < 0:
            raise InvalidRequest(f"segment must be >= 0, got {segment}", 400)
        if not 0 < plain_bytes <= row.segment_bytes:
            raise InvalidRequest(f"plain_bytes must be in 1..{row.segment_bytes}, got {plain_bytes}", 400)
        layout = SegmentLayout(profile.k, profile.n, plain_bytes, row.stripe_plain_bytes)
        indexes = [p.index for p in pieces]
        if not pieces or len(set(indexes)) != len(indexes) or max(indexes) >= profile.n:
            raise InvalidRequest(f"pieces must have distinct indexes in 0..{profile.n - 1}, got {indexes}", 400)
        for p in pieces:
            if (p.piece_bytes, p.leaf_bytes) != (layout.piece_bytes, layout.leaf_bytes):
                raise InvalidRequest(
                    f"piece {p.index}: piece_bytes={p.piece_bytes}, leaf_bytes={p.leaf_bytes} do not match the "
                    f"{profile.name} layout of {plain_bytes} bytes ({layout.piece_bytes}, {layout.leaf_bytes})", 400)
        excluded = set(exclude_donors or ())
        held = [(i, d, o) for i, d, o, _ in self.store.segment_donors(write_id, segment) if i not in indexes]
        need = stored_bytes(layout.piece_bytes, layout.leaf_bytes)
        chosen = place_pieces(
            self.store.candidates(), len(pieces), need, seed=f"{write_id}/{segment}",
            taken_donors=excluded | {d for _, d, _ in held}, taken_owners={o for _, _, o in held},
        )
        now = self._clock()
        self.store.add_segment(
            write_id, segment, plain_bytes, layout.piece_bytes, layout.leaf_bytes,
            [(p.index, p.piece_id, c.donor_id, need) for p, c in zip(pieces, chosen, strict=True)],
            now, now + self.options.write_ttl_s,
        )
        targets = [
            PieceTarget(index=p.index, piece_id=p.piece_id, donor_id=c.donor_id, url=c.url,
                        capability=self._cap(c.donor_id, [Op.PUT], [p.piece_id]))
            for p, c in zip(pieces, chosen, strict=True)
        ]
        return SegmentPlacement(segment=segment, targets=targets, profile_warning=profile.warning)

    def _write_row(self, write_id: str) -> FileRow:
        try:
            row = self.store.file_row(file_id=write_id)
        except NotFound:
            raise WriteConflict(f"write {write_id} is unknown, aborted or expired", hint="start the write again") from None
        if row.state != "open":
            raise WriteConflict(f"write {write_id} is already committed", hint="start a new write")
        return row

    def min_commit_pieces(self, profile: Profile) -> int:
        """Pieces each segment must have stored at commit: above the repair threshold."""
        return min(profile.n, profile.repair_at + 1)

    def commit_write(self, write_id: str, size: int, stored: list[StoredPiece]) -> Entry:
        """Make the write visible at its path (atomically replacing an older version)."""
        row = self._write_row(write_id)
        return self.store.commit_write(write_id, size, [(s.segment, s.index, s.donor_id) for s in stored],
                                       self.min_commit_pieces(row.profile), self._clock())

    def abort_write(self, write_id: str) -> None:
        self.store.abort_write(write_id, self._clock())

    # ------------------------------------------------------------------ reads

    def open_read(self, path: str) -> FileLayout:
        row = self.store.file_row(path=_path(path))
        key = crypto.unwrap_file_key(self._wrap_key, row.wrapped_key, row.file_id)
        return FileLayout(
            file_id=row.file_id, path=row.path or row.target_path, size=row.size, profile=ProfileSpec.of(row.profile),
            stripe_plain_bytes=row.stripe_plain_bytes, file_key=key, created_at=row.created_at,
            segments=self.store.segment_infos(row.file_id),
        )

    def _locations(self, rows: list[PieceRow], ops: Sequence[Op] = (Op.GET,)) -> list[PieceLocation]:
        return [
            PieceLocation(index=p.index, piece_id=p.piece_id, donor_id=p.donor_id, url=p.url,
                          capability=self._cap(p.donor_id, ops, [p.piece_id]))
            for p in rows
            if p.state == "stored" and p.donor_state in READABLE_STATES
        ]

    def grant_read(self, file_id: str, segments: list[int]) -> list[SegmentGrant]:
        """Readable piece locations of ``segments``, each with a read capability."""
        now = self._clock()
        out = []
        for seg in segments:
            row = self.store.segment(file_id, seg)
            out.append(SegmentGrant(segment=seg, plain_bytes=row.plain_bytes,
                                    pieces=self._locations(self.store.pieces(file_id, seg)),
                                    expires_at=now + self.options.capability_ttl_s))
        return out

    def report_bad(self, reports: list[BadPiece]) -> None:
        """Pieces a reader found corrupt or missing stop counting; the repairer rebuilds them."""
        for r in reports:
            self.store.mark_bad(r.file_id, r.segment, r.index, r.piece_id, r.donor_id, r.reason)

    # ------------------------------------------------------------------ health and repair (head side)

    def segment_counts(self) -> list[SegmentCounts]:
        return self.store.segment_counts()

    def plan_repair(self, file_id: str, segment: int) -> RepairPlan:
        """What rebuilding a segment needs: its readable pieces and the indexes not durable.

        An index is missing when its piece is bad, sits on a gone donor, or was never stored
        (a write may commit with fewer than n pieces).
        """
        row = self.store.file_row(file_id=file_id)
        seg = self.store.segment(file_id, segment)
        profile = row.profile
        layout = SegmentLayout(profile.k, profile.n, seg.plain_bytes, row.stripe_plain_bytes)
        rows = self.store.pieces(file_id, segment)
        durable = {p.index for p in rows if p.state == "stored" and p.donor_state in DURABLE_STATES}
        missing = tuple(i for i in range(profile.n) if i not in durable)
        return RepairPlan(file_id, segment, profile, layout, tuple(self._locations(rows)), missing,
                          {p.index: p.piece_id for p in rows})

    def place_repair(self, file_id: str, segment: int, pieces: list[PieceSpec], minimum: int = 1) -> list[PieceTarget]:
        """Reserve new donors for rebuilt (or moved) pieces of a committed segment and grant the uploads.

        Donors holding any piece of the segment, and owners of donors that are not gone,
        are excluded. Places as many as it can, at least ``minimum``.

        Raises:
            NotEnoughDonors: fewer than ``minimum`` donors of new owners have room.
        """
        seg = self.store.segment(file_id, segment)
        need = stored_bytes(seg.piece_bytes, seg.leaf_bytes)
        held = self.store.segment_donors(file_id, segment)
        chosen = place_pieces(
            self.store.candidates(), len(pieces), need, seed=f"{file_id}/{segment}/repair",
            taken_donors={d for _, d, _, _ in held}, taken_owners={o for _, _, o, st in held if st != "gone"},
            minimum=minimum,
        )
        placed = list(zip(pieces, chosen, strict=False))
        self.store.reserve_repair(file_id, segment, [(p.index, p.piece_id, c.donor_id, need) for p, c in placed],
                                  self._clock() + self.options.write_ttl_s)
        return [
            PieceTarget(index=p.index, piece_id=p.piece_id, donor_id=c.donor_id, url=c.url,
                        capability=self._cap(c.donor_id, [Op.PUT], [p.piece_id]))
            for p, c in placed
        ]

    def commit_repair(self, file_id: str, segment: int, moved: list[tuple[int, str]]) -> int:
        """Point rebuilt or moved pieces ``(index, new donor_id)`` at their new copies, atomically."""
        return self.store.commit_repair(file_id, segment, moved, self._clock())

    def grant_piece(self, piece: PieceRow, ops: Sequence[Op] = (Op.GET,)) -> PieceLocation:
        """A capability for one piece where it is now (e.g. on a leaving donor, to copy it)."""
        return PieceLocation(index=piece.index, piece_id=piece.piece_id, donor_id=piece.donor_id, url=piece.url,
                             capability=self._cap(piece.donor_id, ops, [piece.piece_id]))

    def pieces_on(self, donor_id: str) -> list[PieceRow]:
        return self.store.pieces_on_donor(donor_id)

    def segment_spec(self, file_id: str, segment: int) -> tuple[int, int]:
        """(piece_bytes, leaf_bytes) of a segment's pieces."""
        seg = self.store.segment(file_id, segment)
        return seg.piece_bytes, seg.leaf_bytes

    # ------------------------------------------------------------------ audits (head side)

    def audit_tasks(self, count: int) -> list[AuditTask]:
        """Up to ``count`` random stored pieces on readable donors, with audit capabilities."""
        tasks = []
        for p in self.store.sample_pieces(count):
            seg = self.store.segment(p.file_id, p.segment)
            tasks.append(AuditTask(p.file_id, p.segment, p.index, p.piece_id, p.donor_id, p.url,
                                   self._cap(p.donor_id, [Op.AUDIT], [p.piece_id]), seg.piece_bytes, seg.leaf_bytes))
        return tasks

    def audit_tasks_on(self, donor_id: str, limit: int) -> list[AuditTask]:
        """Audit tasks for up to ``limit`` stored pieces of one donor (follow-up on a failure)."""
        tasks = []
        for p in self.store.pieces_on_donor(donor_id)[:limit]:
            if p.state != "stored":
                continue
            seg = self.store.segment(p.file_id, p.segment)
            tasks.append(AuditTask(p.file_id, p.segment, p.index, p.piece_id, p.donor_id, p.url,
                                   self._cap(p.donor_id, [Op.AUDIT], [p.piece_id]), seg.piece_bytes, seg.leaf_bytes))
        return tasks

    def record_audit(self, task: AuditTask, outcome: str, reason: str = "") -> None:
        """Record an audit; a failed one marks the piece bad, so the repairer rebuilds it."""
        self.store.record_audit(task.donor_id, task.piece_id, outcome, reason, self._clock())
        if outcome == "failed":
            self.store.mark_bad(task.file_id, task.segment, task.index, task.piece_id, task.donor_id,
                                f"failed audit: {reason}")

    # ------------------------------------------------------------------ garbage (head side)

    def expire(self) -> tuple[int, int]:
        """Abort expired writes and repair reservations (their pieces become garbage)."""
        return self.store.expire(self._clock())

    def delete_batches(self, limit: int = 1000) -> list[DeleteBatch]:
        """Garbage past the grace period, grouped per online donor, with delete capabilities.

        Garbage on ``gone`` donors is forgotten here: nobody will ever read or free it.
        """
        rows = self.store.garbage(self._clock() - self.options.gc_grace_s, limit)
        self.store.forget_garbage((g.donor_id, g.piece_id) for g in rows if g.donor_state == "gone")
        by_donor: dict[str, list[str]] = {}
        urls: dict[str, str] = {}
        for g in rows:
            if g.donor_state in READABLE_STATES:
                by_donor.setdefault(g.donor_id, []).append(g.piece_id)
                urls[g.donor_id] = g.url
        batches = []
        for donor_id, ids in by_donor.items():
            for i in range(0, len(ids), capability.MAX_PIECES):
                chunk = tuple(ids[i : i + capability.MAX_PIECES])
                batches.append(DeleteBatch(donor_id, urls[donor_id], chunk, self._cap(donor_id, [Op.DELETE], chunk)))
        return batches

    def forget_garbage(self, items: list[tuple[str, str]]) -> int:
        return self.store.forget_garbage(items)

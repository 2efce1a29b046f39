"""The storage tier on the head: its metadata service, its upkeep, and the fleet mapped onto it.

The control plane owns one :class:`HeadStorage`. It holds the metadata service
(:class:`~dgpt.storage.service.StorageService` over ``$DGPT_HOME/head/storage``: SQLite and
the cluster secret, reloaded after a restart), a storage client for the head's own byte
moves (REST uploads and downloads, repair, audits, garbage), and the mapping from the
registry's donors to the tier:

- a donor that registers with a piece server (``storage_url``) and disk is registered with
  the tier, and gets its capability key ``K_d`` in the answer;
- :func:`storage_states` (pure) maps the registry's view to storage states each upkeep
  round: any live lifecycle state is ``online``; a donor the registry counts as ``gone``
  (silent past its heartbeat timeout) is ``offline`` (its pieces stay counted, it may come
  back), and after ``storage_lost_after_s`` of silence ``gone`` (its pieces are written off
  and the repairer rebuilds them elsewhere);
- a donor that leaves for good asks :meth:`HeadStorage.leave` first, which migrates its
  pieces (:meth:`~dgpt.storage.repair.Repairer.drain_donor`) while it still serves them.

:meth:`HeadStorage.upkeep` runs the repair checker and repairer, a round of audits, and
garbage collection; the control plane calls it every ``storage_repair_interval_s`` in a
thread of its own (one slow repair does not hold heartbeats up).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dgpt.config import Settings
from dgpt.contract import DonorState
from dgpt.exceptions import ConfigError, DgptError, NotEnoughDonors, NotFound
from dgpt.sdk.models import DonorView, RegisterRequest
from dgpt.sdk.storage import (
    FileDurability,
    StorageDonor,
    StorageEntry,
    StorageLeaveResponse,
    StorageStatus,
)
from dgpt.storage import rpc
from dgpt.storage.datapath import FileReader, StorageClient
from dgpt.storage.metadata import MetadataStore, SegmentCounts
from dgpt.storage.models import DonorSpec, Entry
from dgpt.storage.placement import audit_trust, eligible_owners
from dgpt.storage.repair import Auditor, Repairer, collect_garbage, endangered, lost
from dgpt.storage.service import StorageOptions, StorageService, load_or_create_secret
from dgpt.storage.transport import HttpTransport

log = logging.getLogger("dgpt.storage")

#: A donor's reliability is written to the tier when it moved by at least this much:
#: placement ranks by it, and a smaller change is noise in the fit.
RELIABILITY_STEP = 0.02


def storage_options(settings: Settings) -> StorageOptions:
    """The metadata service's options for these settings.

    Raises:
        ConfigError: a value the storage tier refuses; names the setting.
    """
    mapping = {"capability_ttl_s": "storage_capability_ttl_s", "gc_grace_s": "storage_gc_grace_s"}
    values = {field: getattr(settings, setting) for field, setting in mapping.items()}
    try:
        return StorageOptions(**values)
    except ValidationError as exc:
        errors = exc.errors()
        named = "; ".join(f"{mapping.get(str(e['loc'][0]), e['loc'][0])}={values.get(str(e['loc'][0]))!r}: {e['msg']}"
                          for e in errors if e.get("loc")) or str(exc)
        raise ConfigError(f"invalid storage setting: {named}", hint="fix the setting (see `dgpt config`)") from None


def storage_states(donors: Iterable[DonorView], current: Mapping[str, str], now: float,
                   lost_after_s: float) -> dict[str, str]:
    """The storage state each known donor should be in now, for those whose state changes.

    Args:
        donors: the registry's view of the donors.
        current: donor id -> its storage state now (only donors the tier knows).
        lost_after_s: silence after which a donor's pieces are written off.
    """
    out: dict[str, str] = {}
    for d in donors:
        state = current.get(d.donor_id)
        if state is None or state == "gone":
            continue  # unknown to the tier; a gone donor comes back only by registering again
        silent_s = now - (d.last_heartbeat_at or d.registered_at)
        if d.state is DonorState.GONE:
            want = "gone" if silent_s >= lost_after_s else ("leaving" if state == "leaving" else "offline")
        else:
            want = "leaving" if state == "leaving" else "online"
        if want != state:
            out[d.donor_id] = want
    return out


def durability(counts: list[SegmentCounts]) -> tuple[int, int, str]:
    """(fewest durable, fewest readable, state) over one file's segments."""
    profile = counts[0].profile
    durable = min(c.durable for c in counts)
    readable = min(c.readable for c in counts)
    if durable < profile.k:
        state = "lost"
    elif readable < profile.k:
        state = "unreadable"
    elif durable <= profile.repair_at or any(c.bad for c in counts):
        state = "repair due"
    else:
        state = "healthy"
    return durable, readable, state


def entry_view(e: Entry) -> StorageEntry:
    return StorageEntry(path=e.path, type=e.type, size=e.size, created_at=e.created_at, file_id=e.file_id,
                        profile=e.profile)


@dataclass(frozen=True)
class UpkeepOutcome:
    repaired: int
    audited: int
    audits_failed: int
    garbage_deleted: int


class HeadStorage:
    """The storage tier's head side (see the module docstring). Thread-safe."""

    def __init__(self, settings: Settings, folder: Path, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.folder = folder
        self.clock = clock
        options = storage_options(settings)
        folder.mkdir(parents=True, exist_ok=True)
        self.service = StorageService(MetadataStore(folder / "metadata.sqlite"), load_or_create_secret(folder / "secret"),
                                      options, clock=clock)
        # The head seals and opens segments inline: its worker pool would be processes of
        # the control-plane actor, which Ray restarts on its own.
        self.client = StorageClient(self.service, HttpTransport(connect_timeout_s=2.0, timeout_s=60.0), io_workers=16,
                                    pool=None)
        self.repairer = Repairer(self.service, self.client)
        self.auditor = Auditor(self.service, self.client)
        self._reliability: dict[str, float] = {}
        # One leave (migration) at a time per donor; upkeep never runs beside a leave.
        self._upkeep = threading.Lock()

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------ donors

    def register(self, donor_id: str, req: RegisterRequest) -> str | None:
        """Register a donor's piece server with the tier; its capability key (hex), or None.

        A donor that offers no disk or runs no piece server is not part of the tier.
        """
        if not req.storage_url or req.caps.disk_bytes <= 0:
            return None
        # Its reliability starts at the prior; the next sync writes the registry's fit.
        self.service.register_donor(DonorSpec(donor_id=donor_id, owner=req.owner, url=req.storage_url,
                                              capacity_bytes=req.caps.disk_bytes, reliability=0.5))
        self._reliability.pop(donor_id, None)
        log.info("donor %s serves the storage tier at %s (%.1f GiB)", donor_id, req.storage_url,
                 req.caps.disk_bytes / 2**30)
        return self.service.donor_key(donor_id).hex()

    def donor_ids(self) -> list[str]:
        """The donors the tier knows (any storage state)."""
        return [d.donor_id for d in self.service.donors()]

    def sync(self, donors: Iterable[DonorView]) -> dict[str, str]:
        """Apply the registry's view: storage states (:func:`storage_states`), and the
        reliability pieces are placed by: the donor's own times its audits' trust
        (:func:`audit_trust`), so a donor that fails audits gets fewer new pieces."""
        views = list(donors)
        stored = {d.donor_id: d for d in self.service.donors()}
        current = {d.donor_id: d.state for d in stored.values()}
        changes = storage_states(views, current, self.clock(), self.settings.storage_lost_after_s)
        for donor_id, state in changes.items():
            log.info("storage: donor %s is %s", donor_id, state)
            self.service.set_donor_state(donor_id, state)
        for d in views:
            if d.donor_id in stored and d.reliability is not None:
                s = stored[d.donor_id]
                value = d.reliability * audit_trust(s.audits_passed, s.audits_failed)
                if abs(self._reliability.get(d.donor_id, -1.0) - value) >= RELIABILITY_STEP:
                    self.service.set_reliability(d.donor_id, value)
                    self._reliability[d.donor_id] = value
        return changes

    def leave(self, donor_id: str) -> StorageLeaveResponse:
        """Move every piece off a donor that leaves for good, then mark it gone.

        Pieces that find no new donor stay where they are (the donor stays ``leaving``,
        still serving and counted); ``remaining`` says how many, and the call can be repeated.

        Raises:
            NotFound: the tier does not know the donor.
        """
        known = {d.donor_id: d for d in self.service.donors()}
        if donor_id not in known:
            raise NotFound(f"donor {donor_id} holds no part of the storage tier", 404)
        with self._upkeep:
            message = ""
            try:
                moved = len(self.repairer.drain_donor(donor_id))
            except (NotEnoughDonors, DgptError) as exc:
                moved, message = 0, exc.message
                log.warning("storage: moving donor %s's pieces stopped: %s", donor_id, exc.message)
        remaining = len([p for p in self.service.pieces_on(donor_id) if p.state == "stored"])
        state = next(d.state for d in self.service.donors() if d.donor_id == donor_id)
        log.info("storage: donor %s leaving: %d piece(s) moved, %d left", donor_id, moved, remaining)
        return StorageLeaveResponse(donor_id=donor_id, moved=moved, remaining=remaining, state=state, message=message)

    # ------------------------------------------------------------ upkeep

    def upkeep(self) -> UpkeepOutcome:
        """One round: repair what is endangered, audit a sample, collect garbage."""
        with self._upkeep:
            repaired = self.repairer.run_once()
            audits = self.auditor.run_once(self.settings.storage_audits_per_round) \
                if self.settings.storage_audits_per_round else []
            garbage = collect_garbage(self.service, self.client)
        failed = sum(1 for a in audits if a.outcome == "failed")
        if repaired or failed:
            log.info("storage upkeep: %d segment(s) repaired, %d of %d audits failed", len(repaired), failed, len(audits))
        return UpkeepOutcome(len(repaired), len(audits), failed, garbage.deleted)

    # ------------------------------------------------------------ what clients call

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        """One metadata call (:mod:`dgpt.storage.rpc`) from a client of the tier."""
        return rpc.dispatch(self.service, method, kwargs)

    def call_as_value(self, method: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
        """:meth:`call` with errors as values (``("error", exc)``), for the Ray actor."""
        try:
            return "ok", self.call(method, kwargs)
        except DgptError as exc:
            return "error", exc

    def write(self, path: str, chunks: Iterator[bytes], overwrite: bool = True) -> StorageEntry:
        """Write a file from ``chunks``: visible at the end, atomically; nothing if it fails."""
        writer = self.client.writer(path, overwrite=overwrite)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return entry_view(writer.close())

    def reader(self, path: str) -> FileReader:
        return self.client.reader(path)

    def ls(self, path: str) -> list[StorageEntry]:
        return [entry_view(e) for e in self.service.ls(path)]

    def info(self, path: str) -> StorageEntry:
        return entry_view(self.service.info(path))

    def remove(self, path: str, recursive: bool = False) -> list[StorageEntry]:
        """Delete a file, or a directory (its files too with ``recursive``)."""
        entry = self.service.info(path)
        if entry.type == "file":
            return [entry_view(self.service.delete(path))]
        removed = [entry_view(self.service.delete(f.path)) for f in self.service.find(path)] if recursive else []
        self.service.rmdir(path)
        return removed

    def status(self) -> StorageStatus:
        by_file: dict[str, list[SegmentCounts]] = {}
        counts = self.service.segment_counts()
        for c in counts:
            by_file.setdefault(c.file_id, []).append(c)
        files = []
        for e in self.service.find(""):
            segs = by_file.get(e.file_id or "")
            if not segs:
                continue
            p = segs[0].profile
            durable, readable, state = durability(segs)
            files.append(FileDurability(path=e.path, file_id=e.file_id or "", size=e.size, profile=p.name, k=p.k, n=p.n,
                                        repair_at=p.repair_at, segments=len(segs), min_durable=durable,
                                        min_readable=readable, losses_tolerated=durable - p.k, state=state))  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                profile = self.service.choose_profile()
                name, warning = profile.name, profile.warning
            except NotEnoughDonors as exc:
                name, warning = None, exc.message
        donors = [StorageDonor(**d.model_dump()) for d in self.service.donors()]
        return StorageStatus(files=files, repair_backlog=len(endangered(counts)), lost_segments=len(lost(counts)),
                             eligible_donors=eligible_owners(self.service.candidates()), profile=name,
                             profile_warning=warning, donors=donors)

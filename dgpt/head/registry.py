"""The registry: the live fleet in memory, its lifecycle applied, every change stored.

It owns the donors' records. Each is loaded once from SQLite when the control plane
starts; after that, heartbeats are answered from memory, and every lifecycle change is
written to SQLite (``dgpt.head.store``) before it is acted on, so killing the control plane
loses no record. Only heartbeat times are batched, since a restart gives every donor a
fresh timeout anyway. Reliability fits are cached per donor and refitted when one of its
sessions ends; the fleet view that placement and the autoscaler read is maintained
incrementally (``dgpt.head.fleet_index``). Nothing here imports Ray: the Ray adapter is
injected, so unit tests drive the registry on a real SQLite file with a fake adapter.

Donors behind NAT join through the WireGuard overlay (``dgpt.overlay``), injected as an
``OverlayPort``: a donor that offers a key gets an overlay address when it registers; the
preflight tries its own address first (*direct*), then its overlay address (*relayed*), and
a relayed donor is told to run Ray at its overlay address, with the head's GCS at the head's
overlay address. Revoking a donor's join token takes it off the overlay at once.

Standby donors long-poll: their heartbeat may be held open until the autoscaler activates
them (``on_wake``), so an activation reaches a waiting donor at once. Their interval is
chosen by the head so the whole standby fleet costs at most ``STANDBY_BEATS_PER_S``.

A donor's owner (with its secret) or an operator (with an API key) can pause it on the head:
it drains through the usual path (its session ends ``drained``, reason ``paused``), leaves the
fleet view the autoscaler reads, and stays out until resumed; the pause is stored with its
lifecycle, so it survives a head restart. For the pages, the registry also keeps the fleet by
state over time (``fleet_history``) and the latest ended sessions, both bounded and both
stored (the samples by the monitor's tick), so a restarted head shows them from before.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dgpt import contract
from dgpt.config import Settings
from dgpt.contract import AgentState, DonorState, HeartbeatAction, LeaveReason, PausedBy, Target
from dgpt.exceptions import AuthError, Conflict, InvalidRequest, NotFound, OverlayError
from dgpt.fleet import FleetDonor, FleetView
from dgpt.head.fleet_index import FleetIndex, Role
from dgpt.head.grants import grant_problem
from dgpt.head.lifecycle import (
    Event,
    Heartbeat,
    LeaveRequested,
    Lifecycle,
    NodeAlive,
    NodeDead,
    Outcome,
    Paused,
    Registered,
    Resumed,
    Silent,
    TargetSet,
    step,
)
from dgpt.head.ray_adapter import DRAIN_IDLE, DRAIN_PREEMPTION, NodeUsage, RayNode
from dgpt.head.store import DonorRow, RegistryStore, hash_secret
from dgpt.netaddr import Reachability, tcp_reachable
from dgpt.reliability.model import WeibullParams, fit_recorded, fit_recorded_many
from dgpt.resources import Resources
from dgpt.sdk.models import (
    DeviceProfile,
    DonorCaps,
    DonorView,
    FleetSessionView,
    HeartbeatResponse,
    LeaveRequest,
    LeaveResponse,
    OverlayGrant,
    OverlayOffer,
    PauseResponse,
    RayJoin,
    RegisterRequest,
    RegisterResponse,
    RogueNodeView,
    SessionView,
    TokenView,
    VerificationView,
)
from dgpt.sdk.models import Heartbeat as HeartbeatRequest

log = logging.getLogger("dgpt.registry")

#: Sessions kept in memory per donor: enough for a reliability fit that the prior does not
#: dominate, few enough that 100k donors fit in a few hundred MB.
SESSIONS_KEPT = 20
#: Dead Ray nodes remembered per donor (the GCS may list one alive for a health-check period).
RETIRED_NODES_KEPT = 8
#: A donor's node may outlive its session this long (a drained raylet stopping) before it
#: counts as running without one. Claims beyond a grant are flagged at once.
ROGUE_GRACE_S = 30.0
#: Rogue nodes listed at most (the oldest are dropped from the list, not forgiven).
ROGUE_KEPT = 100
#: How long a flagged node stays listed after it left Ray (drained nodes leave within seconds).
ROGUE_GONE_KEPT_S = 600.0
#: Heartbeats per second the whole standby fleet may cost the head. Standby donors stretch
#: their interval to stay within it (never below ``standby_heartbeat_interval_s``).
STANDBY_BEATS_PER_S = 500.0
#: The longest interval a standby donor is given, whatever the fleet size.
MAX_STANDBY_INTERVAL_S = 600.0
#: After a held heartbeat is answered, the donor sends the next one this soon.
REPOLL_S = 0.5
#: Heartbeats of this payload version and later may be held (older agents do not long-poll).
LONG_POLL_VERSION = 2
#: Routers take a donor out of rotation once it misses this many heartbeat intervals.
SUSPECT_AFTER_INTERVALS = 2.5
#: Serve routers rank replicas by P(their donor stays this long): a request's horizon is
#: short, but a replica that leaves costs its in-flight requests and a cold replacement.
RELIABILITY_HORIZON_S = 3600.0
#: Heartbeat times are flushed to SQLite this often (informational: see module docstring).
HEARTBEAT_FLUSH_S = 10.0
#: A donor whose Ray ports the head could not reach is checked again this often.
PREFLIGHT_RECHECK_S = 300.0
#: The standby and activating columns of the fleet view are copied again when one of those
#: donors changes, else at most this often: at 100k donors a copy takes ~15 ms under the
#: lock, and the autoscaler and every driver placing work ask for a view. Heartbeats only
#: extend freshness; a donor that falls silent is expired by the monitor, which changes it.
STANDBY_VIEW_MAX_AGE_S = 2.0
#: How long a preflight waits for a donor's first overlay handshake: it brings its tunnel up
#: right after registering, which takes a second or two; a slow machine gets more.
OVERLAY_HANDSHAKE_WAIT_S = 15.0
#: The fleet by state is sampled when it changes, at most once per FLEET_SAMPLE_S, and the
#: last FLEET_SAMPLES_KEPT samples are kept: a churning fleet's plot reaches back 8 hours, a
#: quiet one's much further, in a few hundred KB whatever the fleet's size (in memory and in
#: the SQLite file's ``fleet_samples``).
FLEET_SAMPLE_S = 10.0
FLEET_SAMPLES_KEPT = 2880
#: Ended sessions kept for the fleet's list of recent drains and losses.
ENDED_SESSIONS_KEPT = 200

UNKNOWN_OR_WRONG = "unknown donor or wrong donor secret"


class RayPort(Protocol):
    """What the registry needs of Ray (``dgpt.head.ray_adapter.RayAdapter``, or a fake)."""

    def nodes(self) -> list[RayNode]: ...

    def drain_node(self, node_id: str, reason: str, message: str, deadline_s: float) -> tuple[bool, str]: ...


class OverlayPort(Protocol):
    """What the registry needs of the overlay (``dgpt.overlay.coordinator.OverlayCoordinator``)."""

    @property
    def head_address(self) -> str: ...

    def grant(self, donor_id: str, offer: OverlayOffer) -> OverlayGrant: ...

    def revoke(self, donor_id: str) -> bool: ...

    def address_of(self, donor_id: str) -> str | None: ...

    def handshake_at(self, donor_id: str) -> float | None: ...


@dataclass(frozen=True)
class Preflight:
    """The head's check that a donor's Ray ports answer, before it is told to start Ray.

    ``relayed``: they answered only at its overlay address (through the head's relay).
    """

    ok: bool
    checked_at: float
    problem: str = ""
    relayed: bool = False


@dataclass
class DonorEntry:
    """One donor in memory: its stored row plus what the registry derives from it."""

    row: DonorRow
    labels: dict[str, str]
    sessions: deque[SessionView]
    reliability: WeibullParams
    sessions_total: int = 0
    sessions_lost: int = 0
    uptime_closed_s: float = 0.0
    last_heartbeat_at: float | None = None
    # When the donor was last heard from, for its timeout: its last heartbeat, or the
    # control plane's start (a restart gives every donor a fresh timeout to reach it).
    heard_at: float = 0.0
    timeout_s: float = 30.0
    usage: NodeUsage | None = None
    secret_hash: str = field(default="", repr=False)
    # Preflight: the donor's Ray ports as the head reached them (None: not checked yet), and
    # what the agent reported it cannot reach. Either keeps the donor from being activated.
    reach: Preflight | None = None
    agent_problem: str | None = None
    # Its overlay address (None: not on the overlay), and whether its join token was revoked.
    overlay_ip: str | None = None
    revoked: bool = False
    # Its Ray nodes known dead (its agent restarted, a newer raylet replaced them, Ray
    # declared them dead): one the GCS still lists alive for a while is never matched again.
    retired_nodes: deque[str] = field(default_factory=lambda: deque(maxlen=RETIRED_NODES_KEPT))

    @property
    def relayed(self) -> bool | None:
        """Ray reaches it through the head's relay (True), at its own address (False), or not yet (None)."""
        return self.reach.relayed if self.reach is not None and self.reach.ok else None

    @property
    def problem(self) -> str | None:
        if self.revoked:
            return "its join token was revoked: it is off the overlay and not activated"
        if self.agent_problem:
            return self.agent_problem
        if self.reach is not None and not self.reach.ok:
            return self.reach.problem
        return None

    @property
    def cleared(self) -> bool:
        """May be activated: its ports were reached (or it reported none) and it reports no problem."""
        return not self.revoked and not self.agent_problem and (
            not self.row.ray_ports or (self.reach is not None and self.reach.ok))

    @property
    def lc(self) -> Lifecycle:
        return self.row.lifecycle

    @property
    def donor_id(self) -> str:
        return self.row.donor_id

    @property
    def gflops(self) -> float:
        """The speed its work runs at: the GPU's when it offers GPUs, else the CPU's."""
        p = self.row.profile
        if self.row.caps.gpus and p.gpu_gflops:
            return p.gpu_gflops
        return p.cpu_gflops or 1.0

    def session_started_at(self) -> float | None:
        last = self.sessions[-1] if self.sessions else None
        return last.started_at if last is not None and last.ended_at is None else None

    def available_since(self) -> float:
        """When its current availability began: its last session's end, else registration."""
        ended = [s.ended_at for s in self.sessions if s.ended_at is not None]
        return max(ended) if ended else self.row.registered_at


def donor_resources(caps: DonorCaps) -> dict[str, float]:
    """The Ray resources a donor's caps grant (DESIGN: ``donor`` plus CPU, GPU, memory)."""
    res = {"CPU": float(caps.cpus), "memory": float(caps.memory_bytes), contract.DONOR_RESOURCE: 1.0}
    if caps.gpus:
        res["GPU"] = float(caps.gpus)
    return res


def donor_labels(donor_id: str, device_class: str, owner: str, profile: DeviceProfile, caps: DonorCaps) -> dict[str, str]:
    """The dgpt.io/* node labels of a donor (DESIGN's naming contract)."""
    gpu = contract.label_safe(profile.gpus[0].name) if caps.gpus and profile.gpus else contract.NO_GPU
    return {
        contract.LABEL_DONOR_ID: donor_id,
        contract.LABEL_DEVICE_CLASS: device_class,
        contract.LABEL_ROLE: contract.ROLE_DONOR,
        contract.LABEL_OWNER: owner,
        contract.LABEL_GPU: gpu,
    }


def _role(e: DonorEntry) -> Role:
    lc = e.lc
    if lc.node_id is not None and lc.state in (DonorState.ACTIVE, DonorState.DRAINING):
        return Role.ACTIVE
    if lc.owner_active or lc.paused or lc.state in (DonorState.GONE, DonorState.DRAINING):
        return Role.NONE
    if not e.cleared and lc.state is not DonorState.ACTIVATING:
        return Role.NONE
    if lc.state is DonorState.ACTIVATING or lc.target is Target.ACTIVE:
        return Role.ACTIVATING
    return Role.STANDBY


class Registry:
    """The live fleet: registration, heartbeats, leaves, reconciliation with Ray's nodes.

    Thread-safe: the donor API, the monitor, the autoscaler and Ray actor calls each run
    in their own thread and share one lock, held only for in-memory work and SQLite writes
    (never for a call into Ray).
    """

    def __init__(self, settings: Settings, store: RegistryStore, adapter: RayPort | None, gcs_address: str,
                 ray_token_path: Path | None = None, clock: Callable[[], float] = time.time,
                 probe: Callable[[str, int], Reachability] = tcp_reachable, overlay: OverlayPort | None = None) -> None:
        self.settings = settings
        self.store = store
        self.adapter = adapter
        self.gcs_address = gcs_address
        self.ray_token_path = ray_token_path
        self.clock = clock
        self.probe = probe
        self.overlay = overlay
        self.on_wake: Callable[[str], None] = lambda donor_id: None
        # Called (under the lock: keep it quick) with every session that ends (metrics).
        self.on_session_end: Callable[[SessionView], None] = lambda session: None
        # Every checked donor's verification trust (dgpt.verify.trust.TrustBook.scores; the
        # control plane sets it), read outside the lock.
        self.trust_scores: Callable[[], dict[str, float]] = dict
        # One donor's verification record as data (TrustBook.summary(...).as_dict()), or None.
        self.trust_record: Callable[[str], dict[str, Any] | None] = lambda donor_id: None
        # Preflight checks wait on the network: a few at a time, off every request's path.
        self._checks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="preflight")
        self._unreachable: set[str] = set()
        self._lock = threading.RLock()
        self._entries: dict[str, DonorEntry] = {}
        self._by_state: Counter[DonorState] = Counter()
        self._index = FleetIndex()
        self._usage_at = 0.0
        self._dirty_beats: set[str] = set()
        self._flushed_at = clock()
        self._expiry: dict[int, set[str]] = {}
        self._expiry_key: dict[str, int] = {}
        self._expired_upto = int(clock())
        # The standby/activating part of the last view, and what invalidates it.
        self._cold_version = 0
        self._cold_ids: set[str] = set()
        self._cold_view: tuple[int, float, FleetView] | None = None
        # Live Ray nodes not as granted (dgpt/head/grants.py): node id -> what is wrong; and
        # nodes with only a session problem, since when (they get ROGUE_GRACE_S).
        self._rogue: dict[str, RogueNodeView] = {}
        self._unsessioned: dict[str, float] = {}
        self.changes: deque[tuple[float, str, str]] = deque(maxlen=200)
        # (when, count per DonorState in enum order) and (donor id, session): see FLEET_SAMPLE_S.
        self._fleet_samples: deque[tuple[float, tuple[int, ...]]] = deque(maxlen=FLEET_SAMPLES_KEPT)
        self._ended: deque[tuple[str, SessionView]] = deque(maxlen=ENDED_SESSIONS_KEPT)
        # Samples taken since the last save_fleet_samples (written each tick, outside the lock).
        self._samples_unsaved = False
        self._samples_saved_bucket = -1
        self._load()

    # ------------------------------------------------------------ loading

    def _load(self) -> None:
        now = self.clock()
        rows = self.store.load_donors()
        recent = self.store.recent_sessions(SESSIONS_KEPT)
        totals = self.store.session_totals()
        fits = fit_recorded_many([(recent.get(r.donor_id, []), r.device_class) for r in rows], now)
        for row, params in zip(rows, fits, strict=True):
            n, lost, up_s = totals.get(row.donor_id, (0, 0, 0.0))
            entry = DonorEntry(
                row=row, labels=self._labels_of(row), sessions=deque(recent.get(row.donor_id, []), maxlen=SESSIONS_KEPT),
                reliability=params, sessions_total=n, sessions_lost=lost, uptime_closed_s=up_s,
                # A restart gives every donor one fresh timeout to reach the head again.
                last_heartbeat_at=row.last_heartbeat_at, heard_at=now, secret_hash=row.secret_hash,
            )
            entry.timeout_s = self._timeout(entry, self._standby_interval())
            self._entries[row.donor_id] = entry
            self._by_state[row.lifecycle.state] += 1
            self._reindex(entry)
        revoked = {t.token_id for t in self.store.list_tokens() if t.revoked_at is not None}
        for entry in self._entries.values():
            entry.revoked = entry.row.token_id in revoked
            # A restarted head keeps every donor's overlay address (the coordinator stores them).
            entry.overlay_ip = self.overlay.address_of(entry.donor_id) if self.overlay is not None else None
            if entry.revoked:
                self._reindex(entry)
        self._ended.extend(self.store.ended_sessions(ENDED_SESSIONS_KEPT))
        for at, by_name in self.store.fleet_samples(FLEET_SAMPLES_KEPT):
            self._fleet_samples.append((at, tuple(int(by_name.get(s.value, 0)) for s in DonorState)))
            self._samples_saved_bucket = int(at // FLEET_SAMPLE_S)  # stored already: not written again
        self._sample(now)
        if rows:
            log.info("loaded %d donors (%s)", len(rows), dict(self._by_state))
        for row in rows:
            if row.ray_ports and row.lifecycle.state is not DonorState.GONE:
                self.preflight(row.donor_id)

    @staticmethod
    def _labels_of(row: DonorRow) -> dict[str, str]:
        return {**row.labels, **donor_labels(row.donor_id, row.device_class, row.owner, row.profile, row.caps)}

    # ------------------------------------------------------------ helpers

    def _get(self, donor_id: str) -> DonorEntry:
        entry = self._entries.get(donor_id)
        if entry is None:
            raise NotFound(f"no donor {donor_id!r}", 404, hint="list donors with `dgpt donor list`")
        return entry

    def _authenticate(self, donor_id: str, secret: str | None) -> DonorEntry:
        """The donor, if ``secret`` is its own. Unknown donors and wrong secrets answer alike,
        so donor ids cannot be enumerated."""
        entry = self._entries.get(donor_id)
        if entry is None or not secret or not secrets.compare_digest(hash_secret(secret), entry.secret_hash):
            raise AuthError(UNKNOWN_OR_WRONG, 401, hint="join again with `dgpt donor join` (a valid join token)")
        if entry.revoked:
            raise AuthError("this donor's join token was revoked", 401,
                            hint="ask the operator for a new join token (`dgpt token create`) and join again")
        return entry

    def _standby_interval(self) -> float:
        standby = self._by_state[DonorState.STANDBY] + self._by_state[DonorState.REGISTERED]
        base = self.settings.standby_heartbeat_interval_s
        return min(MAX_STANDBY_INTERVAL_S, max(base, standby / STANDBY_BEATS_PER_S))

    def _timeout(self, entry: DonorEntry, standby_interval: float) -> float:
        if entry.lc.state.running:
            return self.settings.heartbeat_timeout_s
        # A standby donor's heartbeat may be held a whole interval before it sends the next.
        return standby_interval + self.settings.heartbeat_timeout_s

    @staticmethod
    def _running(e: DonorEntry) -> bool:
        return e.lc.node_id is not None and e.lc.state in (DonorState.ACTIVE, DonorState.DRAINING)

    @staticmethod
    def _load_of(u: NodeUsage | None) -> float:
        """The share of a running donor's CPUs its work uses (Ray's accounting; 0 until Ray reports it)."""
        if u is None:
            return 0.0
        total_cpu = float(u.total.get("CPU", 0.0))
        return 1.0 - Resources.from_ray(u.available).cpus / total_cpu if total_cpu > 0 else 0.0

    def _fleet_donor(self, e: DonorEntry) -> FleetDonor:
        row, lc, u = e.row, e.lc, e.usage
        caps = Resources(float(row.caps.cpus), float(row.caps.gpus), float(row.caps.memory_bytes), donors=1.0)
        running = self._running(e)
        available = idle_s = load = None
        if running:
            available = Resources.from_ray(u.available) if u is not None else caps
            load = self._load_of(u)
            idle_s = u.idle_s if u is not None else 0.0
        started = e.session_started_at()
        return FleetDonor(
            donor_id=row.donor_id, owner=row.owner, device_class=row.device_class, caps=caps, available=available,
            gflops=e.gflops, labels=e.labels, reliability=e.reliability,
            since_s=started if (running and started is not None) else e.available_since(),
            node_id=lc.node_id, idle_s=idle_s or 0.0, load=load or 0.0,
            draining=lc.state is DonorState.DRAINING or (u is not None and u.status == "DRAINING"),
            relayed=bool(e.relayed),
        )

    def _reindex(self, e: DonorEntry) -> None:
        role = _role(e)
        self._index.put(self._fleet_donor(e), role, e.heard_at + e.timeout_s)
        if role in (Role.STANDBY, Role.ACTIVATING):
            self._cold_ids.add(e.donor_id)
            self._cold_version += 1
        elif e.donor_id in self._cold_ids:
            self._cold_ids.discard(e.donor_id)
            self._cold_version += 1
        self._arm_expiry(e)

    def _arm_expiry(self, e: DonorEntry) -> None:
        old = self._expiry_key.pop(e.donor_id, None)
        if old is not None:
            self._expiry.get(old, set()).discard(e.donor_id)
        if e.lc.state is DonorState.GONE:
            return
        key = int(e.heard_at + e.timeout_s) + 1
        self._expiry.setdefault(key, set()).add(e.donor_id)
        self._expiry_key[e.donor_id] = key

    def _sample(self, now: float) -> None:
        """Record the fleet by state now (caller holds the lock); one sample per FLEET_SAMPLE_S."""
        counts = tuple(self._by_state[s] for s in DonorState)
        last = self._fleet_samples[-1] if self._fleet_samples else None
        if last is not None and last[1] == counts:
            return
        if last is not None and int(last[0] // FLEET_SAMPLE_S) == int(now // FLEET_SAMPLE_S):
            self._fleet_samples.pop()  # the latest counts of this interval stand for it
            if self._fleet_samples and self._fleet_samples[-1][1] == counts:
                return
        self._fleet_samples.append((now, counts))
        self._samples_unsaved = True

    def _apply(self, e: DonorEntry, out: Outcome, now: float) -> None:
        """Store an outcome, then reflect it in memory (reliability, index, counts, log)."""
        if out.lifecycle == e.lc and out.closed is None and out.opened is None:
            return
        ended, started = self.store.apply(e.donor_id, out.lifecycle, now, out.closed, out.opened)
        if e.lc.state is not out.lifecycle.state:
            self._by_state[e.lc.state] -= 1
            self._by_state[out.lifecycle.state] += 1
            self._sample(now)
        e.row.lifecycle = out.lifecycle
        if ended is not None:
            if e.sessions and e.sessions[-1].ended_at is None:
                e.sessions.pop()
            e.sessions.append(ended)
            e.uptime_closed_s += (ended.ended_at or now) - ended.started_at
            e.sessions_lost += int(ended.ended_as is contract.SessionEnd.LOST)
            # The one moment reliability changes: a session ended.
            e.reliability = fit_recorded(e.sessions, e.row.device_class, now)
            e.usage = None
            self._ended.append((e.donor_id, ended))
            self.on_session_end(ended)
        if started is not None:
            e.sessions.append(started)
            e.sessions_total += 1
        e.timeout_s = self._timeout(e, self._standby_interval())
        self._reindex(e)
        if out.change:
            log.info("donor %s: %s", e.donor_id, out.change)
            self.changes.append((now, e.donor_id, out.change))

    def _step(self, e: DonorEntry, event: Event, now: float) -> Outcome:
        out = step(e.lc, event, now, self.settings.drain_deadline_s)
        self._apply(e, out, now)
        return out

    # ------------------------------------------------------------ the donor API

    def register(self, req: RegisterRequest, join_token: str | None) -> RegisterResponse:
        """Register a donor, or register a known one again keeping its id.

        Raises:
            AuthError: the join token is not valid. Nothing is stored.
            Conflict: the donor id is known but the secret does not match.
        """
        token_id = self.store.check_token("join", join_token)
        now = self.clock()
        with self._lock:
            existing = self._entries.get(req.donor_id) if req.donor_id else None
            if existing is not None:
                if req.donor_secret is None or not secrets.compare_digest(hash_secret(req.donor_secret),
                                                                          existing.secret_hash):
                    raise Conflict(f"donor_id {req.donor_id!r} is registered with another secret", 409,
                                   hint="remove the donor's state folder to join as a new donor")
                donor_id, secret = existing.row.donor_id, req.donor_secret
                out = step(existing.lc, Registered(), now, self.settings.drain_deadline_s)
                row = DonorRow(donor_id, existing.secret_hash, req.name, req.device_class, req.owner, req.profile,
                               req.caps, dict(req.labels), existing.row.registered_at, now, token_id, existing.lc,
                               req.node_ip, tuple(req.ray_ports))
                self.store.save_donor(row)
                if (row.node_ip, row.ray_ports) != (existing.row.node_ip, existing.row.ray_ports):
                    existing.reach = None  # a new address: check it again
                existing.row = row
                existing.agent_problem = None
                existing.revoked = False  # it joined again with a valid token
                existing.labels = self._labels_of(row)
                existing.last_heartbeat_at = existing.heard_at = now
                # A new agent process: every raylet of the old one died with it (die_with_parent),
                # even one whose session already ended lost by heartbeat silence.
                for old in {existing.lc.node_id, *(s.node_id for s in list(existing.sessions)[-2:])}:
                    if old is not None and old not in existing.retired_nodes:
                        existing.retired_nodes.append(old)
                self._apply(existing, out, now)
                self._reindex(existing)
                reused = True
            else:
                donor_id = req.donor_id or f"d-{uuid.uuid4().hex[:10]}"
                secret = req.donor_secret or secrets.token_urlsafe(32)
                row = DonorRow(donor_id, hash_secret(secret), req.name, req.device_class, req.owner, req.profile,
                               req.caps, dict(req.labels), now, now, token_id, Lifecycle(), req.node_ip,
                               tuple(req.ray_ports))
                self.store.save_donor(row)
                entry = DonorEntry(row=row, labels=self._labels_of(row), sessions=deque(maxlen=SESSIONS_KEPT),
                                   reliability=fit_recorded((), req.device_class, now), last_heartbeat_at=now,
                                   heard_at=now,
                                   secret_hash=row.secret_hash)
                entry.timeout_s = self._timeout(entry, self._standby_interval())
                self._entries[donor_id] = entry
                self._by_state[row.lifecycle.state] += 1
                self._sample(now)
                self._reindex(entry)
                reused = req.donor_id is not None
        log.info("donor %s %s (%s, owner %s)", donor_id, "re-registered" if reused else "registered",
                 req.device_class, req.owner)
        grant = self._overlay_grant(donor_id, req.overlay)
        self.preflight(donor_id)
        return RegisterResponse(donor_id=donor_id, donor_secret=secret, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                reused=reused, overlay=grant)

    def _overlay_grant(self, donor_id: str, offer: OverlayOffer | None) -> OverlayGrant | None:
        """The donor's place on the overlay, when it offered a key and the head runs one."""
        if offer is None or self.overlay is None:
            return None
        try:
            grant: OverlayGrant | None = self.overlay.grant(donor_id, offer)
        except (OverlayError, Conflict) as exc:
            # It can still join directly if the head reaches it; the preflight says if not.
            log.warning("donor %s not put on the overlay: %s", donor_id, exc.message)
            grant = None
        with self._lock:
            e = self._entries.get(donor_id)
            if e is not None:
                if (grant.address if grant else None) != e.overlay_ip:
                    e.reach = None
                e.overlay_ip = grant.address if grant else None
        return grant

    def heartbeat(self, donor_id: str, secret: str | None, hb: HeartbeatRequest, can_hold: bool = False) -> tuple[HeartbeatResponse, float]:
        """Record a heartbeat and decide what the donor does next.

        Args:
            can_hold: the caller may hold this request open (long-poll) when nothing is to be
                done now; then the answer tells the donor to come back soon.

        Returns:
            (the answer, how long the caller may hold it before sending; 0 = send now).
        Raises:
            AuthError: unknown donor or wrong secret (the two are not told apart).
        """
        now = self.clock()
        with self._lock:
            e = self._authenticate(donor_id, secret)
            e.last_heartbeat_at = e.heard_at = now
            if hb.problem != e.agent_problem:
                e.agent_problem = hb.problem
                if hb.problem:
                    # It cannot join Ray (e.g. it cannot reach the GCS): let another donor go.
                    log.warning("donor %s cannot join Ray: %s", donor_id, hb.problem)
                    self._step(e, TargetSet(Target.STANDBY), now)
                self._reindex(e)
            out = self._step(e, Heartbeat(AgentState(hb.state), hb.owner_active, hb.owner_reason), now)
            standby_interval = self._standby_interval()
            e.timeout_s = self._timeout(e, standby_interval)
            self._index.touch(donor_id, now + e.timeout_s)
            self._arm_expiry(e)
            self._dirty_beats.add(donor_id)
            reply = out.reply
            assert reply is not None  # every heartbeat outcome carries a reply
            join = self._ray_join(e) if reply.action is HeartbeatAction.ACTIVATE and hb.state is AgentState.STANDBY else None
        hold = 0.0
        if reply.action is HeartbeatAction.STANDBY and not e.lc.state.running:
            if can_hold and hb.v >= LONG_POLL_VERSION:
                # Come back at once with a heartbeat the head may hold (this one, if it asked).
                hold = min(hb.wait_s, standby_interval)
                interval, wait = REPOLL_S, standby_interval
            else:
                # An agent that cannot long-poll, or a head holding all it can: the full interval.
                interval, wait = standby_interval, (standby_interval if hb.v >= LONG_POLL_VERSION else 0.0)
        else:
            interval, wait = self.settings.heartbeat_interval_s, 0.0
        reason = reply.reason
        if reply.action is HeartbeatAction.STANDBY and e.problem and not e.lc.paused:
            reason = f"not activated: {e.problem}"
        resp = HeartbeatResponse(action=reply.action, ray=join, drain_deadline_s=reply.deadline_s,
                                 heartbeat_interval_s=interval, wait_s=wait, reason=reason)
        return resp, hold

    def _ray_join(self, e: DonorEntry) -> RayJoin:
        token = self.ray_token_path.read_text().strip() if self.ray_token_path else ""
        caps = e.row.caps
        gcs, node_ip = self.gcs_address, None
        if e.relayed and e.overlay_ip and self.overlay is not None:
            # Relayed: its raylet advertises its overlay address and dials the GCS there too.
            gcs, node_ip = f"{self.overlay.head_address}:{self.gcs_address.rpartition(':')[2]}", e.overlay_ip
        return RayJoin(gcs_address=gcs, auth_token=token, num_cpus=caps.cpus, num_gpus=caps.gpus,
                       memory_bytes=caps.memory_bytes, resources={contract.DONOR_RESOURCE: 1.0}, labels=dict(e.labels),
                       node_ip=node_ip)

    # ------------------------------------------------------------ preflight

    def preflight(self, donor_id: str) -> None:
        """Check in the background that the head reaches the donor's Ray ports.

        Until it passes the donor is not activated: a donor behind a firewall or NAT would
        join Ray and be declared dead ~30 s later, again and again, each time a `lost`
        session against its name.
        """
        with self._lock:
            e = self._entries.get(donor_id)
            if e is None or not e.row.ray_ports or e.row.node_ip is None:
                return
            host, ports, overlay_ip = e.row.node_ip, e.row.ray_ports, e.overlay_ip
        self._checks.submit(self._run_preflight, donor_id, host, ports, overlay_ip)

    def _run_preflight(self, donor_id: str, host: str, ports: tuple[int, ...], overlay_ip: str | None = None) -> None:
        try:
            results = [self.probe(host, port) for port in ports]
            bad = [r for r in results if not r.ok]
            if not bad:
                check = Preflight(True, self.clock())
            elif overlay_ip is not None and self.overlay is not None:
                check = self._overlay_preflight(donor_id, overlay_ip, ports, bad)
            else:
                problem = (f"the head cannot reach this donor's Ray port(s) {', '.join(str(r) for r in bad)}; "
                           f"open TCP {', '.join(str(r.port) for r in bad)} and the worker ports "
                           f"(DGPT_RAY_WORKER_PORTS) on {host} to the head and the other donors, set --node-ip "
                           "to an address they reach, or join through the overlay (donors behind NAT)")
                check = Preflight(False, self.clock(), problem)
            with self._lock:
                e = self._entries.get(donor_id)
                if e is None or e.row.node_ip != host or e.overlay_ip != overlay_ip:
                    return
                changed = e.reach is None or e.reach.ok != check.ok
                e.reach = check
                (self._unreachable.discard if check.ok else self._unreachable.add)(donor_id)
                self._reindex(e)
            if changed:
                (log.info if check.ok else log.warning)(
                    "donor %s preflight: %s", donor_id,
                    ("Ray ports reachable" + (" over the overlay (relayed)" if check.relayed else "")) if check.ok
                    else check.problem)
                self.on_wake(donor_id)  # a held heartbeat tells the donor now, not at the end of its wait
        except Exception:  # a check must never take the registry down
            log.exception("preflight of donor %s failed", donor_id)

    def _overlay_preflight(self, donor_id: str, overlay_ip: str, ports: tuple[int, ...],
                           direct: list[Reachability]) -> Preflight:
        """The donor's Ray ports at its overlay address, once its tunnel is up (``direct``: what failed)."""
        assert self.overlay is not None
        deadline = time.monotonic() + OVERLAY_HANDSHAKE_WAIT_S
        while self.overlay.handshake_at(donor_id) is None and time.monotonic() < deadline:
            time.sleep(0.25)
        results = [self.probe(overlay_ip, port) for port in ports]
        bad = [r for r in results if not r.ok]
        if not bad:
            return Preflight(True, self.clock(), relayed=True)
        tunnel = ("its tunnel is up" if self.overlay.handshake_at(donor_id) is not None else
                  f"its tunnel never reached the head: UDP {self.settings.overlay_port} on the head must be reachable "
                  "from the donor (see the donor's wireguard.log and `wg show` on both)")
        return Preflight(False, self.clock(),
                         f"the head cannot reach this donor's Ray port(s) directly ({', '.join(str(r) for r in direct)})"
                         f" nor over the overlay ({', '.join(str(r) for r in bad)}); {tunnel}")

    def leave(self, donor_id: str, secret: str | None, req: LeaveRequest, api_key: str | None = None) -> LeaveResponse:
        """A donor (its own secret) or an operator (an API key) drains the donor.

        Raises:
            AuthError: neither a valid API key nor the donor's secret.
        """
        if api_key:
            self.store.check_token("api", api_key)
            with self._lock:
                self._get(donor_id)
        else:
            with self._lock:
                self._authenticate(donor_id, secret)
        return self.drain_donor(donor_id, LeaveReason(req.reason), req.deadline_s or self.settings.drain_deadline_s)

    def drain_donor(self, donor_id: str, reason: LeaveReason, deadline_s: float) -> LeaveResponse:
        """Drain a donor through Ray's DrainNode (reason PREEMPTION) with a deadline."""
        now = self.clock()
        with self._lock:
            e = self._get(donor_id)
            out = self._step(e, LeaveRequested(reason.value, deadline_s), now)
            state = e.lc.state
        drained, message = False, "not running: nothing to drain"
        if out.drain_node and self.adapter is not None:
            drained, message = self._drain_node(out.drain_node, f"donor {donor_id} leaving ({reason.value})", deadline_s)
        elif state is DonorState.DRAINING:
            drained, message = True, "already draining"
        return LeaveResponse(donor_id=donor_id, state=state, drain_requested=drained, deadline_s=deadline_s, message=message)

    def _drain_node(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        assert self.adapter is not None
        try:
            accepted, rejection = self.adapter.drain_node(node_id, DRAIN_PREEMPTION, message, deadline_s)
        except Exception as exc:  # Ray hiccup: the agent still drains and stops its raylet
            log.warning("DrainNode %s failed: %s", node_id[:8], exc)
            return False, f"DrainNode failed: {exc}"
        log.info("DrainNode %s deadline %.0fs: %s", node_id[:8], deadline_s, "accepted" if accepted else rejection)
        return accepted, rejection or "drain accepted"

    # ------------------------------------------------------------ pause on the head

    def pauser(self, donor_id: str, credential: str | None) -> PausedBy:
        """Who presents ``credential`` to pause or resume ``donor_id``: the donor itself (its
        secret) or an operator (an API key).

        Raises:
            AuthError: neither; unknown donors and wrong secrets answer alike.
            NotFound: an operator named a donor the registry does not know.
        """
        if not credential:
            raise AuthError("the donor's secret or an API key is required", 401,
                            hint="sign in on the donor page with the donor id and secret from the donor's "
                                 "donor.json, or pass an API key (`dgpt token create --kind api`)")
        with self._lock:
            e = self._entries.get(donor_id)
            if e is not None and secrets.compare_digest(hash_secret(credential), e.secret_hash):
                self._authenticate(donor_id, credential)  # a revoked donor is refused
                return PausedBy.DONOR
        try:
            self.store.check_token("api", credential)
        except AuthError:
            raise AuthError(UNKNOWN_OR_WRONG, 401, hint="sign in with the donor id and secret from the donor's "
                                                       "donor.json, or with an API key") from None
        with self._lock:
            self._get(donor_id)
        return PausedBy.OPERATOR

    def pause(self, donor_id: str, by: PausedBy) -> PauseResponse:
        """Pause a donor on the head: it drains now (DrainNode with the drain deadline) if it
        runs, and is never activated until :meth:`resume`. Pausing a paused donor changes nothing.

        Raises:
            NotFound: no such donor.
        """
        deadline_s = self.settings.drain_deadline_s
        with self._lock:
            e = self._get(donor_id)
            out = self._step(e, Paused(by), self.clock())
            lc = e.lc
        drained, message = False, "paused: not running, kept out of Ray until resumed"
        if not out.change:
            message = f"already paused by {lc.paused_by.value if lc.paused_by else by.value}"
        elif out.drain_node and self.adapter is not None:
            drained, message = self._drain_node(out.drain_node, f"donor {donor_id} paused by {by.value}", deadline_s)
            message = f"paused: {message}"
        elif lc.state is DonorState.DRAINING:
            drained, message = True, "paused: draining"
        return self._pause_response(donor_id, lc, drained, message)

    def resume(self, donor_id: str, by: PausedBy) -> PauseResponse:
        """Resume a paused donor: the autoscaler may activate it again (nothing else changes).
        An operator's pause is an operator's to lift; the owner's, either's.

        Raises:
            NotFound: no such donor.
            Conflict: the donor asks to lift an operator's pause.
        """
        with self._lock:
            e = self._get(donor_id)
            if e.lc.paused_by is PausedBy.OPERATOR and by is PausedBy.DONOR:
                raise Conflict(f"donor {donor_id} was paused by an operator: only an operator can resume it", 409,
                               hint="ask the fabric's operator to resume it")
            out = self._step(e, Resumed(), self.clock())
            lc = e.lc
        message = "resumed: the autoscaler activates it when demand needs it" if out.change else "not paused"
        return self._pause_response(donor_id, lc, False, message)

    @staticmethod
    def _pause_response(donor_id: str, lc: Lifecycle, drained: bool, message: str) -> PauseResponse:
        return PauseResponse(donor_id=donor_id, paused=lc.paused, paused_by=lc.paused_by, paused_at=lc.paused_at,
                             state=lc.state, drain_requested=drained, message=message)

    # ------------------------------------------------------------ the autoscaler's port

    def set_target(self, donor_id: str, target: Target | str) -> None:
        """The autoscaler wants the donor in (``active``) or out of (``standby``) the cluster."""
        target = Target(target)
        now = self.clock()
        with self._lock:
            e = self._get(donor_id)
            self._step(e, TargetSet(target), now)
            wake = target is Target.ACTIVE and not e.lc.state.running
        if wake:
            self.on_wake(donor_id)

    def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]:
        """Scale-down: DrainNode(IDLE_TERMINATION), which Ray refuses for a busy node.

        Accepted: the donor's target becomes standby and it drains (its session ends
        ``drained``, reason ``autoscaler``). Refused: nothing changes; the donor stays.
        """
        with self._lock:
            e = self._get(donor_id)
            node_id = e.lc.node_id if e.lc.state is DonorState.ACTIVE else None
        if node_id is None or self.adapter is None:
            self.set_target(donor_id, Target.STANDBY)
            return True, f"not running ({e.lc.state.value}): target standby"
        try:
            accepted, rejection = self.adapter.drain_node(node_id, DRAIN_IDLE, f"donor {donor_id} leaving (autoscaler: {reason})",
                                                          deadline_s)
        except Exception as exc:
            return False, f"DrainNode failed: {exc}"
        if accepted:
            with self._lock:
                # Ray already drains the node: the outcome's drain_node is not sent again.
                self._step(e, LeaveRequested(LeaveReason.AUTOSCALER.value, deadline_s), self.clock())
        log.info("autoscaler DrainNode %s: %s", donor_id, "accepted" if accepted else rejection)
        return accepted, rejection or "drain accepted"

    # ------------------------------------------------------------ Ray's view

    def update_usage(self, usage: Iterable[NodeUsage]) -> None:
        """Ray's per-node resource state, for the active donors' free capacity and idle time."""
        by_node = {u.node_id: u for u in usage}
        with self._lock:
            for fd in self._index.active():
                e = self._entries.get(fd.donor_id)
                if e is None:
                    continue
                u = by_node.get(e.lc.node_id or "")
                if u is not e.usage:
                    e.usage = u
                    self._reindex(e)
            self._usage_at = self.clock()

    def tick(self) -> list[tuple[str, str]]:
        """One reconciliation: Ray's node table, heartbeat silence, the heartbeat flush."""
        nodes = self.adapter.nodes() if self.adapter is not None else []
        now = self.clock()
        changes: list[tuple[str, str]] = []
        with self._lock:
            to_drain = self._check_grants(nodes, now)
            # Oldest first: when a donor's old raylet is still listed alive beside its new one,
            # the new one wins and the old one is retired.
            for node in sorted(nodes, key=lambda n: n.started_ms):
                e = self._entries.get(node.donor_id or "")
                if e is None or node.node_id in e.retired_nodes or node.node_id in self._rogue:
                    continue
                before = e.lc.node_id
                out = self._step(e, NodeAlive(node.node_id) if node.alive else NodeDead(node.node_id), now)
                if before is not None and out.closed is not None and e.lc.node_id != before:
                    e.retired_nodes.append(before)
                if out.change:
                    changes.append((e.donor_id, out.change))
            for donor_id in self._expired(now):
                e = self._entries[donor_id]
                if now - e.heard_at > e.timeout_s:
                    out = self._step(e, Silent(e.timeout_s), now)
                    if out.change:
                        changes.append((donor_id, out.change))
                else:
                    self._arm_expiry(e)
            flush = now - self._flushed_at >= HEARTBEAT_FLUSH_S
            recheck = [d for d in self._unreachable
                       if (r := self._entries[d].reach) is not None and (
                           now - r.checked_at >= PREFLIGHT_RECHECK_S or self._tunnel_since(d, r.checked_at)
                           or self._joined_since(d, r.checked_at))]
        if flush:
            self.flush_heartbeats()
        self.save_fleet_history()
        for donor_id in recheck:
            self.preflight(donor_id)
        for node_id, reason in to_drain:
            self._drain_rogue(node_id, reason)
        return changes

    def _check_grants(self, nodes: list[RayNode], now: float) -> list[tuple[str, str]]:
        """Flag live nodes that are not as granted (caller holds the lock); the new ones to drain."""
        alive = {n.node_id for n in nodes if n.alive}
        for node_id, view in list(self._rogue.items()):
            if view.gone_at is None and node_id not in alive:
                self._rogue[node_id] = view.model_copy(update={"gone_at": now})
            elif view.gone_at is not None and now - view.gone_at > ROGUE_GONE_KEPT_S:
                del self._rogue[node_id]
        self._unsessioned = {k: v for k, v in self._unsessioned.items() if k in alive}
        # Flagged before but the drain did not go through (a Ray hiccup): asked again.
        out = [(v.node_id, v.reason) for v in self._rogue.values() if not v.drain_requested and v.gone_at is None]
        for node in nodes:
            if not node.alive or node.node_id in self._rogue:
                continue
            e = self._entries.get(node.donor_id or "")
            if e is not None and node.node_id in e.retired_nodes:
                continue
            problem = grant_problem(
                is_head=node.is_head, donor_id=node.donor_id, known=e is not None,
                state=e.lc.state if e is not None else None, resources=node.resources_total, labels=node.labels,
                granted_resources=donor_resources(e.row.caps) if e is not None else {},
                granted_labels=e.labels if e is not None else {})
            if problem is None:
                self._unsessioned.pop(node.node_id, None)
                continue
            if problem.lingering:
                since = self._unsessioned.setdefault(node.node_id, now)
                if now - since < ROGUE_GRACE_S:
                    continue
            self._rogue[node.node_id] = RogueNodeView(node_id=node.node_id, address=node.node_ip, reason=problem.reason,
                                                      since=now)
            while len(self._rogue) > ROGUE_KEPT:
                del self._rogue[next(iter(self._rogue))]
            log.warning("Ray node %s at %s is not as granted: %s; draining it", node.node_id[:8], node.node_ip,
                        problem.reason)
            out.append((node.node_id, problem.reason))
        return out

    def _drain_rogue(self, node_id: str, reason: str) -> None:
        if self.adapter is None:
            return
        try:
            accepted, rejection = self.adapter.drain_node(node_id, DRAIN_PREEMPTION, f"not granted by dgpt: {reason}",
                                                          self.settings.drain_deadline_s)
        except Exception as exc:  # asked again on the next tick
            log.warning("DrainNode of rogue node %s failed: %s", node_id[:8], exc)
            return
        with self._lock:
            view = self._rogue.get(node_id)
            if view is not None and accepted:
                self._rogue[node_id] = view.model_copy(update={"drain_requested": True})
        if not accepted:
            log.warning("Ray refused to drain rogue node %s: %s", node_id[:8], rejection)

    def rogue_nodes(self) -> list[RogueNodeView]:
        """Ray nodes flagged as not granted, oldest first: live ones, and for a while the gone ones."""
        with self._lock:
            return list(self._rogue.values())

    def _joined_since(self, donor_id: str, at: float) -> bool:
        """Its raylet joined Ray after ``at``: a check that failed then raced the raylet's start
        (the agent stops answering on the Ray ports while its raylet takes them)."""
        started = self._entries[donor_id].session_started_at()
        return started is not None and started > at

    def _tunnel_since(self, donor_id: str, at: float) -> bool:
        """Its overlay tunnel shook hands after ``at``: a failed check is worth repeating now."""
        if self.overlay is None or self._entries[donor_id].overlay_ip is None:
            return False
        shook = self.overlay.handshake_at(donor_id)
        return shook is not None and shook > at

    def _expired(self, now: float) -> list[str]:
        out: list[str] = []
        while self._expired_upto <= int(now):
            for donor_id in self._expiry.pop(self._expired_upto, ()):
                self._expiry_key.pop(donor_id, None)
                out.append(donor_id)
            self._expired_upto += 1
        return out

    def save_fleet_history(self) -> None:
        """Store the fleet samples taken since the last save (the last one may still change
        within its interval: it is written again, replacing itself). Outside the registry lock."""
        with self._lock:
            if not self._samples_unsaved:
                return
            since = self._samples_saved_bucket
            fresh = [(int(at // FLEET_SAMPLE_S), at, {s.value: n for s, n in zip(DonorState, counts, strict=True) if n})
                     for at, counts in self._fleet_samples if int(at // FLEET_SAMPLE_S) >= since]
            self._samples_unsaved = False
            if fresh:
                self._samples_saved_bucket = fresh[-1][0]
        self.store.save_fleet_samples(fresh, FLEET_SAMPLES_KEPT)

    def flush_heartbeats(self) -> None:
        """Store the heartbeat times that changed since the last flush.

        The SQLite write runs outside the registry lock: at 100k donors a flush updates
        thousands of rows, and heartbeats must not wait for it (the times are informational).
        """
        with self._lock:
            beats = [(d, self._entries[d].heard_at) for d in self._dirty_beats if d in self._entries]
            self._dirty_beats.clear()
            self._flushed_at = self.clock()
        self.store.save_heartbeats(beats)

    # ------------------------------------------------------------ reads

    def fleet_view(self) -> FleetView:
        """The fleet frozen now (placement's and the autoscaler's input).

        Active donors are always current; the standby and activating columns are those of
        the last view while none of those donors changed (see ``STANDBY_VIEW_MAX_AGE_S``).
        """
        with self._lock:
            now = self.clock()
            cached = self._cold_view
            if (cached is None or cached[0] != self._cold_version or not 0 <= now - cached[1] <= STANDBY_VIEW_MAX_AGE_S):
                view = self._index.view(now)
                self._cold_view = (self._cold_version, now, view)
                return view
            cold = cached[2]
            return FleetView(now_s=now, active=self._index.active_columns(), activating=cold.activating,
                             standby=cold.standby)

    def known_donors(self, donor_ids: Iterable[str]) -> set[str]:
        """Those of ``donor_ids`` this registry holds."""
        with self._lock:
            return {d for d in donor_ids if d in self._entries}

    def node_states(self) -> dict[str, dict[str, Any]]:
        """node_id -> {donor_id, owner, state, reliability, reachable, trust}: what Serve's routers rank by.

        ``reachable`` turns false once a running donor has missed a few heartbeats, so
        routers drop its replicas long before Ray declares its node dead. ``trust`` is the
        donor's verification trust (``dgpt.verify``), None for a donor never checked.
        """
        now = self.clock()
        suspect_s = SUSPECT_AFTER_INTERVALS * self.settings.heartbeat_interval_s
        scores = self.trust_scores()
        with self._lock:
            out = {}
            for fd in self._index.active():
                e = self._entries[fd.donor_id]
                if e.lc.node_id is None:
                    continue
                started = e.session_started_at() or now
                out[e.lc.node_id] = {
                    "donor_id": e.donor_id,
                    "owner": e.row.owner,
                    "state": e.lc.state.value,
                    "reliability": round(e.reliability.p_stay(now - started, RELIABILITY_HORIZON_S), 4),
                    "reachable": now - e.heard_at <= suspect_s,
                    "trust": scores.get(e.donor_id),
                }
            return out

    def running_sessions(self) -> list[tuple[str, str, int, DeviceProfile]]:
        """(node id, donor id, open session id, profile) of every donor whose raylet runs (credit meters them)."""
        with self._lock:
            out = []
            for fd in self._index.active():
                e = self._entries.get(fd.donor_id)
                last = e.sessions[-1] if e is not None and e.sessions else None
                if e is not None and e.lc.node_id is not None and last is not None and last.ended_at is None:
                    out.append((e.lc.node_id, e.donor_id, last.session_id, e.row.profile))
            return out

    def check_donor_secret(self, donor_id: str, secret: str | None) -> None:
        """Raises AuthError unless ``secret`` is the donor's own (unknown donors answer alike)."""
        with self._lock:
            self._authenticate(donor_id, secret)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s.value: n for s, n in self._by_state.items() if n > 0}

    def donor_view(self, donor_id: str, max_sessions: int = 50) -> DonorView:
        """One donor, with its latest sessions and its verification record."""
        record = self.trust_record(donor_id)
        with self._lock:
            e = self._get(donor_id)
            if max_sessions > len(e.sessions):
                sessions = [s for _, s in self.store.sessions(donor_id, limit=max_sessions)]
            else:
                sessions = list(e.sessions)[-max_sessions:] if max_sessions else []
            view = self._view(e, sessions, trust=record["trust"] if record else None)
        if record is None:
            return view
        return view.model_copy(update={"verification": VerificationView.model_validate(record)})

    def _view(self, e: DonorEntry, sessions: list[SessionView], trust: float | None = None) -> DonorView:
        row, lc, now = e.row, e.lc, self.clock()
        started = e.session_started_at()
        up_open = now - started if started is not None else 0.0
        load = round(min(1.0, max(0.0, self._load_of(e.usage))), 4) if self._running(e) else None
        return DonorView(
            donor_id=row.donor_id, name=row.name, state=lc.state, target=lc.target, device_class=row.device_class,
            owner=row.owner, node_id=lc.node_id, profile=row.profile, caps=row.caps,
            resources=donor_resources(row.caps), labels=e.labels, registered_at=row.registered_at,
            last_heartbeat_at=e.last_heartbeat_at, owner_active=lc.owner_active, drain_reason=lc.drain_reason,
            sessions=sessions, sessions_total=e.sessions_total, sessions_lost=e.sessions_lost,
            uptime_s=round(e.uptime_closed_s + up_open, 1),
            reliability=round(e.reliability.p_stay(up_open, RELIABILITY_HORIZON_S), 4),
            problem=e.problem, relayed=e.relayed, overlay_ip=e.overlay_ip,
            paused=lc.paused, paused_by=lc.paused_by, paused_at=lc.paused_at, load=load, trust=trust,
        )

    def list_donors(self, *, state: DonorState | None = None, owner: str | None = None,
                    device_class: str | None = None, after: str | None = None, limit: int = 500,
                    max_sessions: int = 5) -> tuple[list[DonorView], str | None, int | None]:
        """A page of donors in registration order, filtered.

        Returns:
            (the page, the cursor of the next page or None, the total matching when cheap to
            know: unfiltered or filtered by state only; else None).
        Raises:
            InvalidRequest: ``after`` names no donor.
        """
        if limit < 1:
            raise InvalidRequest(f"limit must be >= 1, got {limit}", 422)
        scores = self.trust_scores()
        with self._lock:
            ids = list(self._entries)
            start = 0
            if after is not None:
                if after not in self._entries:
                    raise InvalidRequest(f"after={after!r} is not a donor id of this fleet", 422,
                                         hint="pass the next_cursor of the previous page")
                start = ids.index(after) + 1
            page: list[DonorView] = []
            next_cursor = None
            for donor_id in ids[start:]:
                e = self._entries[donor_id]
                if (state is not None and e.lc.state is not state) or (owner is not None and e.row.owner != owner) or (
                        device_class is not None and e.row.device_class != device_class):
                    continue
                if len(page) == limit:
                    next_cursor = page[-1].donor_id
                    break
                page.append(self._view(e, list(e.sessions)[-max_sessions:] if max_sessions else [],
                                       trust=scores.get(donor_id)))
            total = None
            if owner is None and device_class is None:
                total = len(self._entries) if state is None else self._by_state[state]
        return page, next_cursor, total

    def donor_views(self, donor_ids: Iterable[str]) -> list[DonorView]:
        """The views of the named donors this head knows, without sessions: O(len(donor_ids)),
        for loops that follow a few donors of a large fleet (the storage tier's upkeep)."""
        wanted = list(donor_ids)
        scores = self.trust_scores()
        with self._lock:
            return [self._view(e, [], trust=scores.get(donor_id))
                    for donor_id in wanted if (e := self._entries.get(donor_id)) is not None]

    def record_session(self, donor_id: str, started_at: float, ended_at: float, ended_as: contract.SessionEnd) -> None:
        """Import a finished session (history from elsewhere); it seeds the donor's reliability."""
        with self._lock:
            e = self._get(donor_id)
            view = self.store.record_session(donor_id, started_at, ended_at, ended_as)
            open_session = e.sessions.pop() if e.sessions and e.sessions[-1].ended_at is None else None
            e.sessions.append(view)
            self._ended.append((donor_id, view))
            if open_session is not None:
                e.sessions.append(open_session)
            e.sessions_total += 1
            e.sessions_lost += int(contract.SessionEnd(ended_as) is contract.SessionEnd.LOST)
            e.uptime_closed_s += ended_at - started_at
            e.reliability = fit_recorded(e.sessions, e.row.device_class, self.clock())
            self._reindex(e)

    # ------------------------------------------------------------ tokens

    def create_token(self, kind: str, label: str) -> TokenView:
        return self.store.create_token(kind, label, self.clock())

    def list_tokens(self) -> list[TokenView]:
        return self.store.list_tokens()

    def revoke_token(self, token_id: str) -> None:
        """Revoke a token. The donors that joined with a join token are cut off: off the overlay
        at once, not activated again, and their heartbeats refused (their agents stop)."""
        self.store.revoke_token(token_id, self.clock())
        with self._lock:
            cut = [e for e in self._entries.values() if e.row.token_id == token_id and not e.revoked]
            for e in cut:
                e.revoked = True
                e.reach = None
                self._step(e, TargetSet(Target.STANDBY), self.clock())
                self._reindex(e)
        for e in cut:
            if self.overlay is not None and e.overlay_ip is not None:
                self.overlay.revoke(e.donor_id)
                e.overlay_ip = None
            log.warning("donor %s cut off: its join token %s was revoked", e.donor_id, token_id)

    def check_api_key(self, api_key: str | None) -> str:
        return self.store.check_token("api", api_key)

    # ------------------------------------------------------------ introspection

    def standby_interval_s(self) -> float:
        with self._lock:
            return self._standby_interval()

    def recent_changes(self, n: int = 20) -> list[tuple[float, str, str]]:
        with self._lock:
            return list(self.changes)[-n:]

    def fleet_history(self, since: float | None = None) -> list[tuple[float, dict[str, int]]]:
        """The fleet by state over time, oldest first: the samples after ``since`` (all when
        None), then the counts now. Each sample holds until the next one."""
        with self._lock:
            now = self.clock()
            samples = [(at, counts) for at, counts in self._fleet_samples if since is None or at > since]
            samples.append((now, tuple(self._by_state[s] for s in DonorState)))
        return [(at, {s.value: n for s, n in zip(DonorState, counts, strict=True) if n}) for at, counts in samples]

    def ended_sessions(self, limit: int = 50) -> list[FleetSessionView]:
        """The latest sessions that ended (drains and losses), newest first, at most ``limit``
        (and at most ENDED_SESSIONS_KEPT)."""
        with self._lock:
            latest = sorted(self._ended, key=lambda item: item[1].ended_at or 0.0, reverse=True)[:limit]
            return [FleetSessionView(**s.model_dump(), donor_id=d,
                                     donor_name=self._entries[d].row.name if d in self._entries else d)
                    for d, s in latest]

    def __len__(self) -> int:
        return len(self._entries)

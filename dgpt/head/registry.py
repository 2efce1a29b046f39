"""The registry actor: owns the SQLite store on the head and reconciles it with Ray's nodes.

It runs as a detached, restartable Ray actor named ``registry`` in namespace ``dgpt``,
pinned to the head (custom resource ``dgpt_head``). A restart re-opens the same SQLite
file, so no donor, session or token is lost. Its monitor loop survives any tick's error.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from dgpt.config import Settings
from dgpt.head.store import HeartbeatDecision, NodeObservation, RegistryStore, donor_labels
from dgpt.sdk.models import (
    DonorView,
    Heartbeat,
    HeartbeatResponse,
    LeaveRequest,
    LeaveResponse,
    RayJoin,
    RegisterRequest,
    RegisterResponse,
    TokenView,
)

log = logging.getLogger("dgpt.registry")

REGISTRY_NAME = "registry"
NAMESPACE = "dgpt"
HEAD_RESOURCE = "dgpt_head"
# Serve routers rank replicas by P(their donor stays this long): a request's horizon is short,
# but a replica that leaves costs its in-flight requests and a cold replacement.
RELIABILITY_HORIZON_S = 3600.0
NODE_STATES_TTL_S = 2.0


def head_paths(home: Path) -> dict[str, Path]:
    """Where the head keeps its state under ``DGPT_HOME``."""
    head = home / "head"
    return {
        "dir": head,
        "db": head / "registry.sqlite",
        "ray_token": head / "ray_auth_token",
        "api_key": head / "api_key",
        "pid": head / "head.pid",
        "info": head / "head.json",
        "log": home / "logs" / "head.log",
    }


class RegistryCore:
    """The registry's logic, Ray-free apart from the injected adapter (tests call it directly)."""

    def __init__(self, settings: Settings, gcs_address: str, adapter: Any | None, clock: Any = time.time) -> None:
        self.settings = settings
        self.paths = head_paths(settings.home)
        self.store = RegistryStore(self.paths["db"])
        self.gcs_address = gcs_address
        self.adapter = adapter
        self.clock = clock
        self.last_changes: list[tuple[float, str, str]] = []
        self._reliability: dict[str, float] = {}
        self._reliability_at = float("-inf")
        api_key = self.paths["api_key"]
        if api_key.is_file():
            self.store.ensure_token("api", api_key.read_text().strip(), "head bootstrap key", clock())

    # donors -------------------------------------------------------------

    def register(self, req: RegisterRequest, join_token: str | None) -> RegisterResponse:
        donor_id, secret, reused = self.store.register(req, join_token, self.clock())
        log.info("donor %s %s (%s, owner %s)", donor_id, "re-registered" if reused else "registered", req.device_class, req.owner)
        return RegisterResponse(
            donor_id=donor_id, donor_secret=secret, heartbeat_interval_s=self.settings.heartbeat_interval_s, reused=reused
        )

    def heartbeat(self, donor_id: str, secret: str | None, hb: Heartbeat) -> HeartbeatResponse:
        self.store.authenticate_donor(donor_id, secret)
        decision: HeartbeatDecision = self.store.heartbeat(donor_id, hb, self.clock(), self.settings.drain_deadline_s)
        ray_join = self._ray_join(donor_id) if decision.action == "activate" else None
        return HeartbeatResponse(
            action=decision.action,  # type: ignore[arg-type]
            ray=ray_join,
            drain_deadline_s=decision.drain_deadline_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            reason=decision.reason,
        )

    def _ray_join(self, donor_id: str) -> RayJoin:
        donor = self.store.get_donor(donor_id, max_sessions=0)
        token = self.paths["ray_token"].read_text().strip()
        return RayJoin(
            gcs_address=self.gcs_address,
            auth_token=token,
            num_cpus=donor.caps.cpus,
            num_gpus=donor.caps.gpus,
            memory_bytes=donor.caps.memory_bytes,
            resources={"donor": 1.0},
            labels={**donor.labels, **donor_labels(donor_id, donor.device_class, donor.owner, donor.profile, donor.caps)},
        )

    def leave(self, donor_id: str, secret: str | None, api_key: str | None, req: LeaveRequest) -> LeaveResponse:
        if api_key:
            self.store.check_token("api", api_key)
        else:
            self.store.authenticate_donor(donor_id, secret)
        deadline_s = req.deadline_s or self.settings.drain_deadline_s
        state, node_id = self.store.begin_leave(donor_id, req.reason, self.clock(), deadline_s)
        drained, message = False, "not running: nothing to drain"
        if node_id and self.adapter is not None:
            drained, message = self.drain(node_id, f"donor {donor_id} leaving ({req.reason})", deadline_s)
        return LeaveResponse(donor_id=donor_id, state=state, drain_requested=drained, deadline_s=deadline_s, message=message)  # type: ignore[arg-type]

    def drain(self, node_id: str, message: str, deadline_s: float) -> tuple[bool, str]:
        from dgpt.head.ray_adapter import DRAIN_PREEMPTION

        if self.adapter is None:
            return False, "no Ray adapter: nothing to drain"
        accepted, rejection = self.adapter.drain_node(node_id, DRAIN_PREEMPTION, message, deadline_s)
        log.info("DrainNode %s deadline %.0fs: %s", node_id[:8], deadline_s, "accepted" if accepted else rejection)
        return accepted, rejection or "drain accepted"

    def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]:
        """The autoscaler's scale-down: DrainNode(IDLE_TERMINATION), which Ray refuses for a busy node.

        Accepted: the donor's target becomes standby and it drains (its session ends
        ``drained``, reason ``autoscaler``). Refused: nothing changes; the donor stays.
        """
        from dgpt.head.ray_adapter import DRAIN_IDLE

        donor = self.store.get_donor(donor_id, max_sessions=0)
        if donor.state != "active" or not donor.node_id or self.adapter is None:
            self.store.set_target(donor_id, "standby")
            return True, f"not running ({donor.state}): target standby"
        accepted, rejection = self.adapter.drain_node(
            donor.node_id, DRAIN_IDLE, f"donor {donor_id} leaving (autoscaler: {reason})", deadline_s)
        if accepted:
            self.store.set_target(donor_id, "standby")
            self.store.begin_leave(donor_id, "autoscaler", self.clock(), deadline_s)
        log.info("autoscaler DrainNode %s: %s", donor_id, "accepted" if accepted else rejection)
        return accepted, rejection or "drain accepted"

    def node_states(self) -> dict[str, dict[str, Any]]:
        """Running donors' nodes with state and P(stays the next hour).

        States are read fresh (a draining donor must leave the routers' rotation at once);
        reliability, which moves slowly, is refitted every few seconds, since every Serve
        router asks about once a second.
        """
        now = self.clock()
        states = self.store.node_states()
        if now - self._reliability_at > NODE_STATES_TTL_S:
            from dgpt.reliability.model import fit_recorded

            fresh = {}
            for d in self.store.list_donors():
                if not d.node_id:
                    continue
                up_s = now - d.session_started_at(now)
                params = fit_recorded(d.sessions, d.device_class, now)
                fresh[d.donor_id] = round(params.p_stay(up_s, RELIABILITY_HORIZON_S), 4)
            self._reliability, self._reliability_at = fresh, now
        for entry in states.values():
            if entry["donor_id"] in self._reliability:
                entry["reliability"] = self._reliability[entry["donor_id"]]
        return states

    # monitor ------------------------------------------------------------

    def tick(self) -> list[tuple[str, str]]:
        """One reconciliation of donors with Ray's node table and heartbeat silence."""
        nodes = []
        if self.adapter is not None:
            nodes = [
                NodeObservation(node_id=n.node_id, donor_id=n.donor_id, alive=n.alive)
                for n in self.adapter.nodes()
                if n.donor_id
            ]
        changes = self.store.reconcile(nodes, self.clock(), self.settings.heartbeat_timeout_s)
        now = self.clock()
        for donor_id, what in changes:
            log.info("donor %s: %s", donor_id, what)
            self.last_changes.append((now, donor_id, what))
        del self.last_changes[:-50]
        return changes


class Registry:
    """Ray actor around RegistryCore, with a monitor thread that never dies."""

    def __init__(self, settings_json: str) -> None:
        import ray

        from dgpt.head.ray_adapter import RayAdapter

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        settings = Settings.model_validate_json(settings_json)
        # Donors must dial the address the head was started on; Ray's own view may name
        # another interface of this machine.
        gcs = f"{settings.node_ip}:{settings.ray_port}" if settings.node_ip else ray.get_runtime_context().gcs_address
        self.core = RegistryCore(settings, gcs, RayAdapter(gcs))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="registry-monitor", daemon=True)
        self._thread.start()

    def _monitor(self) -> None:
        interval = self.core.settings.monitor_interval_s
        while not self._stop.wait(interval):
            try:
                self.core.tick()
            except Exception:
                # A bad tick is logged with its traceback; the loop goes on.
                log.error("registry monitor tick failed:\n%s", traceback.format_exc())

    def ping(self) -> str:
        return "ok"

    def register(self, req: RegisterRequest, join_token: str | None) -> RegisterResponse:
        return self.core.register(req, join_token)

    def heartbeat(self, donor_id: str, secret: str | None, hb: Heartbeat) -> HeartbeatResponse:
        return self.core.heartbeat(donor_id, secret, hb)

    def leave(self, donor_id: str, secret: str | None, api_key: str | None, req: LeaveRequest) -> LeaveResponse:
        return self.core.leave(donor_id, secret, api_key, req)

    def check_api_key(self, api_key: str | None) -> str:
        return self.core.store.check_token("api", api_key)

    def list_donors(self) -> list[DonorView]:
        return self.core.store.list_donors()

    def get_donor(self, donor_id: str) -> DonorView:
        return self.core.store.get_donor(donor_id)

    def record_session(self, donor_id: str, started_at: float, ended_at: float, ended_as: str) -> None:
        self.core.store.record_session(donor_id, started_at, ended_at, ended_as)

    def set_target(self, donor_id: str, target: str) -> None:
        self.core.store.set_target(donor_id, target)

    def drain_idle(self, donor_id: str, reason: str, deadline_s: float) -> tuple[bool, str]:
        return self.core.drain_idle(donor_id, reason, deadline_s)

    def placement_snapshot(self) -> Any:
        """The running donors as a placement snapshot (``dgpt.placement.options`` reads it)."""
        from dgpt.placement.live import snapshot_from

        usage = self.core.adapter.usage_and_demand()[0] if self.core.adapter is not None else []
        return snapshot_from(self.core.store.list_donors(), usage, time.time())

    def create_token(self, kind: str, label: str) -> TokenView:
        return self.core.store.create_token(kind, label, time.time())

    def list_tokens(self) -> list[TokenView]:
        return self.core.store.list_tokens()

    def revoke_token(self, token_id: str) -> None:
        self.core.store.revoke_token(token_id, time.time())

    def node_states(self) -> dict[str, dict[str, Any]]:
        """node_id -> {donor_id, state, reliability}: what Serve's request routers rank by."""
        return self.core.node_states()

    def counts(self) -> dict[str, int]:
        return self.core.store.counts()

    def recent_changes(self) -> list[tuple[float, str, str]]:
        return list(self.core.last_changes)

    def drain_donor(self, donor_id: str, reason: str, deadline_s: float) -> LeaveResponse:
        """Head-initiated drain (operator or autoscaler)."""
        state, node_id = self.core.store.begin_leave(donor_id, reason, time.time(), deadline_s)
        drained, message = False, "not running"
        if node_id:
            drained, message = self.core.drain(node_id, f"head drains donor {donor_id} ({reason})", deadline_s)
        return LeaveResponse(donor_id=donor_id, state=state, drain_requested=drained, deadline_s=deadline_s, message=message)  # type: ignore[arg-type]


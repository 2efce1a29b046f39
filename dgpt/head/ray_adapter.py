"""The one module that talks to Ray's private APIs (GCS client, DrainNode, resource state).

Everything else in dgpt calls this small typed interface, so a Ray upgrade touches one file.
Ray is imported lazily: ``import dgpt`` must stay light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dgpt.contract import LABEL_DONOR_ID
from dgpt.exceptions import RayAdapterError
from dgpt.resources import Demand, Gang, Resources

# DrainNode reasons we use; Ray rejects IDLE_TERMINATION of a busy node, never PREEMPTION.
DRAIN_PREEMPTION = "preemption"
DRAIN_IDLE = "idle"


@dataclass(frozen=True)
class RayNode:
    """One node of Ray's node table."""

    node_id: str
    alive: bool
    labels: dict[str, str]
    resources_total: dict[str, float]
    node_ip: str
    is_head: bool
    death_reason: str = ""
    # Where its Ray metrics are exported for Prometheus (0: not known).
    metrics_export_port: int = 0
    # When its raylet registered with the GCS (ms since the epoch; 0: not known).
    started_ms: int = 0

    @property
    def donor_id(self) -> str | None:
        return self.labels.get(LABEL_DONOR_ID)


@dataclass(frozen=True)
class NodeUsage:
    """A live node's resource state as the GCS autoscaler view reports it."""

    node_id: str
    available: dict[str, float]
    total: dict[str, float]
    idle_s: float
    status: str  # RUNNING | IDLE | DRAINING | DEAD


def _selector(request: Any) -> dict[str, str]:
    """A request's label constraints in Ray's selector syntax (``v``, ``in(a, b)``, ``!v``, ``!in(a, b)``).

    Ray Train's elastic runs ask for their workers with ``donor-id in(...)`` of the donors
    chosen for them; the autoscaler matches these against standby donors' labels.
    """
    out: dict[str, str] = {}
    for selector in getattr(request, "label_selectors", ()):
        for c in selector.label_constraints:
            op = c.DESCRIPTOR.fields_by_name["operator"].enum_type.values_by_number[c.operator].name
            values = sorted(c.label_values)
            if not values or not op.endswith("_IN"):
                continue
            body = values[0] if len(values) == 1 else f"in({', '.join(values)})"
            out[c.label_key] = f"!{body}" if op.endswith("NOT_IN") else body
    return out


def _shape(request: Any) -> Resources:
    return Resources.from_ray(dict(request.resources_bundle), _selector(request))


def _strategy(gang: Any) -> str:
    """Ray encodes SPREAD-type groups as anti-affinity between bundles, PACK as affinity."""
    constraints = [c for r in gang.requests for c in r.placement_constraints]
    if any(c.HasField("anti_affinity") for c in constraints):
        return "STRICT_SPREAD"
    if any(c.HasField("affinity") for c in constraints):
        return "STRICT_PACK"
    return "PACK"


class RayAdapter:
    """Typed access to the GCS of one Ray cluster."""

    def __init__(self, gcs_address: str | None = None) -> None:
        import ray
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        if gcs_address is None:
            if not ray.is_initialized():
                raise RayAdapterError("not connected to Ray and no GCS address given")
            gcs_address = ray.get_runtime_context().gcs_address
        self.gcs_address = gcs_address
        try:
            self._gcs = GcsClient(address=gcs_address)
        except Exception as exc:  # pragma: no cover - depends on Ray internals
            raise RayAdapterError(f"cannot reach the Ray GCS at {gcs_address}: {exc}") from exc

    def nodes(self, timeout_s: float = 10.0) -> list[RayNode]:
        """Every node the GCS knows, alive and dead (dead ones stay listed for a while)."""
        from ray.core.generated import gcs_pb2

        try:
            infos = self._gcs.get_all_node_info(timeout=timeout_s)
        except Exception as exc:
            raise RayAdapterError(f"listing Ray nodes failed: {exc}") from exc
        out = []
        for node_id, info in infos.items():
            death = ""
            if info.HasField("death_info"):
                death = info.death_info.reason_message or str(info.death_info.reason)
            out.append(
                RayNode(
                    node_id=node_id.hex(),
                    alive=info.state == gcs_pb2.GcsNodeInfo.ALIVE,  # type: ignore[attr-defined]
                    labels=dict(info.labels),
                    resources_total=dict(info.resources_total),
                    node_ip=info.node_manager_address,
                    is_head=bool(info.is_head_node),
                    death_reason=death,
                    metrics_export_port=int(info.metrics_export_port),
                    started_ms=int(info.start_time_ms),
                )
            )
        return out

    def drain_node(self, node_id: str, reason: str, message: str, deadline_s: float) -> tuple[bool, str]:
        """Ask the GCS to drain a node: no new work lands there; Serve moves replicas first.

        The raylet exits by itself once it is drained and idle; past the deadline the
        caller stops it. Returns (accepted, rejection message).
        """
        from ray.core.generated import autoscaler_pb2

        reasons = {
            DRAIN_PREEMPTION: autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,  # type: ignore[attr-defined]
            DRAIN_IDLE: autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_IDLE_TERMINATION,  # type: ignore[attr-defined]
        }
        if reason not in reasons:
            raise ValueError(f"drain reason must be one of {sorted(reasons)}, got {reason!r}")
        deadline_ms = int((time.time() + deadline_s) * 1000)
        try:
            accepted, rejection = self._gcs.drain_node(node_id, reasons[reason], message, deadline_ms)
        except Exception as exc:
            raise RayAdapterError(f"DrainNode({node_id[:8]}) failed: {exc}") from exc
        return bool(accepted), str(rejection or "")

    def draining_nodes(self) -> dict[str, int]:
        """node_id -> drain deadline (ms since epoch; 0 = none) of nodes being drained."""
        try:
            raw = self._gcs.get_draining_nodes()
        except Exception as exc:
            raise RayAdapterError(f"listing draining nodes failed: {exc}") from exc
        return {(k.hex() if hasattr(k, "hex") else str(k)): int(v) for k, v in raw.items()}

    def announce_autoscaler(self) -> None:
        """Tell Ray's clients an autoscaler v2 serves this cluster.

        `ray.autoscaler.sdk.request_resources()` then sends its request to the GCS, where
        :meth:`usage_and_demand` reads it (older clients write the v1 key, read too).
        """
        from ray._raylet import (  # type: ignore[attr-defined]
            GCS_AUTOSCALER_STATE_NAMESPACE,
            GCS_AUTOSCALER_V2_ENABLED_KEY,
        )

        try:
            self._gcs.internal_kv_put(GCS_AUTOSCALER_V2_ENABLED_KEY.encode(), b"1", True,
                                      GCS_AUTOSCALER_STATE_NAMESPACE.encode())
        except Exception as exc:
            raise RayAdapterError(f"announcing the autoscaler to the GCS failed: {exc}") from exc

    def _v1_resource_request(self) -> list[Resources]:
        import json

        from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL

        try:
            raw = self._gcs.internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL, None)
            bundles = json.loads(raw) if raw else []
        except Exception:
            return []  # absent or unreadable: no standing request
        return [Resources.from_ray({k: float(v) for k, v in b.items()}) for b in bundles if isinstance(b, dict)]

    def usage_and_demand(self) -> tuple[list[NodeUsage], Demand]:
        """Per-node usage and the cluster's unmet demand, from the GCS autoscaler state."""
        from ray.autoscaler.v2.sdk import get_cluster_resource_state
        from ray.core.generated import autoscaler_pb2

        try:
            state = get_cluster_resource_state(self._gcs)
        except Exception as exc:
            raise RayAdapterError(f"reading cluster resource state failed: {exc}") from exc
        status_name = autoscaler_pb2.NodeStatus.Name  # type: ignore[attr-defined]
        usage = [
            NodeUsage(
                node_id=n.node_id.hex() if isinstance(n.node_id, bytes) else str(n.node_id),
                available=dict(n.available_resources),
                total=dict(n.total_resources),
                idle_s=n.idle_duration_ms / 1000.0,
                status=status_name(n.status),
            )
            for n in state.node_states
        ]
        pending: list[Resources] = []
        for req in state.pending_resource_requests:
            pending.extend([_shape(req.request)] * max(1, req.count))
        gangs = [Gang(tuple(_shape(r) for r in g.requests), _strategy(g)) for g in state.pending_gang_resource_requests]
        constraints: list[Resources] = []
        for c in state.cluster_resource_constraints:
            for r in c.resource_requests:
                constraints.extend([_shape(r.request)] * max(1, r.count))
        constraints.extend(self._v1_resource_request())
        return usage, Demand.of(pending, gangs, constraints)

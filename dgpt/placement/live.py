"""The live cluster as a placement snapshot, for research code calling ``dgpt.placement.options``.

The registry on the head builds the snapshot (its donors, their sessions and Ray's per-node
usage: :func:`snapshot_from`); a driver fetches it with :func:`current_snapshot`. Placements
this process made in the last few seconds are held as reservations until Ray's usage shows
them, so three quick ``options("inference")`` calls land on three donors, not one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from dgpt.exceptions import PlacementError
from dgpt.placement import labels as lbl
from dgpt.placement.snapshot import ClusterSnapshot, NodeView
from dgpt.reliability.model import fit_recorded

#: How long a placement counts against its donor's free capacity: long enough for Ray to
#: schedule the work and report it, short enough that a cancelled call frees the room soon.
RESERVATION_TTL_S = 10.0


@dataclass(frozen=True)
class Reservation:
    at: float
    kind: str
    donor_id: str
    owner: str
    resources: Mapping[str, float]


_lock = threading.Lock()
_reservations: list[Reservation] = []


def snapshot_from(donors: Iterable[Any], usage: Iterable[Any], now_s: float) -> ClusterSnapshot:
    """A snapshot of the running donors (pure: registry ``DonorView``s and adapter ``NodeUsage``s)."""
    by_node = {u.node_id: u for u in usage}
    nodes = []
    for d in donors:
        node = by_node.get(d.node_id or "")
        if d.state not in ("active", "draining") or node is None or node.status == "DEAD":
            continue
        cpu_total = float(node.total.get("CPU", 0.0)) or 1.0
        gpus = d.caps.gpus
        nodes.append(NodeView(
            node_id=d.node_id, donor_id=d.donor_id, owner=d.owner, device_class=d.device_class,
            gpu=d.labels.get(lbl.GPU) if gpus else None,
            total=dict(node.total), available=dict(node.available),
            load=1.0 - float(node.available.get("CPU", 0.0)) / cpu_total,
            gflops=d.gflops,
            draining=d.state == "draining" or node.status == "DRAINING",
            labels=dict(d.labels),
            reliability=fit_recorded(d.sessions, d.device_class, now_s),
            session_start_s=d.session_started_at(now_s),
        ))
    return ClusterSnapshot(nodes=tuple(nodes), now_s=now_s)


def _with_reservations(snapshot: ClusterSnapshot, now_s: float) -> ClusterSnapshot:
    with _lock:
        _reservations[:] = [r for r in _reservations if now_s - r.at < RESERVATION_TTL_S]
        held = list(_reservations)
    if not held:
        return snapshot
    nodes = []
    for n in snapshot.nodes:
        mine = [r for r in held if r.donor_id == n.donor_id]
        if mine:
            available = dict(n.available)
            for r in mine:
                for key, amount in r.resources.items():
                    available[key] = max(0.0, available.get(key, 0.0) - amount)
            n = replace(n, available=available)
        nodes.append(n)
    return ClusterSnapshot(nodes=tuple(nodes), now_s=snapshot.now_s)


def recent_owners(kind: str, now_s: float | None = None) -> set[str]:
    """Owners given work of ``kind`` by this process in the last ``RESERVATION_TTL_S``."""
    now_s = time.time() if now_s is None else now_s
    with _lock:
        return {r.owner for r in _reservations if r.kind == kind and now_s - r.at < RESERVATION_TTL_S}


def reserve(kind: str, ray_options: Mapping[str, Any], snapshot: ClusterSnapshot) -> None:
    """Hold the resources of a placement just handed out until Ray's usage reports them."""
    donor_id = ray_options.get("label_selector", {}).get(lbl.DONOR_ID)
    owner = next((n.owner for n in snapshot.nodes if n.donor_id == donor_id), "")
    resources = {"CPU": float(ray_options.get("num_cpus", 0.0)), "GPU": float(ray_options.get("num_gpus", 0.0)),
                 "memory": float(ray_options.get("memory", 0.0))}
    with _lock:
        _reservations.append(Reservation(time.time(), kind, str(donor_id), owner, resources))


def current_snapshot() -> ClusterSnapshot:
    """The running cluster's snapshot, from the dgpt registry on the head.

    Raises:
        PlacementError: this driver is not in a dgpt fabric (no registry actor).
    """
    import ray

    from dgpt.head.registry import NAMESPACE, REGISTRY_NAME

    if not ray.is_initialized():
        ray.init()  # as Ray itself does on the first .remote(): RAY_ADDRESS or a local cluster
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise PlacementError(
            "this Ray cluster has no dgpt registry, so dgpt cannot place work on donors",
            hint="connect to a dgpt fabric (`eval \"$(dgpt env)\"`), or drop dgpt.placement and let Ray place it",
        ) from None
    snapshot: Any = ray.get(registry.placement_snapshot.remote(), timeout=60)
    assert isinstance(snapshot, ClusterSnapshot)
    return _with_reservations(snapshot, time.time())

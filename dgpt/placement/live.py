"""The live fleet view, for research code calling ``dgpt.placement.options`` in a driver.

The registry on the head keeps the fleet view (its active donors with Ray's per-node usage);
a driver fetches it with :func:`current_snapshot`, through Ray, by the actor name in
``dgpt.contract``. Placements this process made in the last few seconds are held as
reservations until Ray's usage shows them, so three quick ``options("inference")`` calls
land on three donors, not one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dgpt import contract
from dgpt.exceptions import PlacementError
from dgpt.fleet import DonorColumns, FleetView
from dgpt.resources import Resources

#: How long a placement counts against its donor's free capacity: long enough for Ray to
#: schedule the work and report it, short enough that a cancelled call frees the room soon.
RESERVATION_TTL_S = 10.0


@dataclass(frozen=True)
class Reservation:
    at: float
    kind: str
    donor_id: str
    owner: str
    resources: Resources


_lock = threading.Lock()
_reservations: list[Reservation] = []


def _with_reservations(snapshot: FleetView, now_s: float) -> FleetView:
    with _lock:
        _reservations[:] = [r for r in _reservations if now_s - r.at < RESERVATION_TTL_S]
        held = list(_reservations)
    if not held:
        return snapshot
    donors = DonorColumns.of(snapshot.active)  # only the reserved donors are read one by one
    reserved = {r.donor_id for r in held}
    free = {d: donors[j].free for j, d in enumerate(donors.donor_ids) if d in reserved}
    for r in held:
        if r.donor_id in free:
            free[r.donor_id] = free[r.donor_id].minus(r.resources)
    return replace(snapshot, active=donors.with_free(free))


def recent_owners(kind: str, now_s: float | None = None) -> set[str]:
    """Owners given work of ``kind`` by this process in the last ``RESERVATION_TTL_S``."""
    now_s = time.time() if now_s is None else now_s
    with _lock:
        return {r.owner for r in _reservations if r.kind == kind and now_s - r.at < RESERVATION_TTL_S}


def reserve(kind: str, ray_options: Mapping[str, Any], snapshot: FleetView) -> None:
    """Hold the resources of a placement just handed out until Ray's usage reports them."""
    donor_id = ray_options.get("label_selector", {}).get(contract.LABEL_DONOR_ID)
    donors = DonorColumns.of(snapshot.active)
    owner = next((donors.owners[j] for j, d in enumerate(donors.donor_ids) if d == donor_id), "")
    resources = Resources(float(ray_options.get("num_cpus", 0.0)), float(ray_options.get("num_gpus", 0.0)),
                          float(ray_options.get("memory", 0.0)))
    with _lock:
        _reservations.append(Reservation(time.time(), kind, str(donor_id), owner, resources))


def current_snapshot() -> FleetView:
    """The running cluster's snapshot, from the dgpt registry on the head.

    Raises:
        PlacementError: this driver is not in a dgpt fabric (no registry actor).
    """
    import ray

    if not ray.is_initialized():
        ray.init()  # as Ray itself does on the first .remote(): RAY_ADDRESS or a local cluster
    try:
        registry = ray.get_actor(contract.REGISTRY_ACTOR, namespace=contract.NAMESPACE)
    except ValueError:
        raise PlacementError(
            "this Ray cluster has no dgpt registry, so dgpt cannot place work on donors",
            hint="connect to a dgpt fabric (`eval \"$(dgpt env)\"`), or drop dgpt.placement and let Ray place it",
        ) from None
    snapshot: Any = ray.get(registry.placement_view.remote(), timeout=60)
    assert isinstance(snapshot, FleetView)
    return _with_reservations(snapshot, time.time())

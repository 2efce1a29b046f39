"""Turn placement decisions into Ray 2.60 options; the public ``options()`` and ``gang()``.

A chosen donor is pinned with Ray's label selectors on the ``dgpt.io/donor-id`` node label
(DESIGN.md's naming contract), which Ray 2.60 accepts both on ``.options(...)`` of tasks and
actors (``label_selector``, with ``fallback_strategy`` for soft pinning) and per bundle of
a placement group (``bundle_label_selector``). Label selectors survive a node restarting
under a new node id (a donor reconnecting), which ``NodeAffinitySchedulingStrategy`` would
not. Only :func:`gang` touches Ray, and it imports Ray inside the function.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dgpt import contract
from dgpt.contract import is_valid_label_value
from dgpt.exceptions import InsufficientCapacity, PlacementError
from dgpt.fleet import FleetView
from dgpt.placement.policy import (
    INFERENCE_HORIZON_S,
    Decision,
    Placement,
    Unplaced,
    WorkloadKind,
    checked_request,
    place_gang,
    place_replicas,
    place_task,
    request_from_bundle,
)
from dgpt.resources import Resources

if TYPE_CHECKING:  # pragma: no cover
    from ray.util.placement_group import PlacementGroup

#: Default horizon per kind when the caller gives none: a batch task runs minutes, a replica
#: must repay its warm-up (an hour), a training actor runs for hours between restarts.
DEFAULT_HORIZON_S: Mapping[WorkloadKind, float] = {
    WorkloadKind.BATCH: 600.0,
    WorkloadKind.INFERENCE: INFERENCE_HORIZON_S,
    WorkloadKind.TRAINING: 4 * 3600.0,
}

_RAY_RESOURCE_OPTIONS = {"num_cpus": "cpus", "num_gpus": "gpus", "memory": "memory_bytes"}
_NO_ROOM_HINT = (
    "wait a few seconds for the autoscaler to activate standby donors, or ask for less; "
    "`GET /api/v1/cluster` shows free capacity and pending demand"
)


def _checked_donor(donor_id: str) -> str:
    if not is_valid_label_value(donor_id):
        raise PlacementError(
            f"donor id {donor_id!r} cannot be used in a Ray label selector",
            hint="donor ids must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric",
        )
    return donor_id


def task_options(decision: Placement, index: int = 0, *, soft: bool = True) -> dict[str, Any]:
    """Ray ``.options(**d)`` that send one task or actor where ``decision`` put member ``index``.

    Args:
        decision: a placement from :mod:`dgpt.placement.policy`.
        index: which of the decision's nodes (a replica or gang member).
        soft: also allow the decision's alternates, then any donor matching the request's
            labels, if the chosen donor is gone by the time Ray schedules.

    Returns:
        ``num_cpus`` / ``num_gpus`` / ``memory``, ``label_selector`` and, when soft,
        ``fallback_strategy``.
    """
    request = decision.requests[index]
    donor = _checked_donor(decision.donor_ids[index])
    out: dict[str, Any] = {"num_cpus": request.cpus}
    if request.gpus:
        out["num_gpus"] = request.gpus
    if request.memory_bytes:
        out["memory"] = int(request.memory_bytes)
    out["label_selector"] = {**request.label_selector, contract.LABEL_DONOR_ID: donor}
    if soft:
        fallbacks: list[dict[str, Any]] = []
        alternates = [_checked_donor(a) for a in decision.alternates if a != donor]
        if alternates:
            fallbacks.append(
                {
                    "label_selector": {
                        **request.label_selector,
                        contract.LABEL_DONOR_ID: f"in({', '.join(alternates)})",
                    }
                }
            )
        fallbacks.append({"label_selector": {contract.LABEL_ROLE: contract.ROLE_DONOR, **request.label_selector}})
        out["fallback_strategy"] = fallbacks
    return out


def placement_group_args(
    decision: Placement, *, name: str = "", lifetime: str | None = None
) -> dict[str, Any]:
    """Arguments of ``ray.util.placement_group(**args)`` that pin each bundle to its donor.

    The policy puts every bundle on a distinct donor, so the strategy is ``STRICT_SPREAD``.

    Raises:
        PlacementError: a bundle asks for nothing (Ray rejects empty bundles).
    """
    bundles = [r.as_ray() for r in decision.requests]
    if any(not b for b in bundles):
        raise PlacementError(
            "a gang bundle asks for no resources", hint="give every bundle some CPU, GPU or memory"
        )
    return {
        "bundles": bundles,
        "strategy": "STRICT_SPREAD",
        "bundle_label_selector": [
            {**r.label_selector, contract.LABEL_DONOR_ID: _checked_donor(d)}
            for r, d in zip(decision.requests, decision.donor_ids, strict=True)
        ],
        "name": name,
        "lifetime": lifetime,
    }


def _resolve(snapshot: FleetView | None) -> FleetView:
    if snapshot is not None:
        return snapshot
    from dgpt.placement.live import current_snapshot  # lazy: talks to the running cluster

    return current_snapshot()


def _request(
    resources: Mapping[str, Any], label_selector: Mapping[str, str] | None
) -> Resources:
    unknown = sorted(set(resources) - set(_RAY_RESOURCE_OPTIONS))
    if unknown:
        raise PlacementError(
            f"unknown resource option(s): {', '.join(unknown)}",
            hint="use num_cpus=, num_gpus=, memory= (bytes), and label_selector= for the rest",
        )
    values = {"cpus": 1.0, "gpus": 0.0, "memory_bytes": 0.0}
    for key, value in resources.items():
        values[_RAY_RESOURCE_OPTIONS[key]] = float(value)
    return checked_request(values["cpus"], values["gpus"], values["memory_bytes"], label_selector)


def _placed(decision: Decision) -> Placement:
    if isinstance(decision, Unplaced):
        raise InsufficientCapacity(
            f"cannot place {decision.kind.value} work: {decision.reason}", hint=_NO_ROOM_HINT
        )
    return decision


#: Owners a replica that waits for a new failure domain may land on: enough that one of
#: them activates soon, few enough to keep the label selector short.
MAX_SPARE_OWNERS = 8


def await_new_owner(request: Resources, owners: Sequence[str]) -> dict[str, Any]:
    """Options that hold a replica until a donor of one of ``owners`` joins.

    Every active owner already runs a replica (or none has room), but standby donors of
    other owners exist: rather than pile onto an owner, the replica waits as pending demand,
    and the autoscaler activates a donor of a new owner for it.
    """
    out: dict[str, Any] = {"num_cpus": request.cpus}
    if request.gpus:
        out["num_gpus"] = request.gpus
    if request.memory_bytes:
        out["memory"] = int(request.memory_bytes)
    out["label_selector"] = {**request.label_selector, contract.LABEL_ROLE: contract.ROLE_DONOR,
                             contract.LABEL_OWNER: f"in({', '.join(owners)})"}
    return out


def decide_options(
    kind: str | WorkloadKind,
    snapshot: FleetView,
    *,
    horizon_s: float | None = None,
    existing_owners: Collection[str] = (),
    label_selector: Mapping[str, str] | None = None,
    soft: bool = True,
    **resources: float,
) -> dict[str, Any]:
    """Pure core of :func:`options`: same arguments, but the snapshot is required."""
    wk = WorkloadKind.parse(kind)
    request = _request(resources, label_selector)
    horizon = DEFAULT_HORIZON_S[wk] if horizon_s is None else horizon_s
    table = snapshot.table
    if wk is WorkloadKind.INFERENCE:
        decision = place_replicas(
            table, request, 1, snapshot.now_s, existing_owners=existing_owners, horizon_s=horizon
        )
        spare = [o for o in snapshot.spare_owners if o not in existing_owners][:MAX_SPARE_OWNERS]
        shared = isinstance(decision, Placement) and snapshot.active[decision.nodes[0]].owner in existing_owners
        if spare and (shared or isinstance(decision, Unplaced)):
            return await_new_owner(request, spare)
    else:
        decision = place_task(table, request, snapshot.now_s, kind=wk, horizon_s=horizon)
    return task_options(_placed(decision), soft=soft)


def options(
    kind: str | WorkloadKind,
    snapshot: FleetView | None = None,
    *,
    horizon_s: float | None = None,
    existing_owners: Collection[str] = (),
    label_selector: Mapping[str, str] | None = None,
    soft: bool = True,
    **resources: float,
) -> dict[str, Any]:
    """Ray options that place one task or actor on the donor dgpt's policy picks.

    Use as ``f.options(**dgpt.placement.options("batch", num_cpus=2)).remote()``.

    Args:
        kind: ``"training"``, ``"inference"`` or ``"batch"``: whose objective to use.
        snapshot: the cluster view; the live cluster's when omitted.
        horizon_s: how long the work should run (defaults per kind: 10 min / 1 h / 4 h).
        existing_owners: for inference, owners already running a replica of the deployment.
        label_selector: extra node-label conditions, e.g. ``{"dgpt.io/gpu": "A100"}``.
        soft: let Ray fall back to the next-best donors, then any donor, if the pick is gone.
        **resources: ``num_cpus`` (default 1), ``num_gpus``, ``memory`` (bytes).

    Returns:
        A dict for ``.options(**d)``.

    Raises:
        PlacementError: an unknown kind or resource option, or a negative amount.
        InsufficientCapacity: no donor has room right now.
    """
    if snapshot is not None:
        return decide_options(kind, snapshot, horizon_s=horizon_s, existing_owners=existing_owners,
                              label_selector=label_selector, soft=soft, **resources)
    from dgpt.placement import live  # lazy: talks to the running cluster

    wk = WorkloadKind.parse(kind)
    snap = live.current_snapshot()
    if wk is WorkloadKind.INFERENCE and not existing_owners:
        # Replicas placed by this process a moment ago are not in Ray's usage yet.
        existing_owners = live.recent_owners(wk.value)
    out = decide_options(wk, snap, horizon_s=horizon_s, existing_owners=existing_owners,
                         label_selector=label_selector, soft=soft, **resources)
    live.reserve(wk.value, out, snap)
    return out


def gang_args(
    kind: str | WorkloadKind,
    bundles: Sequence[Mapping[str, float]],
    snapshot: FleetView,
    *,
    horizon_s: float = DEFAULT_HORIZON_S[WorkloadKind.TRAINING],
    label_selector: Mapping[str, str] | None = None,
    name: str = "",
    lifetime: str | None = None,
) -> dict[str, Any]:
    """Pure core of :func:`gang`: the ``placement_group`` arguments for a snapshot."""
    wk = WorkloadKind.parse(kind)
    if not bundles:
        raise PlacementError(
            "a gang needs at least one bundle", hint="pass bundles=[{'CPU': 1}, ...]"
        )
    requests = [request_from_bundle(b, label_selector) for b in bundles]
    decision = place_gang(snapshot.table, requests, snapshot.now_s, horizon_s=horizon_s, kind=wk)
    return placement_group_args(_placed(decision), name=name, lifetime=lifetime)


def gang(
    kind: str | WorkloadKind,
    bundles: Sequence[Mapping[str, float]],
    horizon_s: float = DEFAULT_HORIZON_S[WorkloadKind.TRAINING],
    snapshot: FleetView | None = None,
    *,
    label_selector: Mapping[str, str] | None = None,
    name: str = "",
    lifetime: str | None = None,
) -> PlacementGroup:
    """Create a Ray placement group whose bundles sit on donors chosen as one gang.

    Args:
        kind: usually ``"training"``; picks the score weights.
        bundles: one ``{"CPU": .., "GPU": .., "memory": ..}`` mapping per gang member.
        horizon_s: how long the gang must hold together.
        snapshot: the cluster view; the live cluster's when omitted.
        label_selector: node-label conditions every member must meet.
        name, lifetime: passed to ``ray.util.placement_group``.

    Returns:
        The created ``PlacementGroup`` (wait on ``pg.ready()``).

    Raises:
        PlacementError: bad bundles or kind.
        InsufficientCapacity: no set of distinct donors can hold the gang now.
    """
    args = gang_args(
        kind,
        bundles,
        _resolve(snapshot),
        horizon_s=horizon_s,
        label_selector=label_selector,
        name=name,
        lifetime=lifetime,
    )
    from ray.util.placement_group import placement_group  # lazy: keeps `import dgpt` light

    return placement_group(**args)

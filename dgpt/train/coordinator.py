"""A donor-aware autoscaling coordinator for Ray Train's elastic runs (the one module on its private API).

Ray Train 2.60 sizes an elastic worker group from Ray Data's ``AutoscalingCoordinator``
actor (``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator``): Train
registers its ``max_workers`` bundles there, the coordinator forwards them to
``request_resources`` and reserves cluster capacity for them, and Train starts as many
workers as the reservation holds. Three things about the stock coordinator hurt on donors
(read in Ray 2.60's source):

1. it refreshes its view of the cluster every 20 s (``TICK_INTERVAL_S``), so after a donor
   leaves, Train keeps counting it and tries to start a worker group that cannot be placed,
   then waits out ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` before trying again;
2. it counts draining nodes (it drops only dead ones), where Ray schedules nothing new
   (read here with the same GCS call as Ray Train's preemption watcher);
3. it ignores the bundles' label selectors when reserving (``_compute_reservations``), so a
   run restricted to some donors is counted as if it could use them all.

:class:`DonorAwareCoordinator` (built by :func:`coordinator_class`) is the stock actor with
a 2 s tick, draining nodes left out, and label-aware reservations (:func:`reserve`, pure).
The head starts it under the stock actor's name before any job runs
(:func:`start_coordinator`); Ray Train and Ray Data then find it by name and use it
unchanged. If Ray's internals move, starting it fails with a warning and Train creates the
stock coordinator itself, as without dgpt.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dgpt.contract import selector_matches

log = logging.getLogger("dgpt.train.coordinator")

#: Ray's names for the coordinator actor (default_autoscaling_coordinator.py).
COORDINATOR_NAME = "AutoscalingCoordinator"
COORDINATOR_NAMESPACE = "AutoscalingCoordinator"
#: How often the view of the cluster is refreshed: a departed donor stops being counted
#: within about one controller poll (1 s) plus this; each tick costs two GCS reads.
TICK_S = 2.0

ResourceDict = dict[str, float]


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items())


def _take(node: dict[str, float], bundle: Mapping[str, float]) -> None:
    for k, v in bundle.items():
        if k in node:
            node[k] -= v


def _add(target: dict[str, float], bundle: Mapping[str, float]) -> None:
    for k, v in bundle.items():
        if v:
            target[k] = target.get(k, 0.0) + v


def reserve(
    bundles: Sequence[Mapping[str, float]],
    selectors: Sequence[Mapping[str, str]],
    strategy: str,
    capacity: Mapping[str, Mapping[str, float]],
    labels: Mapping[str, Mapping[str, str]],
) -> dict[str, ResourceDict]:
    """Reserve ``bundles`` on nodes, each only where its label selector matches.

    Mirrors Ray 2.60's ``_compute_reservations`` (best effort: a bundle that fits nowhere
    is skipped; PACK scans from the last node used, SPREAD from the next one,
    STRICT_SPREAD never reuses a node, STRICT_PACK needs one node for the sum), with the
    one difference that a node must satisfy the bundle's selector.

    Args:
        bundles: the requester's bundles.
        selectors: one label selector per bundle (``{}``: any node).
        strategy: ``PACK``, ``SPREAD``, ``STRICT_PACK`` or ``STRICT_SPREAD``.
        capacity: node id -> resources still unreserved (not modified).
        labels: node id -> its labels.

    Returns:
        node id -> resources reserved there.
    """
    free = {n: dict(r) for n, r in capacity.items()}
    nodes = list(free)
    out: dict[str, ResourceDict] = {}
    if not nodes or not bundles:
        return out
    sels = list(selectors) + [{}] * (len(bundles) - len(selectors))
    if strategy == "STRICT_PACK":
        total: ResourceDict = {}
        merged: dict[str, str] = {}
        for b, s in zip(bundles, sels, strict=True):
            _add(total, b)
            merged.update(s)
        for n in nodes:
            if selector_matches(merged, labels.get(n, {})) and _fits(total, free[n]):
                return {n: total}
        return {}
    spread = strategy in ("SPREAD", "STRICT_SPREAD")
    used: set[str] = set()
    start = 0
    for bundle, sel in zip(bundles, sels, strict=True):
        for offset in range(len(nodes)):
            i = (start + offset) % len(nodes)
            n = nodes[i]
            if strategy == "STRICT_SPREAD" and n in used:
                continue
            if sel and not selector_matches(sel, labels.get(n, {})):
                continue
            if _fits(bundle, free[n]):
                _take(free[n], bundle)
                _add(out.setdefault(n, {}), bundle)
                used.add(n)
                start = i + 1 if spread else i
                break
    return out


class RequestForwarder:
    """Forwards the coordinator's merged request to ``request_resources``, but no empty one
    while nothing of its own stands.

    Ray keeps one standing ``request_resources()`` request per cluster, and the stock
    coordinator sends its merged request (empty when no run asks for anything) on every
    tick. dgpt starts the coordinator with the head, so that would wipe a user's own
    ``request_resources()`` call within a tick. While a run asks for bundles, its request
    stands (Ray's one slot, as with the stock coordinator); once it is withdrawn, the empty
    request is sent once to clear it.
    """

    def __init__(self, send: Any) -> None:
        self._send = send
        self._standing = False

    def __call__(self, bundles: list[ResourceDict], label_selectors: Any = None) -> None:
        if not bundles and not self._standing:
            return
        self._standing = bool(bundles)
        if label_selectors is None:
            self._send(bundles)
        else:
            self._send(bundles, label_selectors)


def coordinator_class() -> type:
    """The donor-aware coordinator actor class (Ray's internals are imported only here).

    Raises:
        ImportError, AttributeError: Ray's coordinator moved; the caller falls back.
    """
    import ray
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as dac

    base: Any = dac._AutoscalingCoordinatorActor

    class DonorAwareCoordinator(base):  # type: ignore[misc, valid-type]
        TICK_INTERVAL_S = TICK_S

        def __init__(self) -> None:
            self._node_labels: dict[str, dict[str, str]] = {}
            super().__init__(get_cluster_nodes=self._schedulable_nodes,
                             send_resources_request=RequestForwarder(dac._default_send_resources_request))

        def dgpt_coordinator(self) -> str:
            """Marks this actor as dgpt's (tests and `dgpt status` ask)."""
            return "donor-aware"

        def _draining(self) -> set[str]:
            try:
                # The call Ray Train's own PreemptionWatcher makes (execution/preemption.py).
                return set(ray._private.state.state.get_draining_nodes())
            except Exception as exc:  # a GCS hiccup must not stop reservations
                log.warning("could not read draining nodes: %s", exc)
                return set()

        def _schedulable_nodes(self) -> list[dict[str, Any]]:
            draining = self._draining()
            nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("NodeID") not in draining]
            self._node_labels = {n["NodeID"]: dict(n.get("Labels") or {}) for n in nodes}
            return nodes

        def _refresh_resource_reservations(self) -> None:
            # Ray 2.60's method with label-aware reservations (module docstring, point 3).
            now = self._get_current_time()
            capacity = copy.deepcopy(self._cluster_node_resources)
            live = sorted(((rid, req) for rid, req in self._ongoing_reqs.items() if req.expiration_time >= now),
                          key=lambda item: item[1])

            def subcluster(rid: str) -> Any:
                sel = self._subcluster_selectors.get(rid)
                return (sel or {}).get(dac.SUBCLUSTER_LABEL_KEY, dac.DEFAULT_SUBCLUSTER)

            for rid, req in live:
                req.reserved_resources = {}
                pool = capacity.get(subcluster(rid), {})
                got = reserve(req.requested_resources, req.requested_label_selectors, req.strategy.value,
                              pool, self._node_labels)
                for node_id, bundle in got.items():
                    _take(pool[node_id], bundle)
                    _add(req.reserved_resources.setdefault(node_id, {}), bundle)
            # Leftovers are shared equally among requesters that asked for them (Ray Data).
            wanting = [(rid, req) for rid, req in live if req.request_remaining]
            for bucket, pool in capacity.items():
                eligible = [req for rid, req in wanting if subcluster(rid) == bucket]
                for node_id, left in pool.items():
                    for kind, amount in left.items():
                        takers = [r for r in eligible if kind in r.request_remaining]
                        share = amount // len(takers) if takers and amount > 0 else 0
                        for r in takers if share > 0 else ():
                            _add(r.reserved_resources.setdefault(node_id, {}), {kind: share})

    return DonorAwareCoordinator


def start_coordinator() -> str:
    """Start the donor-aware coordinator on this (the head's) node under Ray's name.

    Returns:
        ``"donor-aware"`` when dgpt's coordinator runs, ``"stock"`` when one of Ray's was
        already running (started by an earlier job), ``"unavailable"`` when Ray's
        internals moved and Train will use its own.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        cls = coordinator_class()
    except (ImportError, AttributeError) as exc:
        log.warning("Ray's autoscaling coordinator moved (%s); elastic runs use Ray's own", exc)
        return "unavailable"
    actor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(cls).options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()
    try:
        return str(ray.get(actor.dgpt_coordinator.remote(), timeout=60))
    except AttributeError:
        return "stock"
    except ray.exceptions.RayActorError:
        return "stock"

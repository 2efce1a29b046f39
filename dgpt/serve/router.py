"""DonorAwareRouter: the Ray Serve request router that steers requests by donor state and latency.

Set it on a deployment with ``request_router_config``::

    request_router_config:
      request_router_class: dgpt.serve.router:DonorAwareRouter
      request_router_kwargs: {registry_refresh_period_s: 1.0}   # optional, see RouterSettings

What it does per request (the policy itself is pure and lives in ``dgpt.serve.ranking``):
drop replicas whose donor is draining/lost/gone, draw two of the rest at random, and offer
them to Serve cheapest first by expected completion time ``(queue + 1) * latency``,
inflated for unreliable donors. Serve then sends the request to the first offered replica
whose queue has room, exactly as with its default power-of-two-choices router.

Where the numbers come from (Ray 2.60's router hooks):

- queue lengths: Serve's own queue-length cache (replica probes, updated on send and on
  completion), else this router's count of its in-flight requests;
- latency: measured here, from ``on_request_routed`` (the replica accepted the request) to
  ``on_request_completed`` (the response finished), folded into a per-replica EWMA; a
  replica this router has not measured yet starts from the ``ewma_latency_ms`` it reports
  through Serve's routing stats (``record_routing_stats`` on the deployment), else from
  the median of the other replicas;
- donor state, reliability, trust and owner: the ``registry`` actor in namespace ``dgpt``,
  asked in the background at most once per ``registry_refresh_period_s``; a routing
  decision never waits for it. Without a registry every node counts as active with
  reliability 0.5 and unknown trust.

Donors whose verification trust is below ``min_trust`` get no requests while others can
take them. A shadow copy of a request (``dgpt.serve.shadow``: its keyword arguments carry
``ranking.SHADOW_KWARG``) goes to a replica of another owner and node than its hint names,
when there is one.

The registry interface this router relies on::

    ray.get_actor(REGISTRY_ACTOR, namespace=NAMESPACE).node_states.remote()
      -> {node_id_hex: {"donor_id": str, "state": "active" | "draining" | ...,
                        "reliability": float in 0..1, "reachable": bool,
                        "trust": float in 0..1 (optional), "owner": str (optional)}}
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.exceptions import RayActorError
from ray.serve._private.constants import SERVE_LOGGER_NAME
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from dgpt.contract import NAMESPACE, REGISTRY_ACTOR, DonorState
from dgpt.exceptions import ServeError
from dgpt.serve.ranking import (
    UNKNOWN_DONOR,
    DonorInfo,
    LatencyEstimate,
    RankingParams,
    ReplicaView,
    avoiding,
    choose_pair,
    fleet_prior_ms,
    parse_shadow_hint,
    rank_candidates,
    tier,
    update_latency,
)

__all__ = [
    "REGISTRY_ACTOR_NAME",
    "REGISTRY_NAMESPACE",
    "ROUTER_CLASS_PATH",
    "DonorAwareRouter",
    "RouterSettings",
    "parse_node_states",
    "router_config",
]

logger = logging.getLogger(SERVE_LOGGER_NAME)

REGISTRY_ACTOR_NAME = REGISTRY_ACTOR
REGISTRY_NAMESPACE = NAMESPACE
ROUTER_CLASS_PATH = "dgpt.serve.router:DonorAwareRouter"

# The latency assumed before any replica has been measured. Only ratios between replicas
# matter, so any positive value works; 10 ms is the order of a small model's request.
_DEFAULT_PRIOR_MS = 10.0
# Recomputing the fleet median costs O(n log n); ten times a second is plenty for a prior.
_PRIOR_REFRESH_S = 0.1


class RouterSettings(BaseModel):
    """The ``request_router_kwargs`` DonorAwareRouter accepts; every field has a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry_name: str = Field(default=REGISTRY_ACTOR_NAME, min_length=1)
    registry_namespace: str = Field(default=REGISTRY_NAMESPACE, min_length=1)
    registry_refresh_period_s: float = Field(
        default=1.0, ge=0.1, le=60, description="Least time between two registry queries."
    )
    registry_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="How long one registry query may take before it is dropped."
    )
    registry_stale_after_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "When the registry has not answered for this long, forget what it said and treat "
            "every node as active with the default reliability."
        ),
    )
    latency_half_life_samples: float = Field(default=4.0, gt=0, le=1000)
    stale_half_life_s: float = Field(default=10.0, gt=0, le=3600)
    reliability_weight: float = Field(default=1.0, ge=0, le=100)
    min_trust: float = Field(
        default=RankingParams().min_trust, ge=0, le=1,
        description="Donors whose verification trust is below this get no requests while others can take them.",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A request not completed after this long is forgotten (no latency sample).",
    )

    @property
    def ranking(self) -> RankingParams:
        """The pure ranking's parameters."""
        return RankingParams(
            latency_half_life_samples=self.latency_half_life_samples,
            stale_half_life_s=self.stale_half_life_s,
            reliability_weight=self.reliability_weight,
            min_trust=self.min_trust,
        )


def _validate_settings(kwargs: Mapping[str, Any]) -> RouterSettings:
    try:
        return RouterSettings.model_validate(dict(kwargs))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '?'}={err.get('input')!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise ServeError(
            f"invalid request_router_kwargs for DonorAwareRouter: {problems}",
            hint=f"fix request_router_kwargs; valid keys: {', '.join(RouterSettings.model_fields)}",
        ) from None


def router_config(**kwargs: Any) -> dict[str, Any]:
    """A ``request_router_config`` dict selecting DonorAwareRouter, kwargs validated now.

    Pass it to ``@serve.deployment(request_router_config=...)`` or ``.options(...)``; bad
    kwargs fail here, at deploy time, instead of inside every proxy.

    Raises:
        ServeError: a kwarg is unknown or out of range; the message names it.
    """
    settings = _validate_settings(kwargs)
    return {
        "request_router_class": ROUTER_CLASS_PATH,
        "request_router_kwargs": settings.model_dump(exclude_defaults=True),
    }


def parse_node_states(raw: object) -> dict[str, DonorInfo]:
    """Turn the registry's ``node_states()`` answer into ``{node_id_hex: DonorInfo}``.

    Tolerant by design, since a newer registry may send more: unknown keys are ignored,
    unknown states become ``None`` (routable), a missing ``reachable`` means reachable, a missing or invalid reliability becomes
    the default, a missing or invalid trust or owner becomes ``None`` (unknown), and an
    entry that is not a mapping is skipped.
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"registry node_states() must return a dict, got {type(raw).__name__}")
    out: dict[str, DonorInfo] = {}
    for node_id, entry in raw.items():
        if not isinstance(entry, Mapping):
            continue
        reliability = entry.get("reliability")
        try:
            value = float(reliability) if reliability is not None else UNKNOWN_DONOR.reliability
        except (TypeError, ValueError):
            value = UNKNOWN_DONOR.reliability
        if math.isnan(value):
            value = UNKNOWN_DONOR.reliability
        donor_id = entry.get("donor_id")
        try:
            state: DonorState | None = DonorState(str(entry.get("state")).lower())
        except ValueError:
            state = None  # a state this router does not know: routable
        owner = entry.get("owner")
        out[str(node_id)] = DonorInfo(
            donor_id=str(donor_id) if donor_id is not None else None,
            state=state,
            reliability=min(1.0, max(0.0, value)),
            reachable=entry.get("reachable") is not False,
            trust=_trust(entry.get("trust")),
            owner=owner if isinstance(owner, str) and owner else None,
        )
    return out


def _trust(raw: object) -> float | None:
    """A trust score from the registry, clipped to 0..1; None when absent or not a number."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else min(1.0, max(0.0, value))


class DonorAwareRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Power of two choices over replicas on staying donors, ordered by expected completion.

    Keeps Serve's default router's mixins (FIFO fulfilment, same-node/AZ preference,
    model multiplexing), so it differs from the default only in *which* pair it offers
    and in what order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock: Callable[[], float] = time.monotonic
        self._rng = random.Random()
        self._settings = RouterSettings()
        self._params = self._settings.ranking
        self._latency: dict[ReplicaID, LatencyEstimate] = {}
        self._in_flight: dict[ReplicaID, int] = {}
        # (replica, internal request id) -> monotonic time the replica accepted it.
        self._started: dict[tuple[ReplicaID, str], float] = {}
        # Completions seen before their on_request_routed (or of rejected requests).
        self._completed_unrouted: dict[tuple[ReplicaID, str], float] = {}
        self._prior_ms = _DEFAULT_PRIOR_MS
        self._prior_computed_at_s = -math.inf
        self._prior_dirty = False
        self._donors: dict[str, DonorInfo] = {}
        self._donors_fetched_at_s = -math.inf
        self._refresh_started_at_s = -math.inf
        self._refresh_task: asyncio.Task[None] | None = None
        self._registry: Any = None
        self._registry_problem: str | None = None
        self._routable_ids: tuple[ReplicaID, ...] = ()
        self._routable_set: frozenset[ReplicaID] = frozenset()

    def initialize_state(self, **kwargs: Any) -> None:
        """Apply ``request_router_kwargs`` (see ``RouterSettings``).

        Raises:
            ServeError: a kwarg is unknown or out of range.
        """
        self._settings = _validate_settings(kwargs)
        self._params = self._settings.ranking

    # ----- Serve's hooks -------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """One routing attempt: up to two replicas, each its own rank, cheapest first.

        One replica per rank makes Serve try the cheaper one first and fall back to the
        other only if the first is full or does not answer its queue-length probe.
        """
        now = self._clock()
        self._maybe_refresh_donors(now)
        hint = parse_shadow_hint(pending_request.kwargs) if pending_request is not None else None
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            candidate_ids = self.apply_multiplex_routing(pending_request=pending_request)
        elif hint is not None:
            candidate_ids = set(self.curr_replicas)  # a shadow copy wants another node: no locality
        else:
            candidate_ids = self.apply_locality_routing(pending_request=pending_request)
        if not candidate_ids:
            return []
        replicas = self.curr_replicas
        if len(candidate_ids) == len(replicas):  # every replica is a candidate (the usual case)
            pool: tuple[ReplicaID, ...] = self._routable_ids
        else:
            pool = tuple(rid for rid in candidate_ids if rid in self._routable_set)
            if not pool:
                pool = tuple(candidate_ids)
        if hint is not None:  # a shadow copy: another owner's replica, routable ones first
            allowed = {v.replica_id for v in avoiding([self._view(rid, now) for rid in candidate_ids], hint)}
            if allowed:
                others = tuple(rid for rid in pool if rid in allowed)
                pool = others or tuple(rid for rid in candidate_ids if rid in allowed)
        if self._prior_dirty and now - self._prior_computed_at_s >= _PRIOR_REFRESH_S:
            self._recompute_prior(now)
        views = [self._view(rid, now) for rid in choose_pair(pool, self._rng) if rid in replicas]
        ranked = rank_candidates(views, now, self._prior_ms, self._params)
        return [[replicas[cast(ReplicaID, v.replica_id)]] for v in ranked]

    def on_request_routed(
        self,
        pending_request: PendingRequest,
        replica_id: ReplicaID,
        result: ReplicaResult,
    ) -> None:
        """The replica accepted the request: start its latency clock."""
        key = (replica_id, pending_request.metadata.internal_request_id)
        if self._completed_unrouted.pop(key, None) is not None:
            return  # it already finished; nothing to time
        self._started[key] = self._clock()
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The response finished (success or error): fold its latency into the replica's EWMA."""
        now = self._clock()
        key = (replica_id, internal_request_id)
        started = self._started.pop(key, None)
        if started is None:
            # A rejected request, or a completion that overtook on_request_routed.
            self._completed_unrouted[key] = now
            return
        self._decrement_in_flight(replica_id)
        if replica_id not in self.curr_replicas:
            return
        sample_ms = (now - started) * 1000.0
        self._latency[replica_id] = update_latency(
            self._latency.get(replica_id), sample_ms, now, self._prior_ms, self._params
        )
        self._prior_dirty = True

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new replica set: forget stats of replicas that left, recompute the pool."""
        super().update_replicas(replicas)
        current = self.curr_replicas
        for rid in [rid for rid in self._latency if rid not in current]:
            del self._latency[rid]
        for rid in [rid for rid in self._in_flight if rid not in current]:
            del self._in_flight[rid]
        self._recompute_routable()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A replica died: stop offering it at once."""
        super().on_replica_actor_died(replica_id)
        self._latency.pop(replica_id, None)
        self._in_flight.pop(replica_id, None)
        self._recompute_routable()

    # ----- introspection (tests, debugging) ----------------------------------------------

    def donor_info(self, node_id: str | None) -> DonorInfo:
        """What this router currently believes about the donor behind ``node_id``."""
        if node_id is None:
            return UNKNOWN_DONOR
        return self._donors.get(node_id, UNKNOWN_DONOR)

    def latency_estimate(self, replica_id: ReplicaID) -> LatencyEstimate | None:
        """This router's latency EWMA for ``replica_id`` (``None`` before the first sample)."""
        return self._latency.get(replica_id)

    @property
    def routable_replica_ids(self) -> tuple[ReplicaID, ...]:
        """Replicas offered to requests now: those of the best tier (staying, trusted donors first)."""
        return self._routable_ids

    # ----- internals ---------------------------------------------------------------------

    def _view(self, replica_id: ReplicaID, now: float) -> ReplicaView:
        replica = self.curr_replicas[replica_id]
        queue_len = self.replica_queue_len_cache.get(replica_id)
        if queue_len is None:
            queue_len = self._in_flight.get(replica_id, 0)
        estimate = self._latency.get(replica_id)
        if estimate is None:
            estimate = self._seed_from_routing_stats(replica, now)
        return ReplicaView(
            replica_id=replica_id,
            node_id=replica.node_id,
            queue_len=queue_len,
            latency=estimate,
            donor=self.donor_info(replica.node_id),
        )

    @staticmethod
    def _seed_from_routing_stats(replica: RunningReplica, now: float) -> LatencyEstimate | None:
        """The replica's self-reported service time, for replicas this router never timed."""
        value = (replica.routing_stats or {}).get("ewma_latency_ms")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        reported = float(value)
        if not math.isfinite(reported) or reported < 0:
            return None
        return LatencyEstimate(ewma_ms=reported, samples=0, updated_at_s=now)

    def _decrement_in_flight(self, replica_id: ReplicaID) -> None:
        count = self._in_flight.get(replica_id, 0) - 1
        if count > 0:
            self._in_flight[replica_id] = count
        else:
            self._in_flight.pop(replica_id, None)

    def _recompute_prior(self, now: float) -> None:
        self._prior_ms = fleet_prior_ms(list(self._latency.values()), _DEFAULT_PRIOR_MS)
        self._prior_computed_at_s = now
        self._prior_dirty = False

    def _recompute_routable(self) -> None:
        """The replicas of the best tier present (``ranking.tier``): trusted staying donors' if any."""
        tiers = {rid: tier(self.donor_info(replica.node_id), self._params)
                 for rid, replica in self.curr_replicas.items()}
        best = min(tiers.values(), default=0)
        self._routable_ids = tuple(rid for rid, t in tiers.items() if t == best)
        self._routable_set = frozenset(self._routable_ids)

    def _maybe_refresh_donors(self, now: float) -> None:
        if self._refresh_task is not None:
            return
        if now - self._refresh_started_at_s < self._settings.registry_refresh_period_s:
            return
        self._refresh_started_at_s = now
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_donors())

    async def _refresh_donors(self) -> None:
        """One background registry query; never raises (a routing loop must not die)."""
        try:
            donors: dict[str, DonorInfo] | None = None
            try:
                states = await self._fetch_node_states()
                if states is not None:
                    donors = parse_node_states(states)
                self._registry_problem = None
            except Exception as exc:  # a bad answer or a GCS hiccup: keep what we knew
                self._note_registry_problem(exc)
            now = self._clock()
            if donors is not None:
                self._donors = donors
                self._donors_fetched_at_s = now
            elif now - self._donors_fetched_at_s > self._settings.registry_stale_after_s:
                self._donors = {}
            self._recompute_routable()
            self._forget_old_requests(now)
        except Exception:
            logger.exception("DonorAwareRouter: refreshing donor states failed; will retry")
        finally:
            self._refresh_task = None

    def _note_registry_problem(self, exc: Exception) -> None:
        """Warn once per distinct problem: the refresh runs every second."""
        problem = f"{type(exc).__name__}: {exc}"
        if problem != self._registry_problem:
            logger.warning(
                "DonorAwareRouter: cannot read donor states from actor %r in namespace %r (%s); "
                "routing on latency and queue length alone until it answers",
                self._settings.registry_name,
                self._settings.registry_namespace,
                problem,
            )
        self._registry_problem = problem

    async def _fetch_node_states(self) -> object | None:
        """The registry's answer, or ``None`` if there is no registry or it did not answer."""
        settings = self._settings
        if self._registry is None:
            lookup = functools.partial(
                ray.get_actor, settings.registry_name, namespace=settings.registry_namespace
            )
            try:
                # get_actor is a blocking GCS call: keep it off the routing event loop.
                self._registry = await asyncio.get_running_loop().run_in_executor(None, lookup)
            except ValueError:
                return None  # no registry actor: every node is active, reliability 0.5
        try:
            ref = self._registry.node_states.remote()
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), settings.registry_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "DonorAwareRouter: registry %r did not answer node_states() within %.1fs",
                settings.registry_name,
                settings.registry_timeout_s,
            )
            return None
        except RayActorError:
            self._registry = None  # it died or restarted: look it up again next time
            return None

    def _forget_old_requests(self, now: float) -> None:
        horizon = now - self._settings.request_timeout_s
        for key in [k for k, t in self._started.items() if t < horizon]:
            del self._started[key]
            self._decrement_in_flight(key[0])
        # Unrouted completions only need to outlive the race with on_request_routed.
        unrouted_horizon = now - 60.0
        for key in [k for k, t in self._completed_unrouted.items() if t < unrouted_horizon]:
            del self._completed_unrouted[key]

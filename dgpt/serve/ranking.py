"""Pure replica ranking for the donor-aware router: latency EWMA, donor state, trust, cost, choice.

No Ray here: the router (``dgpt.serve.router``) turns Serve's view of its replicas into
``ReplicaView`` snapshots and asks these functions which replica to try first; the fleet
simulator and the unit tests drive the very same functions.

The policy, in one breath:

1. Replicas whose donor is leaving (``draining``, ``gone``, ``standby``, or unreachable:
   it missed its last heartbeats) are dropped at once, and so are those whose donor's
   verification trust is below ``min_trust`` (its results disagreed with other owners'),
   unless nothing else is left: a distrusted donor beats a leaving one, and a leaving
   replica beats no replica. A donor the trust store knows nothing about counts as trusted.
   A shadow copy of a request (``dgpt.serve.shadow``) also avoids the owners and nodes its
   hint names, so that it is answered by another owner.
2. From what remains, two replicas are drawn uniformly at random (power of two choices).
3. The pair is ordered by expected completion cost::

       cost_ms = (queue_len + 1) * latency_ms * (1 + reliability_weight * (1 - reliability))

   On identical replicas latency and reliability cancel out and the lower queue wins, which
   is exactly Serve's default power-of-two-choices rule (so it costs no throughput). A slow
   replica's larger ``latency_ms`` makes it lose unless the fast one is much busier.
4. ``latency_ms`` is an EWMA of observed request latencies with a half-life counted in
   samples; when a replica gets no samples, its estimate decays back to the fleet prior with
   a half-life in seconds, so a replica that was slow once is tried again later.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from dgpt.contract import DonorState
from dgpt.verify.policy import DEFAULT_TRUST

__all__ = [
    "DEFAULT_RELIABILITY",
    "SHADOW_KWARG",
    "DonorInfo",
    "LatencyEstimate",
    "RankingParams",
    "ReplicaView",
    "ShadowHint",
    "avoiding",
    "choose_candidates",
    "choose_pair",
    "current_latency_ms",
    "expected_cost_ms",
    "fleet_prior_ms",
    "parse_shadow_hint",
    "rank_candidates",
    "routable",
    "tier",
    "update_latency",
]

T = TypeVar("T")

# What we assume about a donor the registry has not told us about: it is up (else Serve would
# not list a replica there), and a coin flip on staying, the midpoint of the 0..1 scale.
DEFAULT_RELIABILITY = 0.5


# A standby or gone donor has (or is about to have) no raylet: its replicas are on their way out.
_LEAVING = frozenset({DonorState.DRAINING, DonorState.GONE, DonorState.STANDBY})


@dataclass(frozen=True, slots=True)
class DonorInfo:
    """What the registry says about the donor behind one Ray node.

    ``state`` is None when the registry said nothing (or something this router does not
    know): such a donor is routable. ``reachable`` is False once it missed heartbeats.
    ``trust`` is its verification trust score (``dgpt.verify``), None when unknown;
    ``owner`` its failure domain, None when the registry did not say.
    """

    donor_id: str | None = None
    state: DonorState | None = None
    reliability: float = DEFAULT_RELIABILITY
    reachable: bool = True
    trust: float | None = None
    owner: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.reliability <= 1.0 or math.isnan(self.reliability):
            raise ValueError(f"reliability must be within 0..1, got {self.reliability!r}")
        if self.trust is not None and not 0.0 <= self.trust <= 1.0:
            raise ValueError(f"trust must be within 0..1 or None, got {self.trust!r}")

    def trusted(self, min_trust: float) -> bool:
        """True unless the donor's known trust is below ``min_trust``."""
        return self.trust is None or self.trust >= min_trust

    @property
    def leaving(self) -> bool:
        """True when replicas on this donor should get no new requests."""
        return not self.reachable or self.state in _LEAVING


UNKNOWN_DONOR = DonorInfo()


@dataclass(frozen=True, slots=True)
class RankingParams:
    """Tunables of the ranking; the defaults are what the router uses.

    Attributes:
        latency_half_life_samples: after this many new samples an old latency observation
            weighs half. 4 means a replica that turns slow is noticed within a handful of
            requests, while one outlier moves the estimate by only ~16 %.
        stale_half_life_s: with no new samples for this long, an estimate's distance from
            the prior halves. 10 s lets a once-slow replica win a pair again within ~30 s
            (a 10x-slow estimate is then ~2x the prior) without re-probing it every second.
        reliability_weight: how much an unreliable donor's cost is inflated: a donor with
            reliability 0 costs ``1 + weight`` times one with reliability 1. 1.0 makes a
            coin-flip donor 1.5x as costly, worth half a queued request, no more.
        min_trust: donors whose verification trust is below this get no requests while
            others can take them: ``dgpt.verify``'s own threshold, below which one wrong
            result puts any donor.
    """

    latency_half_life_samples: float = 4.0
    stale_half_life_s: float = 10.0
    reliability_weight: float = 1.0
    min_trust: float = DEFAULT_TRUST.low

    def __post_init__(self) -> None:
        if not self.latency_half_life_samples > 0:
            raise ValueError(
                f"latency_half_life_samples must be > 0, got {self.latency_half_life_samples!r}"
            )
        if not self.stale_half_life_s > 0:
            raise ValueError(f"stale_half_life_s must be > 0, got {self.stale_half_life_s!r}")
        if not self.reliability_weight >= 0:
            raise ValueError(f"reliability_weight must be >= 0, got {self.reliability_weight!r}")
        if not 0.0 <= self.min_trust <= 1.0:
            raise ValueError(f"min_trust must be within 0..1, got {self.min_trust!r}")

    @property
    def alpha(self) -> float:
        """EWMA weight of one new sample, from the half-life: ``1 - 0.5 ** (1 / h)``."""
        return 1.0 - 0.5 ** (1.0 / self.latency_half_life_samples)


DEFAULT_PARAMS = RankingParams()


@dataclass(frozen=True, slots=True)
class LatencyEstimate:
    """An EWMA of request latency and when it last got a sample (monotonic seconds)."""

    ewma_ms: float
    samples: int
    updated_at_s: float


def update_latency(
    estimate: LatencyEstimate | None,
    sample_ms: float,
    now_s: float,
    prior_ms: float,
    params: RankingParams = DEFAULT_PARAMS,
) -> LatencyEstimate:
    """Fold one latency sample into ``estimate`` (``None``: the first sample sets it).

    The sample is blended with what we believe *now* (``current_latency_ms``, i.e. the
    estimate already pulled toward ``prior_ms`` by its age), with weight ``params.alpha``:
    a plain EWMA whose half-life is ``params.latency_half_life_samples`` samples. Blending
    with the aged value is what lets a replica that was slow once recover as soon as it is
    probed and answers fast, instead of dragging its old slowness along.

    Raises:
        ValueError: ``sample_ms`` is negative or not finite.
    """
    if not math.isfinite(sample_ms) or sample_ms < 0:
        raise ValueError(f"latency sample must be a finite number >= 0 ms, got {sample_ms!r}")
    if estimate is None:
        return LatencyEstimate(ewma_ms=sample_ms, samples=1, updated_at_s=now_s)
    believed_ms = current_latency_ms(estimate, now_s, prior_ms, params)
    return LatencyEstimate(
        ewma_ms=believed_ms + params.alpha * (sample_ms - believed_ms),
        samples=estimate.samples + 1,
        updated_at_s=now_s,
    )


def current_latency_ms(
    estimate: LatencyEstimate | None,
    now_s: float,
    prior_ms: float,
    params: RankingParams = DEFAULT_PARAMS,
) -> float:
    """The latency to expect now: the EWMA pulled back toward ``prior_ms`` as it ages.

    ``prior + (ewma - prior) * 0.5 ** (age / stale_half_life_s)``; no estimate at all
    means the prior.
    """
    if estimate is None:
        return prior_ms
    age_s = max(0.0, now_s - estimate.updated_at_s)
    keep = 0.5 ** (age_s / params.stale_half_life_s)
    return prior_ms + (estimate.ewma_ms - prior_ms) * keep


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as the ranking sees it at one moment.

    ``replica_id`` is any hashable key (Serve's ``ReplicaID`` in the router, a string in the
    simulator); ``queue_len`` counts requests queued or running on the replica (Serve's
    queue-length cache, else the router's own in-flight count); ``latency`` is the router's
    estimate.
    """

    replica_id: Hashable
    node_id: str | None
    queue_len: int
    latency: LatencyEstimate | None = None
    donor: DonorInfo = field(default=UNKNOWN_DONOR)


def expected_cost_ms(
    view: ReplicaView,
    now_s: float,
    prior_ms: float,
    params: RankingParams = DEFAULT_PARAMS,
) -> float:
    """Expected time until a request sent now to ``view`` completes, penalised by unreliability.

    ``(queue_len + 1) * latency * (1 + reliability_weight * (1 - reliability))``: the request
    waits for the ``queue_len`` ahead of it and then runs itself; an unreliable donor may
    leave mid-request and force a retry elsewhere, so its cost is inflated.
    """
    latency = current_latency_ms(view.latency, now_s, prior_ms, params)
    penalty = 1.0 + params.reliability_weight * (1.0 - view.donor.reliability)
    return (max(0, view.queue_len) + 1) * latency * penalty


def tier(donor: DonorInfo, params: RankingParams = DEFAULT_PARAMS) -> int:
    """How much a donor is wanted: 0 staying and trusted, 1 staying but distrusted, 2 leaving."""
    if donor.leaving:
        return 2
    return 0 if donor.trusted(params.min_trust) else 1


def routable(views: Sequence[ReplicaView], params: RankingParams = DEFAULT_PARAMS) -> list[ReplicaView]:
    """The replicas of the best :func:`tier` present: trusted staying donors' if any.

    Falling back to leaving replicas keeps requests flowing while Serve starts their
    replacements: a draining replica still finishes what it is given before its deadline.
    """
    if not views:
        return []
    best = min(tier(v.donor, params) for v in views)
    return [v for v in views if tier(v.donor, params) == best]


def choose_pair(items: Sequence[T], rng: random.Random) -> list[T]:
    """Two distinct items drawn uniformly at random, in random order (fewer if fewer exist).

    Every ordered pair has probability ``1 / (n * (n - 1))``, as in Serve's own
    power-of-two-choices router; O(1) whatever ``n`` is.
    """
    n = len(items)
    if n <= 1:
        return list(items)
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    return [items[i], items[j]]


def rank_candidates(
    views: Sequence[ReplicaView],
    now_s: float,
    prior_ms: float,
    params: RankingParams = DEFAULT_PARAMS,
) -> list[ReplicaView]:
    """``views`` sorted by tier (see :func:`tier`), then expected cost, cheapest first.

    The sort is stable, so ties keep the input order (random, when it comes from
    ``choose_pair``).
    """
    return sorted(
        views,
        key=lambda v: (tier(v.donor, params), expected_cost_ms(v, now_s, prior_ms, params)),
    )


def choose_candidates(
    views: Sequence[ReplicaView],
    rng: random.Random,
    now_s: float,
    prior_ms: float,
    params: RankingParams = DEFAULT_PARAMS,
) -> list[ReplicaView]:
    """The whole policy: keep the best tier, draw a random pair, order it by cost.

    Returns at most two replicas, preferred first; empty when ``views`` is empty.
    """
    return rank_candidates(choose_pair(routable(views, params), rng), now_s, prior_ms, params)


# ---------------------------------------------------------------- shadow copies

#: The keyword argument that marks a shadow copy of a request and carries its hint. The
#: shadowed method's wrapper (``dgpt.serve.shadow``) takes it off before the method runs.
SHADOW_KWARG = "__dgpt_shadow__"


@dataclass(frozen=True, slots=True)
class ShadowHint:
    """Where a shadow copy must not go: the owners and nodes that answered it already."""

    avoid_owners: frozenset[str] = frozenset()
    avoid_nodes: frozenset[str] = frozenset()

    def as_kwarg(self) -> dict[str, list[str]]:
        """The hint as plain data, the value of ``SHADOW_KWARG``."""
        return {"avoid_owners": sorted(self.avoid_owners), "avoid_nodes": sorted(self.avoid_nodes)}


def parse_shadow_hint(kwargs: Mapping[object, object] | None) -> ShadowHint | None:
    """The hint of a request's keyword arguments; None when it is not a shadow copy (or the
    hint is malformed: such a request is routed as any other)."""
    raw = (kwargs or {}).get(SHADOW_KWARG)
    if not isinstance(raw, Mapping):
        return None

    def names(key: str) -> frozenset[str]:
        value = raw.get(key)
        return frozenset(str(x) for x in value) if isinstance(value, (list, tuple, set, frozenset)) else frozenset()

    return ShadowHint(avoid_owners=names("avoid_owners"), avoid_nodes=names("avoid_nodes"))


def avoiding(views: Sequence[ReplicaView], hint: ShadowHint) -> list[ReplicaView]:
    """The replicas the hint allows: on none of its nodes, of none of its owners.

    May be empty: the caller falls back to every replica, and the shadow wrapper sees that
    the copy came back from an owner it had already heard.
    """
    return [v for v in views if v.node_id not in hint.avoid_nodes
            and (v.donor.owner is None or v.donor.owner not in hint.avoid_owners)]


def fleet_prior_ms(estimates: Sequence[LatencyEstimate], default_ms: float) -> float:
    """The latency to assume for a replica with no history: the median of known EWMAs.

    The median, not the mean, so one very slow replica does not make strangers look slow.
    ``default_ms`` when nothing is known yet.
    """
    if not estimates:
        return default_ms
    values = sorted(e.ewma_ms for e in estimates)
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    return 0.5 * (values[mid - 1] + values[mid])

"""The pure ranking of dgpt.serve.ranking: P2C on equals, steering, donor states, EWMA, decay."""

from __future__ import annotations

import heapq
import math
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpt.contract import DonorState
from dgpt.serve.ranking import (
    DEFAULT_RELIABILITY,
    SHADOW_KWARG,
    DonorInfo,
    LatencyEstimate,
    RankingParams,
    ReplicaView,
    ShadowHint,
    avoiding,
    choose_candidates,
    choose_pair,
    current_latency_ms,
    expected_cost_ms,
    fleet_prior_ms,
    parse_shadow_hint,
    rank_candidates,
    routable,
    tier,
    update_latency,
)

ACTIVE = DonorInfo(donor_id="d", state=DonorState.ACTIVE, reliability=0.9)
PARAMS = RankingParams()


def view(rid: str, queue: int = 0, latency_ms: float | None = 10.0, donor: DonorInfo = ACTIVE, at_s: float = 0.0) -> ReplicaView:
    est = None if latency_ms is None else LatencyEstimate(latency_ms, 10, at_s)
    return ReplicaView(replica_id=rid, node_id=f"node-{rid}", queue_len=queue, latency=est, donor=donor)


# ----- import weight ---------------------------------------------------------------------


def test_ranking_and_serve_package_import_no_ray_or_torch() -> None:
    code = (
        "import sys, dgpt, dgpt.serve, dgpt.serve.ranking\n"
        "bad = [m for m in ('ray', 'torch', 'ray.serve') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- choose_pair -----------------------------------------------------------------------


@given(n=st.integers(0, 50), seed=st.integers(0, 2**32 - 1))
def test_choose_pair_draws_distinct_items(n: int, seed: int) -> None:
    items = list(range(n))
    pair = choose_pair(items, random.Random(seed))
    assert len(pair) == min(n, 2)
    assert len(set(pair)) == len(pair)
    assert set(pair) <= set(items)


def test_choose_pair_is_uniform_over_ordered_pairs() -> None:
    rng = random.Random(7)
    counts = Counter(tuple(choose_pair("abcd", rng)) for _ in range(24_000))
    assert len(counts) == 12  # every ordered pair of 4 items
    # Expected 2,000 each; +-10 % is > 4 standard deviations.
    assert all(1_800 < c < 2_200 for c in counts.values()), counts


# ----- identical replicas behave as power of two choices ----------------------------------


@given(queues=st.lists(st.integers(0, 20), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_identical_replicas_pick_the_lower_queue_of_the_same_random_pair(queues: list[int], seed: int) -> None:
    views = [view(str(i), queue=q) for i, q in enumerate(queues)]
    ours = choose_candidates(views, random.Random(seed), now_s=0.0, prior_ms=10.0)
    pair = choose_pair(views, random.Random(seed))  # what Serve's P2C router would draw
    assert {v.replica_id for v in ours} == {v.replica_id for v in pair}
    assert ours[0].queue_len == min(v.queue_len for v in pair)


def test_equal_reliability_cancels_out_and_low_reliability_costs_more() -> None:
    low = DonorInfo(state=DonorState.ACTIVE, reliability=0.1)
    high = DonorInfo(state=DonorState.ACTIVE, reliability=0.95)
    assert rank_candidates([view("a", donor=low), view("b", donor=high)], 0.0, 10.0)[0].replica_id == "b"
    # A whole queued request outweighs the reliability gap (factor 1.85 vs 1.05 < 2).
    ranked = rank_candidates([view("a", queue=0, donor=low), view("b", queue=1, donor=high)], 0.0, 10.0)
    assert ranked[0].replica_id == "a"


# ----- slow replicas ---------------------------------------------------------------------


def test_slow_replica_loses_unless_the_fast_one_is_much_busier() -> None:
    slow, fast = view("slow", latency_ms=100.0), view("fast", latency_ms=10.0)
    assert rank_candidates([slow, fast], 0.0, 10.0)[0].replica_id == "fast"
    busy_fast = view("fast", queue=5, latency_ms=10.0)
    assert rank_candidates([slow, busy_fast], 0.0, 10.0)[0].replica_id == "fast"
    very_busy_fast = view("fast", queue=12, latency_ms=10.0)
    assert rank_candidates([slow, very_busy_fast], 0.0, 10.0)[0].replica_id == "slow"


@given(
    queue=st.integers(0, 100),
    latency=st.floats(0.01, 1e5),
    reliability=st.floats(0.0, 1.0),
    extra=st.integers(1, 10),
)
def test_cost_grows_with_queue_and_latency_and_shrinks_with_reliability(
    queue: int, latency: float, reliability: float, extra: int
) -> None:
    donor = DonorInfo(state=DonorState.ACTIVE, reliability=reliability)
    base = expected_cost_ms(view("a", queue, latency, donor), 0.0, 10.0)
    assert base > 0
    assert expected_cost_ms(view("a", queue + extra, latency, donor), 0.0, 10.0) > base
    assert expected_cost_ms(view("a", queue, latency * 2, donor), 0.0, 10.0) > base
    better = DonorInfo(state=DonorState.ACTIVE, reliability=min(1.0, reliability + 0.1))
    assert expected_cost_ms(view("a", queue, latency, better), 0.0, 10.0) <= base


# ----- donor state -----------------------------------------------------------------------


@pytest.mark.parametrize("leaving", [
    DonorInfo(state=DonorState.DRAINING, reliability=1.0),
    DonorInfo(state=DonorState.GONE, reliability=1.0),
    DonorInfo(state=DonorState.STANDBY, reliability=1.0),
    DonorInfo(state=DonorState.ACTIVE, reliability=1.0, reachable=False),  # missed its heartbeats
])
def test_leaving_donors_are_excluded_at_once(leaving: DonorInfo) -> None:
    views = [view("leaving", queue=0, latency_ms=1.0, donor=leaving), view("staying", queue=30, latency_ms=50.0)]
    assert [v.replica_id for v in routable(views)] == ["staying"]
    for seed in range(20):
        chosen = choose_candidates(views, random.Random(seed), 0.0, 10.0)
        assert [v.replica_id for v in chosen] == ["staying"]


def test_when_every_donor_is_leaving_they_are_still_used() -> None:
    draining = DonorInfo(state=DonorState.DRAINING)
    views = [view("a", donor=draining), view("b", queue=3, donor=draining)]
    assert len(routable(views)) == 2
    assert choose_candidates(views, random.Random(1), 0.0, 10.0)[0].replica_id == "a"


def test_unknown_states_are_routable_and_default_reliability_is_a_coin_flip() -> None:
    assert not DonorInfo(state=DonorState.ACTIVATING).leaving
    assert not DonorInfo(state=None).leaving  # the registry said nothing we know
    assert DonorInfo().reliability == DEFAULT_RELIABILITY == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_reliability_outside_unit_interval_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="reliability"):
        DonorInfo(reliability=bad)


@pytest.mark.parametrize(
    "kwargs", [{"latency_half_life_samples": 0}, {"stale_half_life_s": -1}, {"reliability_weight": -0.5}]
)
def test_bad_params_are_rejected_naming_the_field(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        RankingParams(**kwargs)


# ----- EWMA and staleness ----------------------------------------------------------------


@given(
    old=st.floats(0.1, 1e4),
    new=st.floats(0.1, 1e4),
    half_life=st.integers(1, 20),
)
def test_ewma_moves_halfway_after_one_half_life_of_samples(old: float, new: float, half_life: int) -> None:
    params = RankingParams(latency_half_life_samples=half_life)
    est = LatencyEstimate(old, 5, 0.0)
    for _ in range(half_life):
        est = update_latency(est, new, 0.0, prior_ms=old, params=params)
    assert est.ewma_ms == pytest.approx((old + new) / 2, rel=1e-9)
    assert est.samples == 5 + half_life


def test_first_sample_sets_the_estimate() -> None:
    est = update_latency(None, 42.0, now_s=3.0, prior_ms=10.0)
    assert (est.ewma_ms, est.samples, est.updated_at_s) == (42.0, 1, 3.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_latency_samples_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="latency sample"):
        update_latency(None, bad, 0.0, 10.0)


@given(ewma=st.floats(0.1, 1e4), prior=st.floats(0.1, 1e4), age=st.floats(0.0, 1e3))
def test_stale_estimates_decay_toward_the_prior(ewma: float, prior: float, age: float) -> None:
    est = LatencyEstimate(ewma, 3, 0.0)
    now = current_latency_ms(est, age, prior, PARAMS)
    assert min(ewma, prior) - 1e-9 <= now <= max(ewma, prior) + 1e-9
    half = current_latency_ms(est, PARAMS.stale_half_life_s, prior, PARAMS)
    assert half == pytest.approx((ewma + prior) / 2)
    assert current_latency_ms(None, age, prior, PARAMS) == prior


def test_replica_slow_once_is_probed_again_and_recovers() -> None:
    prior = 10.0
    slow_once = LatencyEstimate(200.0, 3, updated_at_s=0.0)
    fast = view("fast", queue=1, latency_ms=prior, at_s=60.0)
    stale = ReplicaView("was-slow", None, 0, slow_once, ACTIVE)
    # Right after the slow answer it loses even against a busy fast replica ...
    assert rank_candidates([stale, view("fast", queue=1, latency_ms=prior)], 1.0, prior)[0].replica_id == "fast"
    # ... a minute later it has decayed to ~the prior and wins against a busy one: a probe.
    assert rank_candidates([stale, fast], 60.0, prior)[0].replica_id == "was-slow"
    # The probe answers fast: the estimate is back near the prior at once.
    recovered = update_latency(slow_once, 9.0, 60.0, prior)
    assert recovered.ewma_ms < 1.5 * prior


def test_fleet_prior_is_the_median_of_known_estimates() -> None:
    ests = [LatencyEstimate(v, 1, 0.0) for v in (5.0, 7.0, 500.0)]
    assert fleet_prior_ms(ests, 10.0) == 7.0
    assert fleet_prior_ms(ests[:2], 10.0) == 6.0
    assert fleet_prior_ms([], 10.0) == 10.0


# ----- a queueing simulation: the steering is worth it -----------------------------------


def _simulate(steer: bool, seed: int, n_requests: int = 6_000) -> tuple[float, float]:
    """FIFO replicas (one 10x slow among 4), Poisson arrivals at ~60 % of fast capacity.

    Returns (p99 latency ms, share of requests on the slow replica). ``steer=False`` is
    Serve's default: power of two choices on queue length alone.
    """
    rng = random.Random(seed)
    service_ms = {"r0": 10.0, "r1": 10.0, "r2": 10.0, "slow": 100.0}
    free_at = dict.fromkeys(service_ms, 0.0)
    in_system: dict[str, list[float]] = {r: [] for r in service_ms}  # completion times
    estimates: dict[str, LatencyEstimate] = {}
    pending: list[tuple[float, str, float]] = []  # (done_ms, replica, sent_ms)
    latencies: list[float] = []
    on_slow = 0
    now = 0.0
    rate_per_ms = 0.6 * 3 / 10.0
    for _ in range(n_requests):
        now += rng.expovariate(rate_per_ms)
        while pending and pending[0][0] <= now:
            done, rid, sent = heapq.heappop(pending)
            if steer:
                prior = fleet_prior_ms(list(estimates.values()), 10.0)
                estimates[rid] = update_latency(estimates.get(rid), done - sent, done / 1e3, prior)
        for rid in in_system:
            in_system[rid] = [t for t in in_system[rid] if t > now]
        views = [
            ReplicaView(rid, rid, len(in_system[rid]), estimates.get(rid) if steer else None, ACTIVE)
            for rid in service_ms
        ]
        prior = fleet_prior_ms(list(estimates.values()), 10.0)
        rid = str(choose_candidates(views, rng, now / 1e3, prior)[0].replica_id)
        start = max(now, free_at[rid])
        done = start + rng.expovariate(1.0 / service_ms[rid])
        free_at[rid] = done
        in_system[rid].append(done)
        heapq.heappush(pending, (done, rid, now))
        latencies.append(done - now)
        on_slow += rid == "slow"
    latencies.sort()
    return latencies[int(0.99 * len(latencies))], on_slow / n_requests


@settings(deadline=None, max_examples=3)
@given(seed=st.integers(0, 10_000))
def test_steering_halves_p99_with_one_slow_replica(seed: int) -> None:
    p99_default, slow_share_default = _simulate(steer=False, seed=seed)
    p99_ours, slow_share_ours = _simulate(steer=True, seed=seed)
    assert slow_share_ours < slow_share_default / 3
    assert p99_ours <= 0.5 * p99_default, (p99_ours, p99_default)


# ----- verification trust ----------------------------------------------------------------


def _donor(trust: float | None, state: DonorState = DonorState.ACTIVE, owner: str | None = None) -> DonorInfo:
    return DonorInfo(donor_id="d", state=state, reliability=0.9, trust=trust, owner=owner)


def test_low_trust_donors_are_avoided_while_others_can_serve() -> None:
    views = [view("liar", donor=_donor(0.1)), view("honest", donor=_donor(0.8)), view("new", donor=_donor(None))]
    assert sorted(v.replica_id for v in routable(views)) == ["honest", "new"]
    rng = random.Random(3)
    for _ in range(200):
        picked = choose_candidates(views, rng, now_s=0.0, prior_ms=10.0)
        assert "liar" not in {v.replica_id for v in picked}


def test_a_distrusted_donor_beats_a_leaving_one_and_loses_to_a_trusted_one() -> None:
    liar, leaving = view("liar", donor=_donor(0.1)), view("leaving", donor=_donor(0.9, DonorState.DRAINING))
    assert [v.replica_id for v in routable([liar, leaving])] == ["liar"]
    # Even ten times cheaper, a distrusted replica ranks after a trusted one.
    fast_liar = view("fast-liar", latency_ms=1.0, donor=_donor(0.1))
    slow_honest = view("slow-honest", latency_ms=10.0, donor=_donor(0.9))
    ranked = rank_candidates([fast_liar, slow_honest], now_s=0.0, prior_ms=10.0)
    assert [v.replica_id for v in ranked] == ["slow-honest", "fast-liar"]
    assert [tier(v.donor) for v in (slow_honest, fast_liar, leaving)] == [0, 1, 2]


def test_the_trust_threshold_is_verifications_own_and_tunable() -> None:
    from dgpt.verify.policy import DEFAULT_TRUST

    assert PARAMS.min_trust == DEFAULT_TRUST.low
    views = [view("a", donor=_donor(0.3)), view("b", donor=_donor(0.6))]
    assert [v.replica_id for v in routable(views, RankingParams(min_trust=0.5))] == ["b"]
    assert len(routable(views, RankingParams(min_trust=0.0))) == 2
    with pytest.raises(ValueError, match="min_trust"):
        RankingParams(min_trust=1.5)
    with pytest.raises(ValueError, match="trust"):
        DonorInfo(trust=-0.1)


# ----- shadow hints ----------------------------------------------------------------------


def test_shadow_hints_are_parsed_tolerantly() -> None:
    assert parse_shadow_hint(None) is None
    assert parse_shadow_hint({"x": 1}) is None
    assert parse_shadow_hint({SHADOW_KWARG: "nonsense"}) is None
    hint = parse_shadow_hint({SHADOW_KWARG: {"avoid_owners": ["alice"], "avoid_nodes": ("n1",), "new": 1}})
    assert hint == ShadowHint(frozenset({"alice"}), frozenset({"n1"}))
    assert parse_shadow_hint({SHADOW_KWARG: hint.as_kwarg()}) == hint
    assert parse_shadow_hint({SHADOW_KWARG: {"avoid_owners": 5}}) == ShadowHint()


def test_a_shadow_copy_avoids_the_owners_and_nodes_it_names() -> None:
    views = [view("a1", donor=_donor(0.9, owner="alice")), view("b1", donor=_donor(0.9, owner="bob")),
             view("x", donor=_donor(0.9, owner=None))]
    hint = ShadowHint(avoid_owners=frozenset({"alice"}), avoid_nodes=frozenset({"node-x"}))
    assert [v.replica_id for v in avoiding(views, hint)] == ["b1"]
    # Without owners known, only the node is avoided.
    assert [v.replica_id for v in avoiding(views, ShadowHint(avoid_nodes=frozenset({"node-a1"})))] == ["b1", "x"]
    assert avoiding(views[:1], hint) == []

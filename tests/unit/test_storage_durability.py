"""The durability calculator against closed forms, and the simulation against the calculator."""

from __future__ import annotations

import math

import pytest

from benchmarks.durability import FleetChurn, simulate
from dgpt.storage.codec import DEFAULT_PROFILES, Profile
from dgpt.storage.durability import DAY_S, YEAR_S, Churn, binom_tail, estimate, replication


def test_replication_matches_the_closed_form():
    churn = Churn(lifetime_s=30 * DAY_S, online=0.7, repair_s=DAY_S)
    est = estimate(replication(3), churn)
    # One loss starts the window: both other copies may leave during detection (q each),
    # then the repair waits for a copy to be online while the last ones may still leave.
    lam = 1 / churn.lifetime_s
    q = 1 - math.exp(-lam * DAY_S)
    tau = churn.session_s * (1 - churn.online)

    def start_rate(i: int) -> float:
        a = 1 - 0.3**i
        return a / ((1 - a) * tau)

    p1 = lam / (lam + start_rate(1))
    p2 = p1 * 2 * lam / (2 * lam + start_rate(2))
    p_cycle = q**2 + 2 * q * (1 - q) * p1 + (1 - q) ** 2 * p2
    wait = (1 - q) ** 2 / start_rate(2) + 2 * q * (1 - q) / start_rate(1)
    cycle = 1 / (3 * lam) + DAY_S + wait
    expected = 1 - math.exp(-YEAR_S * p_cycle / cycle)
    assert est.annual_loss == pytest.approx(expected, rel=1e-9)
    assert 1.2 < est.nines < 1.6  # "about 1.4 nines"
    assert est.availability == pytest.approx(1 - 0.3**3, abs=0.01)


def test_wide_codes_beat_replication_at_the_same_overhead():
    churn = Churn()
    rep = estimate(replication(3), churn)
    wide = estimate(DEFAULT_PROFILES[0][1], churn)
    assert DEFAULT_PROFILES[0][1].overhead == replication(3).overhead == 3.0
    assert wide.nines > 7 > rep.nines + 5
    assert wide.availability > rep.availability


def test_more_eager_repair_buys_nines_with_traffic():
    churn = Churn()
    lazy, eager = estimate(Profile(16, 48, 24), churn), estimate(Profile(16, 48, 32), churn)
    assert eager.nines > lazy.nines and eager.availability > lazy.availability
    assert eager.repair_traffic_per_year > lazy.repair_traffic_per_year


def test_a_threshold_whose_pieces_are_rarely_online_together_cannot_repair():
    # 29 of 35 pieces online at once happens ~5% of the time at 70% online.
    assert binom_tail(35, 0.7, 29) < 0.1
    assert estimate(Profile(29, 80, 35), Churn()).nines < 1
    # Storj's own nodes: online almost always and for years; there the same profile is strong.
    assert estimate(Profile(29, 80, 35), Churn(online=0.98, lifetime_s=2 * YEAR_S)).nines > 7


def test_bad_churn_is_refused():
    with pytest.raises(ValueError, match="online"):
        Churn(online=0)
    with pytest.raises(ValueError, match="lifetime_s"):
        Churn(lifetime_s=-1)


def test_the_simulation_agrees_with_the_calculator_where_losses_are_countable():
    """2-of-4 loses data often enough to count in a small run; both models must agree."""
    churn = FleetChurn()
    profile = Profile(2, 4, 3)
    sim = simulate(profile, churn, segments=150, donors=60, years=0.5, seed=3)
    calc = estimate(profile, churn.calculator())
    assert sim.losses > 5
    assert sim.annual_loss == pytest.approx(calc.annual_loss, rel=0.5)
    assert sim.availability == pytest.approx(calc.availability, abs=0.05)
    assert sim.repairs_per_segment_year > 5

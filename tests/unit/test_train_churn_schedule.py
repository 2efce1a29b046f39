"""The training benchmark's churn schedule: reproducible, scaled, never more than two donors away."""

from __future__ import annotations

import json

from benchmarks.fleet_sim import find_churn_profiles
from benchmarks.train_churn import MAX_AWAY, WARMUP_S, churn_schedule

PROFILES = json.loads(find_churn_profiles().read_text())
DONORS = ["donor-1", "donor-2", "donor-3", "donor-4"]


def test_schedule_is_a_pure_function_of_the_seed() -> None:
    a = churn_schedule(PROFILES, DONORS, 7, 60.0, 1800.0)
    assert a == churn_schedule(PROFILES, DONORS, 7, 60.0, 1800.0)
    assert a[0] != churn_schedule(PROFILES, DONORS, 8, 60.0, 1800.0)[0]


def test_losses_come_at_the_asked_rate_and_alternate_per_donor() -> None:
    events, sph, assigned = churn_schedule(PROFILES, DONORS, 3, 60.0, 36000.0)
    assert set(assigned.values()) <= set(PROFILES["default_mix"])
    leaves = [e for e in events if e.action == "leave"]
    # The away cap drops some departures, so the rate is at most one per 60 s, and not far below.
    assert 36000 / 60 * 0.4 < len(leaves) <= 36000 / 60 * 1.2
    assert all(e.t_s >= WARMUP_S for e in events)
    for donor in DONORS:
        mine = [e.action for e in events if e.donor == donor]
        assert all(a != b for a, b in zip(mine, mine[1:], strict=False)), f"{donor} alternates leave/return"
    away: set[str] = set()
    for e in events:
        (away.add if e.action == "leave" else away.discard)(e.donor)
        assert len(away) <= MAX_AWAY
    assert sph > 0

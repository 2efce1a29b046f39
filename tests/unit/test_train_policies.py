"""Pure training policies: failure budgets, elastic bounds, donor choice, the run plan."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgpt import contract
from dgpt.contract import DONOR_RESOURCE
from dgpt.exceptions import TrainError
from dgpt.fleet import FleetDonor
from dgpt.reliability.model import WeibullParams
from dgpt.resources import Resources
from dgpt.train.bounds import elastic_bounds, parse_workers
from dgpt.train.budgets import ERROR_ALLOWANCE, failure_budgets, lost_fraction, poisson_quantile
from dgpt.train.placement import WorkerShape, choose_donors
from dgpt.train.plan import Fleet, parse_spec, plan_training

HOUR = 3600.0


# ---------------------------------------------------------------- budgets


def test_poisson_quantile_matches_the_distribution() -> None:
    assert poisson_quantile(0.0) == 0
    for mean in (0.1, 1.0, 3.7, 20.0):
        k = poisson_quantile(mean, 0.99)
        def cdf(n: int, mean: float = mean) -> float:
            return sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(n + 1))

        assert cdf(k) >= 0.99 and (k == 0 or cdf(k - 1) < 0.99)
    assert poisson_quantile(1000.0) > 1000
    with pytest.raises(ValueError):
        poisson_quantile(-1.0)


def test_budgets_grow_with_churn_and_split_by_vanish_share() -> None:
    calm = failure_budgets([0.99, 0.99], vanish_share=0.25)
    stormy = failure_budgets([0.2, 0.3, 0.1], vanish_share=0.25)
    assert calm.max_preemption_failures >= 1 and calm.max_failures >= 1 + ERROR_ALLOWANCE
    assert stormy.max_preemption_failures > calm.max_preemption_failures
    assert stormy.max_failures > calm.max_failures
    lam = -(math.log(0.2) + math.log(0.3) + math.log(0.1))
    assert stormy.expected_drains == pytest.approx(0.75 * lam)
    assert stormy.expected_vanishes == pytest.approx(0.25 * lam)
    all_vanish = failure_budgets([0.1], vanish_share=1.0)
    assert all_vanish.expected_drains == 0 and all_vanish.max_preemption_failures == 1
    with pytest.raises(ValueError, match="P\\(stay\\)"):
        failure_budgets([1.5], 0.2)


def test_vanish_share_uses_the_prior_and_the_records() -> None:
    assert lost_fraction(0, 0) == pytest.approx(0.25)
    assert lost_fraction(10, 10) == pytest.approx(11 / 14)
    assert lost_fraction(0, 96) == pytest.approx(1 / 100)
    with pytest.raises(ValueError):
        lost_fraction(3, 2)


# ---------------------------------------------------------------- bounds


def test_workers_parse_and_bounds_cap_to_usable_slots() -> None:
    assert parse_workers(4) == (1, 4) and parse_workers((2, 6)) == (2, 6) and parse_workers([1, 1]) == (1, 1)
    for bad in (0, (3, 2), (0, 2), "4", True, (1, 2, 3), (1.5, 3)):
        with pytest.raises(TrainError, match="workers"):
            parse_workers(bad)  # type: ignore[arg-type]
    b = elastic_bounds((2, 8), usable_slots=5)
    assert (b.min_workers, b.max_workers, b.as_ray()) == (2, 5, (2, 5)) and "capped" in b.note
    assert elastic_bounds(3, None).as_ray() == (1, 3)
    assert elastic_bounds((3, 3), 10).as_ray() == 3
    with pytest.raises(TrainError, match="at least 4 workers"):
        elastic_bounds((4, 8), usable_slots=3)


# ---------------------------------------------------------------- donor choice


NOW = 1e7


def _donor(i: int, gflops: float = 20.0, scale_h: float = 30.0, up_h: float = 5.0, cpus: float = 4.0,
           gpus: float = 0.0, running: bool = True, available: Resources | None = None,
           **kw: object) -> FleetDonor:
    caps = Resources(cpus, gpus, 8 * 2**30, donors=1.0)
    return FleetDonor(donor_id=f"d-{i:03d}", device_class="desktop", owner=f"o-{i}", caps=caps,
                      available=available or (caps if running else None), gflops=gflops,
                      labels={contract.LABEL_DONOR_ID: f"d-{i:03d}", contract.LABEL_ROLE: contract.ROLE_DONOR},
                      reliability=WeibullParams(0.6, scale_h * HOUR), since_s=NOW - up_h * HOUR,
                      node_id=f"n-{i}" if running else None, **kw)  # type: ignore[arg-type]


def test_the_gang_prefers_donors_likely_to_stay() -> None:
    flaky = [_donor(i, scale_h=0.3, up_h=0.0) for i in range(3)]
    steady = [_donor(10 + i, scale_h=200.0, up_h=20.0) for i in range(3)]
    choice = choose_donors(flaky + steady, WorkerShape(cpus=2), 3, 4 * HOUR, now_s=NOW)
    assert set(choice.gang) == {d.donor_id for d in steady}
    assert all(d.donor_id not in choice.donor_ids for d in flaky), "spares no less likely to stay than the gang"
    assert choice.slots == 3


def test_the_gang_keeps_a_similar_pace() -> None:
    fast = [_donor(i, gflops=100.0) for i in range(3)]
    slow = _donor(9, gflops=5.0, scale_h=1000.0, up_h=50.0)  # very reliable, but would set the pace
    choice = choose_donors([*fast, slow], WorkerShape(cpus=1), 3, HOUR, now_s=NOW)
    assert set(choice.gang) == {d.donor_id for d in fast}
    assert slow.donor_id not in choice.donor_ids and "slower" in choice.excluded[slow.donor_id]


def test_unfit_donors_are_excluded_with_a_reason() -> None:
    head = FleetDonor("head", caps=Resources(8, 0, 8 * 2**30), labels={contract.LABEL_ROLE: contract.ROLE_HEAD})
    cands = [_donor(1, cpus=1.0), _donor(2, draining=True), head, _donor(4)]
    choice = choose_donors(cands, WorkerShape(cpus=2), 2, HOUR, now_s=NOW)
    assert choice.donor_ids == ("d-004",)
    assert "too small" in choice.excluded["d-001"] and choice.excluded["d-002"] == "draining"
    assert "head" in choice.excluded["head"]
    busy = choose_donors([_donor(5, available=Resources(0.5, 0, 2**30))], WorkerShape(cpus=1), 1, HOUR, now_s=NOW)
    assert busy.slots == 0 and "free" in busy.excluded["d-005"], "a donor busy with other work has no room"
    gpu = choose_donors([_donor(1), _donor(2, gpus=1.0)], WorkerShape(cpus=1, gpus=1), 2, HOUR, now_s=NOW)
    assert gpu.donor_ids == ("d-002",) and gpu.excluded["d-001"] == "no GPU"
    none = choose_donors([_donor(1, cpus=1.0)], WorkerShape(cpus=8), 2, HOUR, now_s=NOW)
    assert none.slots == 0 and none.label_selector == {contract.LABEL_ROLE: contract.ROLE_DONOR}


def test_standby_donors_count_and_the_selector_names_every_chosen_donor() -> None:
    cands = [_donor(1), _donor(2, running=False, up_h=0.0), _donor(3)]
    choice = choose_donors(cands, WorkerShape(cpus=1), 3, HOUR, now_s=NOW)
    assert set(choice.donor_ids) == {"d-001", "d-002", "d-003"}
    selector = choice.label_selector
    assert selector[contract.LABEL_ROLE] == contract.ROLE_DONOR
    assert " " not in selector[contract.LABEL_DONOR_ID], "Ray's placement groups do not strip spaces in in()"
    for d in cands:
        assert contract.selector_matches(selector, {contract.LABEL_ROLE: contract.ROLE_DONOR, contract.LABEL_DONOR_ID: d.donor_id})
    assert not contract.selector_matches(selector, {contract.LABEL_ROLE: contract.ROLE_DONOR, contract.LABEL_DONOR_ID: "d-999"})


@given(st.lists(st.tuples(st.floats(1, 200), st.floats(0.1, 500), st.floats(0, 100)), min_size=1, max_size=30),
       st.integers(1, 8))
def test_choice_is_a_gang_of_distinct_usable_donors(specs: list[tuple[float, float, float]], k: int) -> None:
    cands = [_donor(i, gflops=g, scale_h=s, up_h=u) for i, (g, s, u) in enumerate(specs)]
    choice = choose_donors(cands, WorkerShape(cpus=1), k, HOUR, now_s=NOW)
    assert len(choice.gang) == min(k, len(cands)) == len(set(choice.gang))
    assert set(choice.gang) <= set(choice.donor_ids) and len(set(choice.donor_ids)) == len(choice.donor_ids)
    assert 0.0 <= choice.gang_p_stay <= 1.0


# ---------------------------------------------------------------- plan


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(TrainError, match="cpus_per_worker=-1"):
        parse_spec(name="r", workers=2, cpus_per_worker=-1)
    with pytest.raises(TrainError, match="name='bad name'"):
        parse_spec(name="bad name", workers=2)
    with pytest.raises(TrainError, match="workers"):
        parse_spec(name="r", workers=(3, 1))
    with pytest.raises(TrainError, match="horizon_s"):
        parse_spec(name="r", workers=2, horizon_s=0)
    with pytest.raises(TrainError, match="unknown_field"):
        parse_spec(name="r", workers=2, unknown_field=1)


def test_plan_carries_bounds_donors_budgets_and_ray_configs() -> None:
    fleet = Fleet([_donor(1), _donor(2), _donor(3, cpus=1.0)], vanish_share=0.25, now_s=NOW)
    plan = plan_training(parse_spec(name="run-1", workers=(1, 4), cpus_per_worker=2, horizon_s=2 * HOUR),
                         fleet, storage_path="runs")
    assert (plan.bounds.min_workers, plan.bounds.max_workers) == (1, 2), "only two donors have 2 CPUs"
    assert plan.resources_per_worker == {"CPU": 2.0, DONOR_RESOURCE: 1.0}
    assert plan.budgets is not None and plan.max_failures == plan.budgets.max_failures
    scaling = plan.scaling_config()
    assert scaling.num_workers == (1, 2) and scaling.label_selector == plan.label_selector
    assert scaling.elastic_resize_monitor_interval_s == 60.0 and not scaling.use_gpu
    run = plan.run_config()
    assert run.name == "run-1" and run.storage_path == "runs"
    assert run.failure_config.max_preemption_failures == plan.max_preemption_failures
    assert run.checkpoint_config.num_to_keep == 3
    overridden = plan_training(parse_spec(name="r", workers=2, max_failures=-1, max_preemption_failures=7), fleet,
                               storage_path="p")
    assert (overridden.max_failures, overridden.max_preemption_failures) == (-1, 7)
    gpu = plan_training(parse_spec(name="g", workers=1, gpus_per_worker=1, choose_donors=False), None,
                        storage_path="p")
    assert gpu.use_gpu and gpu.scaling_config().use_gpu and gpu.label_selector == {}
    with pytest.raises(TrainError, match="no donor can host"):
        plan_training(parse_spec(name="big", workers=2, cpus_per_worker=64), fleet, storage_path="p")


def test_the_coordinator_never_wipes_a_users_request_resources() -> None:
    from dgpt.train.coordinator import RequestForwarder

    sent: list[tuple] = []
    forward = RequestForwarder(lambda *args: sent.append(args))
    forward([])  # ticks with no run asking: a user's request_resources() must stand
    forward([])
    assert sent == []
    forward([{"CPU": 1.0}], [{"dgpt.io/role": "donor"}])
    forward([{"CPU": 1.0}])
    assert sent == [([{"CPU": 1.0}], [{"dgpt.io/role": "donor"}]), ([{"CPU": 1.0}],)]
    forward([])  # the run withdrew: its own request is cleared, once
    forward([])
    assert sent[2:] == [([],)]

"""Placement policy and Ray options: objectives per kind, hard rules as properties, bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgpt import contract as lbl
from dgpt.exceptions import InsufficientCapacity, PlacementError
from dgpt.placement import (
    FleetDonor,
    FleetView,
    Placement,
    Resources,
    Unplaced,
    WorkloadKind,
    place_gang,
    place_replicas,
    place_task,
)
from dgpt.placement.options import decide_options, gang_args, placement_group_args, task_options
from dgpt.reliability import WeibullParams

HOUR = 3600.0
NOW = 100 * HOUR
GIB = 2.0**30
STEADY = WeibullParams(0.55, 200 * HOUR)
FLAKY = WeibullParams(0.85, 0.5 * HOUR)


def node(
    i: int,
    *,
    cpus: float = 4,
    free: float | None = None,
    gpus: float = 0,
    owner: str | None = None,
    rel: WeibullParams = STEADY,
    up_s: float = 10 * HOUR,
    gflops: float = 16.5,
    load: float = 0.0,
    draining: bool = False,
    role: str = "donor",
) -> FleetDonor:
    free = cpus if free is None else free
    return FleetDonor(
        node_id=f"node{i}",
        donor_id=f"donor-{i}",
        owner=owner or f"owner{i}",
        device_class="desktop",
        caps=Resources(cpus, gpus, cpus * GIB),
        available=Resources(free, gpus, free * GIB),
        load=load,
        gflops=gflops,
        draining=draining,
        labels={lbl.LABEL_DONOR_ID: f"donor-{i}", lbl.LABEL_ROLE: role, lbl.LABEL_OWNER: owner or f"owner{i}",
                lbl.LABEL_GPU: "T4" if gpus else lbl.NO_GPU},
        reliability=rel,
        since_s=NOW - up_s,
    )


def snap(*nodes: FleetDonor) -> FleetView:
    return FleetView(now_s=NOW, active=tuple(nodes))


# ---------------------------------------------------------------- objectives per kind


def test_training_gang_prefers_reliable_donors_of_similar_speed() -> None:
    nodes = [node(i, rel=FLAKY, up_s=60, gflops=40) for i in range(4)]  # fast but leaving
    nodes += [node(10 + i, gflops=20) for i in range(4)]  # steady, similar speed
    nodes += [node(20, gflops=3)]  # steady but slow: would drag the gang down
    s = snap(*nodes)
    d = place_gang(s.table, [Resources(2)] * 3, NOW, horizon_s=4 * HOUR)
    assert isinstance(d, Placement)
    assert set(d.donor_ids) <= {f"donor-{10 + i}" for i in range(4)}
    assert len(set(d.nodes)) == 3
    assert d.p_stay > 0.8


def test_batch_keeps_reliable_donors_free_for_long_work() -> None:
    # A short task on a donor that will likely last its 5 minutes but not 8 hours.
    short_lived = node(1, rel=WeibullParams(0.85, 3 * HOUR), up_s=3 * HOUR)
    long_lived = node(2, rel=STEADY, up_s=50 * HOUR)
    s = snap(short_lived, long_lived)
    d = place_task(s.table, Resources(1), NOW, kind=WorkloadKind.BATCH, horizon_s=300)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-1",)
    # A long training actor goes to the steady donor.
    d = place_task(s.table, Resources(1), NOW, kind=WorkloadKind.TRAINING, horizon_s=8 * HOUR)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)


def test_inference_prefers_low_load_and_fast() -> None:
    s = snap(node(1, load=0.9), node(2, load=0.1, gflops=30), node(3, load=0.1, gflops=8))
    d = place_replicas(s.table, Resources(1), 1, NOW)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)


def test_spreads_by_free_capacity() -> None:
    s = snap(node(1, cpus=8, free=1), node(2, cpus=8, free=8))
    d = place_task(s.table, Resources(1), NOW, kind=WorkloadKind.INFERENCE, horizon_s=HOUR)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)


def test_draining_and_head_nodes_get_nothing() -> None:
    s = snap(node(1, draining=True), node(2, role="head"))
    assert isinstance(place_task(s.table, Resources(1), NOW), Unplaced)


def test_cpu_work_avoids_gpu_donors_when_it_can() -> None:
    s = snap(node(1, gpus=1), node(2))
    d = place_task(s.table, Resources(1), NOW)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)


def test_unplaced_says_why() -> None:
    s = snap(node(1, cpus=2))
    d = place_task(s.table, Resources(4, 1), NOW)
    assert isinstance(d, Unplaced)
    assert "4 CPU" in d.reason and "1 GPU" in d.reason
    g = place_gang(s.table, [Resources(1)] * 2, NOW, horizon_s=HOUR)
    assert isinstance(g, Unplaced) and "2 donors" in g.reason


def test_label_selector_is_respected() -> None:
    s = snap(node(1), node(2))
    req = Resources(1, label_selector={lbl.LABEL_DONOR_ID: "in(donor-2, donor-9)"})
    d = place_task(s.table, req, NOW)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)
    req = Resources(1, label_selector={lbl.LABEL_DONOR_ID: "!donor-1"})
    d = place_task(s.table, req, NOW)
    assert isinstance(d, Placement) and d.donor_ids == ("donor-2",)


def test_scale_uses_sampling_and_stays_correct() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        node(
            i,
            cpus=4,
            free=float(rng.integers(0, 5)),
            gpus=float(rng.random() < 0.1),
            owner=f"o{i // 3}",
        )
        for i in range(3000)
    ]
    s = snap(*nodes)
    table = s.table
    gen = np.random.default_rng(1)
    for _ in range(50):
        d = place_task(table, Resources(3, 1), NOW, rng=gen)
        assert isinstance(d, Placement)
        (n,) = d.nodes
        assert table.gpu_free[n] >= 1 and table.cpu_free[n] >= 3


# ---------------------------------------------------------------- properties


@st.composite
def clusters(draw: st.DrawFn) -> FleetView:
    n = draw(st.integers(1, 12))
    owners = draw(st.integers(1, n))
    nodes = []
    for i in range(n):
        cpus = draw(st.sampled_from([1, 2, 4, 8]))
        nodes.append(
            node(
                i,
                cpus=cpus,
                free=draw(st.integers(0, cpus)),
                gpus=draw(st.sampled_from([0, 0, 1, 2])),
                owner=f"owner{draw(st.integers(0, owners - 1))}",
                rel=draw(st.sampled_from([STEADY, FLAKY])),
                up_s=draw(st.floats(0, 50 * HOUR)),
                gflops=draw(st.floats(1, 60)),
                load=draw(st.floats(0, 1)),
                draining=draw(st.booleans()) and draw(st.booleans()),
            )
        )
    return snap(*nodes)


requests = st.builds(
    Resources,
    cpus=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    gpus=st.sampled_from([0.0, 0.0, 1.0]),
    memory_bytes=st.sampled_from([0.0, GIB]),
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_capacity(s: FleetView, d: Placement) -> None:
    by_node: Counter[int] = Counter()
    cpu: Counter[int] = Counter()
    gpu: Counter[int] = Counter()
    mem: Counter[int] = Counter()
    for n, r in zip(d.nodes, d.requests, strict=True):
        by_node[n] += 1
        cpu[n] += r.cpus  # type: ignore[assignment]
        gpu[n] += r.gpus  # type: ignore[assignment]
        mem[n] += r.memory_bytes  # type: ignore[assignment]
    t = s.table
    for n in by_node:
        view = s.active[n]
        assert not view.draining and view.is_donor
        assert cpu[n] <= t.cpu_free[n] + 1e-9
        assert gpu[n] <= t.gpu_free[n] + 1e-9
        assert mem[n] <= t.mem_free[n] + 1e-9


@FAST
@given(clusters(), requests, st.sampled_from(list(WorkloadKind)))
def test_task_never_over_capacity_and_gpu_only_on_gpu_donors(
    s: FleetView, req: Resources, kind: WorkloadKind
) -> None:
    d = place_task(s.table, req, NOW, kind=kind, horizon_s=HOUR)
    fits = [
        n
        for n in s.active
        if n.is_donor
        and not n.draining
        and n.free.cpus >= req.cpus
        and n.free.gpus >= req.gpus
        and n.free.memory_bytes >= req.memory_bytes
    ]
    assert isinstance(d, Placement) == bool(fits)
    if isinstance(d, Placement):
        _check_capacity(s, d)
        if req.gpus:
            assert s.active[d.nodes[0]].caps.gpus > 0


@FAST
@given(clusters(), requests, st.integers(1, 6))
def test_gang_is_whole_or_nothing_on_distinct_donors(
    s: FleetView, req: Resources, k: int
) -> None:
    d = place_gang(s.table, [req] * k, NOW, horizon_s=4 * HOUR)
    hosts = sum(
        1
        for n in s.active
        if n.is_donor
        and not n.draining
        and n.free.cpus >= req.cpus
        and n.free.gpus >= req.gpus
        and n.free.memory_bytes >= req.memory_bytes
    )
    if isinstance(d, Placement):
        assert len(d.nodes) == k and len(set(d.nodes)) == k
        _check_capacity(s, d)
        if req.gpus:
            assert all(s.active[n].caps.gpus > 0 for n in d.nodes)
    else:
        assert hosts < k


@FAST
@given(
    clusters(),
    requests,
    st.lists(
        st.sampled_from([Resources(1), Resources(2), Resources(1, 1)]),
        min_size=2,
        max_size=4,
    ),
)
def test_mixed_gang_is_whole_or_nothing(
    s: FleetView, _: Resources, bundles: list[Resources]
) -> None:
    d = place_gang(s.table, bundles, NOW, horizon_s=HOUR)
    if isinstance(d, Placement):
        assert len(d.nodes) == len(bundles) == len(set(d.nodes))
        _check_capacity(s, d)
        for n, r in zip(d.nodes, d.requests, strict=True):
            if r.gpus:
                assert s.active[n].caps.gpus > 0


@FAST
@given(
    clusters(),
    requests,
    st.integers(1, 5),
    st.lists(st.sampled_from(["owner0", "owner1"]), max_size=2),
)
def test_replicas_spread_over_owners(
    s: FleetView, req: Resources, count: int, existing: list[str]
) -> None:
    d = place_replicas(s.table, req, count, NOW, existing_owners=existing)
    if isinstance(d, Unplaced):
        return
    _check_capacity(s, d)
    if req.gpus:
        assert all(s.active[n].caps.gpus > 0 for n in d.nodes)
    owners = [s.active[n].owner for n in d.nodes]
    used = set(existing) | set(owners)
    # If any replica shares an owner, no node of an unused owner could have taken it.
    if len(set(owners)) < len(owners) or set(owners) & set(existing):
        for n in s.active:
            if n.owner in used or not n.is_donor or n.draining:
                continue
            room = (
                n.free.cpus >= req.cpus
                and n.free.gpus >= req.gpus
                and n.free.memory_bytes >= req.memory_bytes
            )
            assert not room, f"{n.owner} had room but replicas share owners {owners}"


# ---------------------------------------------------------------- Ray options


def test_task_options_pin_with_label_selector_and_fall_back() -> None:
    s = snap(node(1), node(2), node(3))
    opts = decide_options("batch", s, num_cpus=2, memory=GIB)
    assert opts["num_cpus"] == 2 and opts["memory"] == int(GIB)
    donor = opts["label_selector"][lbl.LABEL_DONOR_ID]
    assert donor.startswith("donor-")
    fallback = opts["fallback_strategy"]
    assert fallback[0]["label_selector"][lbl.LABEL_DONOR_ID].startswith("in(")
    assert donor not in fallback[0]["label_selector"][lbl.LABEL_DONOR_ID]
    assert fallback[-1] == {"label_selector": {lbl.LABEL_ROLE: lbl.ROLE_DONOR}}
    hard = decide_options("inference", s, soft=False, num_gpus=0)
    assert "fallback_strategy" not in hard


def test_options_are_accepted_by_ray_validation() -> None:
    ray_opts = pytest.importorskip("ray._common.ray_option_utils")
    s = snap(node(1), node(2))
    opts = decide_options("training", s, num_cpus=1)
    # Ray's own validators raise on anything it would refuse at .options() time.
    ray_opts.validate_task_options(opts, in_options=True)
    ray_opts.validate_actor_options(opts, in_options=True)
    assert opts["label_selector"]["dgpt.io/donor-id"] in {"donor-1", "donor-2"}


def test_gang_args_match_ray_placement_group_signature() -> None:
    pg = pytest.importorskip("ray.util.placement_group")
    s = snap(*(node(i, gpus=1) for i in range(4)))
    args = gang_args("training", [{"CPU": 2, "GPU": 1}] * 3, s, horizon_s=HOUR, name="g")
    assert args["strategy"] == "STRICT_SPREAD"
    assert len(args["bundle_label_selector"]) == 3
    assert len({sel[lbl.LABEL_DONOR_ID] for sel in args["bundle_label_selector"]}) == 3
    pg.validate_placement_group(
        bundles=args["bundles"],
        strategy=args["strategy"],
        lifetime=args["lifetime"],
        bundle_label_selector=args["bundle_label_selector"],
    )


def test_options_errors_are_typed_and_helpful() -> None:
    s = snap(node(1, cpus=2))
    with pytest.raises(InsufficientCapacity, match="8 CPU") as exc:
        decide_options("batch", s, num_cpus=8)
    assert exc.value.hint and "autoscaler" in exc.value.hint
    with pytest.raises(PlacementError, match="unknown workload kind"):
        decide_options("gaming", s)
    with pytest.raises(PlacementError, match="num_tpus"):
        decide_options("batch", s, num_tpus=1)
    with pytest.raises(PlacementError, match="cpus=-1"):
        decide_options("batch", s, num_cpus=-1)
    with pytest.raises(PlacementError, match="at least one bundle"):
        gang_args("training", [], s)
    with pytest.raises(PlacementError, match="TPU"):
        gang_args("training", [{"TPU": 1}], s)
    with pytest.raises(PlacementError, match="replica count"):
        place_replicas(s.table, Resources(1), 0, NOW)
    bad = Placement(WorkloadKind.BATCH, (0,), ("n",), ("bad id!",), (Resources(1),), 1.0, 1.0)
    with pytest.raises(PlacementError, match="label selector"):
        task_options(bad)
    empty = Placement(WorkloadKind.TRAINING, (0,), ("n",), ("d",), (Resources(0),), 1.0, 1.0)
    with pytest.raises(PlacementError, match="no resources"):
        placement_group_args(empty)


def test_public_api_does_not_start_ray() -> None:
    import dgpt.placement as placement

    s = snap(node(1), node(2))
    assert placement.options("batch", s, num_cpus=1)["num_cpus"] == 1
    # gang() builds its arguments, then needs a running Ray: the unit conftest refuses init.
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises when not connected
        placement.gang("training", [{"CPU": 1}], horizon_s=HOUR, snapshot=s)


def test_a_replica_waits_for_a_new_owner_rather_than_share_one() -> None:
    s = FleetView(now_s=NOW, active=(node(1, owner="alice"),), spare_owners=("bob", "carol"))
    opts = decide_options("inference", s, existing_owners={"alice"}, num_cpus=1)
    assert opts["label_selector"] == {lbl.LABEL_ROLE: lbl.ROLE_DONOR, lbl.LABEL_OWNER: "in(bob, carol)"}
    assert "fallback_strategy" not in opts, "it waits for the autoscaler to activate bob or carol"
    # No standby owner left: sharing is the only way, so it shares.
    alone = FleetView(now_s=NOW, active=(node(1, owner="alice"),))
    assert decide_options("inference", alone, existing_owners={"alice"}, num_cpus=1)["label_selector"][
        lbl.LABEL_DONOR_ID] == "donor-1"
    # A full cluster with a spare owner: wait for it instead of failing.
    full = FleetView(now_s=NOW, active=(node(1, owner="alice", free=0),), spare_owners=("bob",))
    assert decide_options("inference", full, num_cpus=1)["label_selector"][lbl.LABEL_OWNER] == "in(bob)"


def test_spare_owners_are_standby_owners_with_nothing_in_the_cluster_best_first() -> None:
    steady = node(7, owner="bob", up_s=50 * HOUR)
    flaky = node(8, owner="carol", rel=FLAKY, up_s=60)
    busy = node(9, owner="alice")
    view = FleetView(now_s=NOW, active=(node(1, owner="alice"),)).with_standby([flaky, steady, busy])
    assert view.best_spare_owners() == ("bob", "carol")

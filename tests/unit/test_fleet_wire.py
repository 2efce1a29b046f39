"""A fleet view crosses processes as columns: lossless, and scored without building donors."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgpt import contract
from dgpt.fleet import DonorColumns, DonorTable, FleetDonor, FleetView
from dgpt.placement import live
from dgpt.reliability import WeibullParams
from dgpt.resources import Resources

GIB = 2.0**30
amounts = st.sampled_from([0.0, 0.5, 1.0, 4.0, 16.0])


@st.composite
def donors(draw: st.DrawFn, i: int) -> FleetDonor:
    cpus, gpus = draw(amounts), draw(st.sampled_from([0.0, 0.0, 1.0]))
    odd = draw(st.sampled_from(["", "", "", "selector", "per-node"]))
    caps = Resources(cpus, gpus, cpus * GIB, donors=draw(st.sampled_from([0.0, 1.0])),
                     label_selector={"x": "y"} if odd == "selector" else {},
                     per_node_key="k" if odd == "per-node" else "", per_node_share=0.5 if odd == "per-node" else 0.0)
    free = draw(st.none() | amounts)
    return FleetDonor(
        donor_id=f"d-{i}", owner=f"o-{draw(st.integers(0, 3))}",
        device_class=draw(st.sampled_from(["desktop", "laptop", "phone", "no-such-class"])),
        caps=caps, available=None if free is None else Resources(free, gpus, free * GIB),
        gflops=draw(st.sampled_from([0.0, 1.0, 50.0])),
        labels={contract.LABEL_DONOR_ID: f"d-{i}",
                contract.LABEL_ROLE: draw(st.sampled_from([contract.ROLE_DONOR, contract.ROLE_HEAD]))},
        reliability=draw(st.none() | st.builds(WeibullParams, st.sampled_from([0.5, 1.2]),
                                               st.sampled_from([60.0, 3600.0]))),
        since_s=draw(st.floats(0, 1e6)), node_id=draw(st.none() | st.just(f"n-{i}")),
        idle_s=draw(st.floats(0, 100)), load=draw(st.sampled_from([0.0, 0.3, 1.0, 1.7])),
        draining=draw(st.booleans()), relayed=draw(st.booleans()))


@st.composite
def fleets(draw: st.DrawFn) -> tuple[FleetDonor, ...]:
    return tuple(draw(donors(i)) for i in range(draw(st.integers(0, 12))))


def reference_table(ds: tuple[FleetDonor, ...]) -> dict[str, list[float]]:
    """What a table must say of each donor, read one donor at a time from its own properties."""
    def amount(v: float) -> float:
        return v if v > 0 else 0.0

    return {
        "cpu_total": [amount(d.caps.cpus) for d in ds], "gpu_total": [amount(d.caps.gpus) for d in ds],
        "mem_total": [amount(d.caps.memory_bytes) for d in ds],
        "cpu_free": [min(amount(d.free.cpus), amount(d.caps.cpus)) for d in ds],
        "gpu_free": [min(amount(d.free.gpus), amount(d.caps.gpus)) for d in ds],
        "mem_free": [min(amount(d.free.memory_bytes), amount(d.caps.memory_bytes)) for d in ds],
        "load": [min(max(d.load, 0.0), 1.0) for d in ds], "gflops": [max(d.gflops, 1e-3) for d in ds],
        "shape": [d.params.shape for d in ds], "scale_s": [d.params.scale_s for d in ds],
        "start_s": [d.since_s for d in ds], "relayed": [float(d.relayed) for d in ds],
        "usable": [i for i, d in enumerate(ds) if d.is_donor and not d.draining],
        "gpu_usable": [i for i, d in enumerate(ds) if d.is_donor and not d.draining and d.caps.gpus > 0],
    }


def assert_table_says(table: DonorTable, ds: tuple[FleetDonor, ...]) -> None:
    for name, want in reference_table(ds).items():
        assert getattr(table, name).tolist() == want, name
    assert list(table.donor_ids) == [d.donor_id for d in ds]
    assert list(table.node_ids) == [d.node_id or "" for d in ds]
    assert [table.owner_names[c] for c in table.owner_codes] == [d.owner for d in ds]
    assert list(table.labels) == [d.labels for d in ds]


@given(fleets())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_view_crosses_as_columns_and_arrives_with_every_donor_as_it_was(ds: tuple[FleetDonor, ...]) -> None:
    view = FleetView(now_s=1e6, active=ds, spare_owners=("o-9",))
    got = pickle.loads(pickle.dumps(view))
    assert isinstance(got.active, DonorColumns)
    assert_table_says(got.table, ds)  # scored first, from the columns alone
    assert tuple(got.active) == ds and got.active == ds and ds == got.active
    assert [got.active[i] for i in range(-len(ds), 0)] == list(ds)
    assert got.spare_owners == ("o-9",) and got.now_s == 1e6
    assert_table_says(view.table, ds)  # the sender's table, from its own donors, says the same


def test_a_driver_scores_an_unpickled_view_without_building_one_donor() -> None:
    ds = tuple(FleetDonor(donor_id=f"d-{i}", caps=Resources(4, 0, 8 * GIB), available=Resources(i % 5, 0, GIB),
                          labels={contract.LABEL_DONOR_ID: f"d-{i}"}) for i in range(2000))
    got = pickle.loads(pickle.dumps(FleetView(now_s=10.0, active=ds)))
    assert got.table.cpu_free.tolist() == [float(i % 5) for i in range(2000)]
    assert got.active[7] == ds[7]
    assert sum(b is not None for b in got.active._built) == 1  # only the donor read was built
    with pytest.raises(IndexError, match="out of range"):
        got.active[2000]


def test_reservations_take_room_from_the_reserved_donor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = tuple(FleetDonor(donor_id=f"d-{i}", owner=f"o-{i}", caps=Resources(4, 0, 8 * GIB),
                          available=None if i == 1 else Resources(3, 0, 6 * GIB)) for i in range(3))
    view = pickle.loads(pickle.dumps(FleetView(now_s=10.0, active=ds)))
    monkeypatch.setattr(live, "_reservations", [])
    live.reserve("batch", {"num_cpus": 2.0, "label_selector": {contract.LABEL_DONOR_ID: "d-1"}}, view)
    live.reserve("inference", {"num_cpus": 1.0, "label_selector": {contract.LABEL_DONOR_ID: "d-1"}}, view)
    assert live.recent_owners("inference") == {"o-1"}
    held = live._with_reservations(view, time.time())
    assert held.table.cpu_free.tolist() == [3.0, 1.0, 3.0]  # d-1 ran on its caps (4), minus 2 and 1
    assert held.active[1].available == Resources(1.0, 0.0, 8 * GIB)
    assert held.active[0] == ds[0] and held.active[2] == ds[2]
    assert np.array_equal(view.table.cpu_free, [3.0, 4.0, 3.0])  # the fetched view itself is untouched


def test_new_free_room_keeps_a_donor_whose_resources_carry_labels_whole() -> None:
    odd = FleetDonor(donor_id="d-0", caps=Resources(4, 0, GIB, label_selector={"zone": "a"}, per_node_key="k",
                                                    per_node_share=0.25))
    plain = FleetDonor(donor_id="d-1", caps=Resources(2, 0, GIB))
    cols = DonorColumns.of((odd, plain)).with_free({"d-0": Resources(1, 0, GIB), "d-1": Resources(0.5)})
    assert cols[0].caps == odd.caps and cols[0].available == Resources(1, 0, GIB)
    assert cols[1].caps == plain.caps and cols[1].available == Resources(0.5)
    assert cols.table().cpu_free.tolist() == [1.0, 0.5]


def test_the_head_shares_its_active_columns_until_an_active_donor_changes() -> None:
    from dgpt.head.fleet_index import FleetIndex, Role

    index = FleetIndex()
    a, b = (FleetDonor(donor_id=d, caps=Resources(4), available=Resources(4)) for d in ("d-a", "d-b"))
    index.put(a, Role.ACTIVE, 100.0)
    index.put(b, Role.ACTIVE, 100.0)
    first = index.view(1.0).active
    assert index.view(2.0).active is first  # nothing changed: the same columns
    index.put(FleetDonor(donor_id="d-s", caps=Resources(2)), Role.STANDBY, 100.0)
    assert index.view(3.0).active is first  # a standby donor is not an active one
    index.put(FleetDonor(donor_id="d-b", caps=Resources(4), available=Resources(1)), Role.ACTIVE, 100.0)
    assert index.view(4.0).table.cpu_free.tolist() == [4.0, 1.0]
    index.put(a, Role.STANDBY, 100.0)  # left the cluster
    assert [d.donor_id for d in index.view(5.0).active] == ["d-b"]
    index.remove("d-b")
    assert len(index.view(6.0).active) == 0

"""What Train needs of the fabric, without Ray: demand for one-per-donor workers, selectors, the fleet view."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

from autoscaler.bounds import AutoscalerBounds
from autoscaler.context import AutoscalerContext
from autoscaler.decisions import ActivateDonor
from autoscaler.policies import default_policy
from dgpt import contract
from dgpt.fleet import FleetDonor, FleetView, build_table
from dgpt.head.ray_adapter import _selector
from dgpt.reliability.model import WeibullParams
from dgpt.resources import Demand, Resources
from dgpt.train.live import candidates_from_view, fleet_from

REPO = Path(__file__).resolve().parents[2]
NOW = 1_000_000.0
GIB = 2.0**30
STEADY = WeibullParams(0.55, 200 * 3600.0)


def _donor(donor_id: str, running: bool, cpus: float = 4.0, **kw: object) -> FleetDonor:
    caps = Resources(cpus, 0, 4 * GIB, donors=1.0)
    return FleetDonor(donor_id, owner=f"o-{donor_id}", device_class="desktop", caps=caps,
                      available=caps if running else None, reliability=STEADY, since_s=NOW - 3600,
                      labels={contract.LABEL_DONOR_ID: donor_id, contract.LABEL_ROLE: contract.ROLE_DONOR},
                      node_id=f"n-{donor_id}" if running else None, **kw)  # type: ignore[arg-type]


def test_one_per_donor_train_demand_activates_one_standby_donor_per_missing_worker() -> None:
    # Two big active donors could hold four 1-CPU workers by CPU alone; one `donor` each can't.
    worker = Resources.from_ray({"CPU": 1.0, contract.DONOR_RESOURCE: 1.0},
                                {contract.LABEL_DONOR_ID: "in(a,b,s2,s3)"})  # s1 was not chosen for the run
    assert worker.donors == 1.0 and worker.as_ray() == {"CPU": 1.0, contract.DONOR_RESOURCE: 1.0}
    fleet = FleetView(now_s=NOW, active=(_donor("a", True), _donor("b", True)),
                      standby=build_table([_donor("s1", False), _donor("s2", False), _donor("s3", False)]))
    ctx = AutoscalerContext(AutoscalerBounds(min_active=0, max_active=10), Demand.of(constraints=[worker] * 4), fleet)
    decisions, _ = default_policy(ctx)
    activated = sorted(d.donor_id for d in decisions if isinstance(d, ActivateDonor))
    assert activated == ["s2", "s3"], "two more donors, both chosen for the run"


def test_a_donor_running_a_worker_has_no_donor_resource_free() -> None:
    busy = Resources.from_ray({"CPU": 3.0, contract.DONOR_RESOURCE: 0.0})
    assert not Resources(1.0, donors=1.0).fits_in(busy) and Resources(1.0).fits_in(busy)
    assert Resources(1, donors=1).plus(Resources(1, donors=1)).donors == 2
    assert Resources(2, donors=1).minus(Resources(1, donors=1)).donors == 0
    assert not Resources(donors=1.0).empty


def test_request_label_constraints_become_selectors() -> None:
    def constraint(key: str, op: str, values: list[str]) -> SimpleNamespace:
        number = {"LABEL_OPERATOR_IN": 1, "LABEL_OPERATOR_NOT_IN": 2}[op]
        enum = SimpleNamespace(values_by_number={number: SimpleNamespace(name=op)})
        descriptor = SimpleNamespace(fields_by_name={"operator": SimpleNamespace(enum_type=enum)})
        return SimpleNamespace(DESCRIPTOR=descriptor, operator=number, label_key=key, label_values=values)

    request = SimpleNamespace(label_selectors=[SimpleNamespace(label_constraints=[
        constraint("dgpt.io/donor-id", "LABEL_OPERATOR_IN", ["d-b", "d-a"]),
        constraint("dgpt.io/role", "LABEL_OPERATOR_IN", ["donor"]),
        constraint("zone", "LABEL_OPERATOR_NOT_IN", ["eu-1"]),
        constraint("pool", "LABEL_OPERATOR_NOT_IN", ["x", "y"]),
    ])])
    assert _selector(request) == {"dgpt.io/donor-id": "in(d-a, d-b)", "dgpt.io/role": "donor",
                                  "zone": "!eu-1", "pool": "!in(x, y)"}


def test_the_planning_view_holds_active_activating_and_standby_donors() -> None:
    view = FleetView(now_s=NOW, active=(_donor("a", True),), activating=(_donor("b", False),),
                     standby=build_table([_donor("s", False, cpus=2.0)]))
    by_id = {d.donor_id: d for d in candidates_from_view(view)}
    assert set(by_id) == {"a", "b", "s"}
    s = by_id["s"]
    assert s.caps == Resources(2.0, 0.0, 4 * GIB, donors=1.0) and s.available is None and s.owner == "o-s"
    assert s.reliability == STEADY and s.since_s == NOW - 3600 and s.labels[contract.LABEL_DONOR_ID] == "s"
    fleet = fleet_from(view, lost=1, ended=2)
    assert fleet.vanish_share == (1 + 1) / (2 + 4) and fleet.now_s == NOW


def test_the_plain_example_imports_no_dgpt() -> None:
    tree = ast.parse((REPO / "examples" / "train_digits_plain.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "dgpt"]


def test_the_planning_view_reads_the_heads_own_fleet_index_with_many_standby_donors() -> None:
    # The head's index keeps labels as one numpy column: many standby donors, not a list of one.
    from dgpt.head.fleet_index import FleetIndex, Role

    index = FleetIndex()
    index.put(_donor("a", True), Role.ACTIVE, NOW + 60)
    for name in ("s1", "s2", "s3"):
        index.put(_donor(name, False), Role.STANDBY, NOW + 60)
    by_id = {d.donor_id: d for d in candidates_from_view(index.view(NOW))}
    assert set(by_id) == {"a", "s1", "s2", "s3"}
    assert [by_id[n].labels[contract.LABEL_DONOR_ID] for n in ("s1", "s2", "s3")] == ["s1", "s2", "s3"]

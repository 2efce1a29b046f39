"""Verified results on a real local fabric: three donors of three owners, one of them faulty.

The faulty donor's agent runs with the drill switch ``DGPT_FAULT_INJECT=wrong-results`` in
its environment (the only donor that has it), as an operator starts a drill. Outcomes go
to the control plane's trust store, in the head's own registry.sqlite.

First a Serve deployment with shadowed methods (one replica per donor, DonorAwareRouter)
copies every call to another owner's replica: the faulty donor's answers disagree, a third
owner settles it, and the trust records show the faulty donor invalid, the others valid.
Then a verified task with k=2 that includes the faulty donor is caught: its result differs
from the honest donor's, the task runs again on the head (the trusted node), the head's
result is the one returned, and the records gain the faulty donor's invalid result and the
honest donor's valid one. The next verified task leaves the caught donor out.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.head.process import shell_env
from dgpt.verify.policy import DEFAULT_TRUST
from tests.integration.conftest import fabric_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FAULTY = "donor-3"
N = 3000
EXPECTED = sum(i * i for i in range(N))

DRIVER = """
import dataclasses, json, os, sys, ray
import dgpt.verify

ray.init(logging_level="ERROR", log_to_driver=False)
faulty, faulty_node, n = sys.argv[2], sys.argv[3], int(sys.argv[4])

def squares(n):
    return sum(i * i for i in range(n))

@ray.remote(num_cpus=0.5)
def switch():
    return os.environ.get("DGPT_FAULT_INJECT")

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
on_faulty = ray.get(switch.options(scheduling_strategy=NodeAffinitySchedulingStrategy(faulty_node, soft=False)).remote())
# Outcomes go to the control plane's trust store (the head's registry.sqlite), the default.
caught = dgpt.verify.run(squares, n, k=2, include=[faulty], num_cpus=0.5, task_id="drill-1")
# The Serve shadows may have given the honest donors a run of 10+ valid results, after which
# a task is checked on a sample only: this one must be checked, so none counts as trusted yet.
from dgpt.verify.policy import ReplicationParams
after = dgpt.verify.run(squares, n, k=2, num_cpus=0.5, task_id="after-1",
                        replication=ReplicationParams(trusted_after=1000))
head = dgpt.verify.runner.head_node_id()
print("OUT " + json.dumps({"switch_on_faulty_worker": on_faulty, "head": head,
                           "caught": {"value": caught.value, **dataclasses.asdict(caught.outcome)},
                           "after": {"value": after.value, **dataclasses.asdict(after.outcome)}}))
"""


SERVE_DRIVER = """
import json, sys, time, ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from dgpt.contract import NAMESPACE, REGISTRY_ACTOR
from dgpt.serve.router import router_config
from dgpt.serve.shadow import shadowed

ray.init(logging_level="ERROR", log_to_driver=False, namespace="verify-shadow")
path, faulty, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
# The control plane's trust store (the head's registry.sqlite): the shadows' default.
recorder = ray.get_actor(REGISTRY_ACTOR, namespace=NAMESPACE)

@serve.deployment(num_replicas=3, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.25},
                  request_router_config=router_config())
class Multiplier:
    @shadowed(fraction=1.0)
    async def double(self, x):  # compared on the replica's event loop
        return 2 * x

    @shadowed(fraction=1.0)
    def triple(self, x):  # compared in a thread of its own
        return 3 * x

handle = serve.run(Multiplier.bind(), name="shadowed", route_prefix=None)
answers = [(handle.double if i % 2 else handle.triple).remote(i).result(timeout_s=60) for i in range(calls)]
deadline = time.time() + 120
while time.time() < deadline:
    records = ray.get(recorder.trust_records.remote([faulty]))
    if faulty in records and records[faulty].state.invalid >= 2:
        break
    time.sleep(1)
time.sleep(3)  # comparisons still in flight land
records = {d: r.as_dict() for d, r in ray.get(recorder.trust_records.remote(
    [n["Labels"]["dgpt.io/donor-id"] for n in ray.nodes() if n["Alive"] and "dgpt.io/donor-id" in n["Labels"]])).items()}
serve.delete("shadowed")
print("OUT " + json.dumps({"answers": answers, "records": records}))
"""


@pytest.fixture(scope="module")
def verify_fabric(ray_test_env: None) -> Iterator[Settings]:
    """Three donors of three owners; the agent of FAULTY alone runs with the drill switch on."""
    home = Path(tempfile.mkdtemp(prefix="dgpt-vf-"))
    settings = fabric_settings(home)
    specs = [replace(s, fault_inject="wrong-results") if s.name == FAULTY else s for s in fabric.donor_specs(3)]
    try:
        fabric.up(settings, 3, timeout_s=300, specs=specs)
        yield settings
    finally:
        fabric.down(settings)


def _rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows as the file holds them, read through a connection of this test's own."""
    con = sqlite3.connect(str(db))
    try:
        return [tuple(r) for r in con.execute(sql, params).fetchall()]
    finally:
        con.close()


SHADOW_CALLS = 12


@pytest.fixture(scope="module")
def shadowed_serve(verify_fabric: Settings) -> dict[str, Any]:
    """Every call of a shadowed deployment copied to another owner, before any verified task:
    once the faulty donor's trust is low, the router sends it no more requests."""
    with fabric.api_client(verify_fabric) as client:
        donors = {d.name: d for d in client.donors()}
    faulty = donors[FAULTY]
    path = head_paths(verify_fabric.home)["db"]
    out = subprocess.run([sys.executable, "-c", SERVE_DRIVER, str(path), faulty.donor_id, str(SHADOW_CALLS)],
                         env={**os.environ, **shell_env(verify_fabric)}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("OUT "))[4:])
    rows = {r[0]: r[1:] for r in _rows(path, "SELECT donor_id, valid, invalid, inconclusive FROM verify_trust")}
    return {"path": path, "donors": donors, "rows": rows, **seen}


def test_serve_shadow_copies_charge_the_faulty_donor(shadowed_serve: dict[str, Any]) -> None:
    faulty = shadowed_serve["donors"][FAULTY]
    answers = shadowed_serve["answers"]
    # Clients got plain answers (double on odd calls, triple on even ones); the faulty replica's
    # were perturbed (one more).
    right = [(2 if i % 2 else 3) * i for i in range(len(answers))]
    assert all(a in (r, r + 1) for a, r in zip(answers, right, strict=True))
    assert any(a == r for a, r in zip(answers, right, strict=True))
    rows = shadowed_serve["rows"]  # the control plane's store, in the head's registry.sqlite
    assert rows[faulty.donor_id][0] == 0 and rows[faulty.donor_id][1] >= 2
    honest = [d.donor_id for name, d in shadowed_serve["donors"].items() if name != FAULTY]
    for donor_id in honest:
        valid, invalid, _ = rows[donor_id]
        assert valid >= 1 and invalid == 0
    # Every disagreement reached the third owner (the router honoured each copy's hint).
    assert all(inconclusive == 0 for _, _, inconclusive in rows.values())
    tasks = {r[0].rsplit(":", 1)[0] for r in _rows(shadowed_serve["path"], "SELECT task_id FROM verify_outcomes")}
    assert tasks == {"serve:shadowed/Multiplier.double", "serve:shadowed/Multiplier.triple"}
    assert shadowed_serve["records"][faulty.donor_id]["trust"] < DEFAULT_TRUST.low


@pytest.fixture(scope="module")
def drill(verify_fabric: Settings, shadowed_serve: dict[str, Any]) -> dict[str, Any]:
    """The donors, and what the driver saw: the switch in the faulty worker, both verified tasks
    (after the Serve shadows, which charged the faulty donor first)."""
    with fabric.api_client(verify_fabric) as client:
        donors = {d.name: d for d in client.donors()}
    assert len({d.owner for d in donors.values()}) == 3
    faulty = donors[FAULTY]
    assert faulty.state == "active" and faulty.node_id
    db = head_paths(verify_fabric.home)["db"]
    out = subprocess.run([sys.executable, "-c", DRIVER, str(db), faulty.donor_id, faulty.node_id, str(N)],
                         env={**os.environ, **shell_env(verify_fabric)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("OUT "))[4:])
    return {"donors": donors, "db": db, "shadow_rows": shadowed_serve["rows"], **seen}


def test_the_agents_switch_reaches_the_ray_workers_of_that_donor_only(drill: dict[str, Any]) -> None:
    assert drill["switch_on_faulty_worker"] == "wrong-results"


def test_a_wrong_result_is_caught_and_rerun_on_the_head(drill: dict[str, Any]) -> None:
    faulty = drill["donors"][FAULTY]
    caught = drill["caught"]
    assert caught["value"] == EXPECTED  # the trusted node's result, not the perturbed one
    assert caught["decision"] == "rerun"
    by_donor = {r["donor_id"]: r for r in caught["replicas"]}
    assert len(by_donor) == 2 and faulty.donor_id in by_donor
    (honest_id,) = set(by_donor) - {faulty.donor_id}
    honest = next(d for d in drill["donors"].values() if d.donor_id == honest_id)
    assert honest.owner != faulty.owner
    assert by_donor[faulty.donor_id]["outcome"] == "invalid"
    assert by_donor[faulty.donor_id]["node_id"] == faulty.node_id
    assert by_donor[honest_id]["outcome"] == "valid"
    assert by_donor[honest_id]["digest"] == caught["trusted"]["digest"] != by_donor[faulty.donor_id]["digest"]
    assert caught["trusted"]["node_id"] == drill["head"]
    assert [v["donor_id"] for v in caught["voids"]] == [faulty.donor_id]
    void = caught["voids"][0]
    assert void["applied"] and void["start_at"] <= void["end_at"] and void["node_id"] == faulty.node_id


def test_the_trust_records_in_the_heads_database_charge_the_faulty_donor(drill: dict[str, Any]) -> None:
    faulty = drill["donors"][FAULTY]
    honest_id = next(r["donor_id"] for r in drill["caught"]["replicas"] if r["donor_id"] != faulty.donor_id)
    rows = {r[0]: r[1:] for r in _rows(drill["db"], "SELECT donor_id, valid, invalid, trust FROM verify_trust")}
    valid, invalid, trust = rows[faulty.donor_id]
    shadow_valid, shadow_invalid, _ = drill["shadow_rows"][faulty.donor_id]
    assert (valid, invalid) == (shadow_valid, shadow_invalid + 1) and trust < DEFAULT_TRUST.low
    assert rows[honest_id][0] >= 1 and rows[honest_id][1] == 0 and rows[honest_id][2] > DEFAULT_TRUST.initial
    outcomes = _rows(drill["db"], "SELECT donor_id, outcome, node_id FROM verify_outcomes WHERE task_id = 'drill-1'")
    assert sorted(outcomes) == sorted([(faulty.donor_id, "invalid", faulty.node_id),
                                       (honest_id, "valid", drill["donors"][_name(drill, honest_id)].node_id)])


def _name(drill: dict[str, Any], donor_id: str) -> str:
    return next(name for name, d in drill["donors"].items() if d.donor_id == donor_id)


def test_the_next_verified_task_leaves_the_caught_donor_out(drill: dict[str, Any]) -> None:
    faulty = drill["donors"][FAULTY]
    after = drill["after"]
    assert after["value"] == EXPECTED and after["decision"] == "agreed"
    used = {r["donor_id"] for r in after["replicas"]}
    assert faulty.donor_id not in used and len(used) == 2
    assert all(r["outcome"] == "valid" for r in after["replicas"])
    rows = {r[0]: r[1] for r in _rows(drill["db"], "SELECT donor_id, valid FROM verify_trust")}
    assert all(rows[d] >= 1 for d in used)


def test_the_head_counts_the_outcomes(verify_fabric: Settings, drill: dict[str, Any]) -> None:
    text = httpx.get(f"http://127.0.0.1:{verify_fabric.metrics_port}/metrics", timeout=30).text
    counts = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("dgpt_verification_outcomes_total{")}
    assert counts["rerun"] >= 1 and counts["disagreed"] >= 1 and counts["agreed"] >= 1 and counts["voided"] >= 1

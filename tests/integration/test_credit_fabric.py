"""Credit and metrics on a real local fabric: a head and two donors, each its own raylet.

Work pinned to one donor is metered from Ray's own accounting; the ledger's credit for that
session equals the metered resource-seconds times the donor's speed weight, the metered
CPU-seconds match what the tasks themselves measured, the other donor earns nothing, the
chain verifies, an edit of the head's real SQLite file is found by row, and the metrics
endpoint exposes the named series (and Ray's own node metrics through its targets).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgpt.config import Settings
from dgpt.credit.unit import CREDITS_PER_GFLOPS_S
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.head.process import shell_env
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

#: Short credit rows, so the work's last row closes seconds after the work.
CREDIT_INTERVAL_S = 5.0
TASKS, TASK_S = 6, 3.0
NAMED = ("dgpt_donors", "dgpt_sessions_ended_total", "dgpt_heartbeat_seconds", "dgpt_api_request_seconds",
         "dgpt_autoscaler_decisions_total", "dgpt_placement_seconds", "dgpt_credit_issued_total",
         "dgpt_credit_voided_total", "dgpt_credit_ledger", "dgpt_metered_resource_seconds_total",
         "dgpt_verification_outcomes_total", "dgpt_storage_durability_margin")

DRIVER = """
import json, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
def work(seconds):
    start = time.time()
    while time.time() - start < seconds:
        pass
    return start, time.time()

node = sys.argv[1]
refs = [work.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(float(sys.argv[3]))
        for _ in range(int(sys.argv[2]))]
print("SPANS " + json.dumps(ray.get(refs)))
"""


@pytest.fixture(scope="module")
def credit_fabric(ray_test_env: None) -> Iterator[Settings]:
    home = Path(tempfile.mkdtemp(prefix="dgpt-cr-"))
    settings = fabric_settings(home, credit_interval_s=CREDIT_INTERVAL_S)
    try:
        fabric.up(settings, 2, timeout_s=300)
        yield settings
    finally:
        fabric.down(settings)


def _cli(settings: Settings, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "dgpt.cli.main", *args], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "DGPT_HOME": str(settings.home)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _api(settings: Settings, path: str, **params: Any) -> Any:
    key = head_paths(settings.home)["api_key"].read_text().strip()
    r = httpx.get(f"{settings.api_url}{path}", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _series(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


@pytest.fixture(scope="module")
def worked(credit_fabric: Settings) -> dict[str, Any]:
    """Run TASKS one-CPU tasks of TASK_S on donor-2 and wait until the ledger holds their last row."""
    donors = {d["name"]: d for d in _cli(credit_fabric, "status", "--json")["donors"]}
    target = donors["donor-2"]
    assert target["state"] == "active" and target["node_id"]
    out = subprocess.run([sys.executable, "-c", DRIVER, target["node_id"], str(TASKS), str(TASK_S)],
                         env={**os.environ, **shell_env(credit_fabric)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    spans = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("SPANS "))[6:])
    last_end = max(end for _, end in spans)

    def closed() -> dict[str, Any] | None:
        credit = _api(credit_fabric, f"/donors/{target['donor_id']}/credit", entries=1000)
        ends = [e["end_at"] for e in credit["entries"]]
        return credit if ends and max(ends) >= last_end else None

    try:
        credit = wait_for(closed, 120, "the ledger row holding the end of the work")
    except AssertionError:
        seen = _api(credit_fabric, f"/donors/{target['donor_id']}/credit", entries=1000)
        metrics = httpx.get(f"http://127.0.0.1:{credit_fabric.metrics_port}/metrics", timeout=30).text
        log = head_paths(credit_fabric.home)["log"]
        tail = log.read_text()[-4000:] if log.is_file() else "(no head log)"
        raise AssertionError(f"work ended at {last_end:.2f}; rows: {[(e['start_at'], e['end_at'], e['cpu_s']) for e in seen['entries']]}; "
                             f"metered cpu {[x for x in metrics.splitlines() if 'metered' in x]}; "
                             f"autoscaler {_api(credit_fabric, '/cluster')['autoscaler'].get('ticks')}; head log: {tail}") from None
    return {"donors": donors, "target": target, "spans": spans, "credit": credit}


def test_session_credit_is_metered_resource_seconds_times_the_speed_weight(credit_fabric: Settings,
                                                                           worked: dict[str, Any]) -> None:
    credit, target = worked["credit"], worked["target"]
    rows = [e for e in credit["entries"] if e["kind"] == "credit"]
    profile = target["profile"]
    w_cpu = profile["cpu_gflops"] / profile["cpus"] * CREDITS_PER_GFLOPS_S
    session_id = _api(credit_fabric, f"/donors/{target['donor_id']}")["sessions"][-1]["session_id"]
    for e in rows:
        assert e["session_id"] == session_id and e["node_id"] == target["node_id"]
        assert e["weights"]["cpu"] == pytest.approx(w_cpu, rel=1e-12)
        assert e["credit"] == e["cpu_s"] * e["weights"]["cpu"] + e["gpu_s"] * e["weights"]["gpu"] + \
            e["memory_byte_s"] * e["weights"]["memory"]
        assert e["end_at"] - e["start_at"] <= CREDIT_INTERVAL_S + 5, "rows are at most one credit interval long"
    metered_cpu_s = sum(e["cpu_s"] for e in rows)
    session = next(s for s in credit["sessions"] if s["session_id"] == session_id)
    assert session["cpu_s"] == pytest.approx(metered_cpu_s, rel=1e-12)
    assert session["credit"] == pytest.approx(metered_cpu_s * w_cpu, rel=1e-9)
    assert credit["total_credit"] == pytest.approx(metered_cpu_s * w_cpu, rel=1e-9)
    assert credit["total_credit"] > 0
    # What Ray accounted against what the tasks measured themselves: each task held its CPU at
    # least while it ran, and the meter's error per allocation is under one sample interval
    # (the autoscaler's tick, ~1 s here, longer on a loaded machine), plus Ray's lease overhead.
    ran_s = sum(end - start for start, end in worked["spans"])
    print(f"metered {metered_cpu_s:.2f} CPU-s for {ran_s:.2f} s of tasks; credit {credit['total_credit']:.6f}")
    assert ran_s - TASKS * 1.5 <= metered_cpu_s <= ran_s + TASKS * 3.0
    other = _api(credit_fabric, f"/donors/{worked['donors']['donor-1']['donor_id']}/credit")
    assert other["cpu_s"] == 0 and other["total_credit"] == 0, "work on donor-2 is not credited to donor-1"
    assert credit["recent_average_credit"] > 0

    # What the donor itself sees with its own secret, and the operator's status column.
    own = _cli(credit_fabric, "donor", "credit", "--donor-id", "donor-2", "--json")
    assert own["total_credit"] == pytest.approx(credit["total_credit"], rel=1e-9)
    status = {d["name"]: d for d in _cli(credit_fabric, "status", "--json")["donors"]}
    assert status["donor-2"]["credit"] == pytest.approx(credit["total_credit"], rel=1e-9)


def test_the_chain_verifies_and_an_edit_of_the_real_sqlite_file_is_found(credit_fabric: Settings,
                                                                        worked: dict[str, Any]) -> None:
    check = _api(credit_fabric, "/credit/verify")
    assert check["ok"] and check["rows"] >= 1, check
    row = worked["credit"]["entries"][0]["seq"]
    db = head_paths(credit_fabric.home)["db"]
    with sqlite3.connect(db, timeout=30) as other:
        other.execute("UPDATE credit_ledger SET cpu_s = cpu_s * 2 WHERE seq = ?", (row,))
    try:
        bad = _api(credit_fabric, "/credit/verify")
        assert not bad["ok"] and bad["first_bad_seq"] == row and "edited" in bad["problem"], bad
    finally:
        with sqlite3.connect(db, timeout=30) as other:
            other.execute("UPDATE credit_ledger SET cpu_s = cpu_s / 2 WHERE seq = ?", (row,))
    assert _api(credit_fabric, "/credit/verify")["ok"]
    tip = worked["credit"]["tip"]
    assert _api(credit_fabric, "/credit/verify", anchor_seq=tip["seq"], anchor_hash=tip["hash"])["ok"]


def test_the_metrics_endpoint_exposes_the_named_series_and_rays_nodes(credit_fabric: Settings,
                                                                     worked: dict[str, Any]) -> None:
    base = f"http://127.0.0.1:{credit_fabric.metrics_port}"
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for name in NAMED:
        assert f"\n{name}" in text, name
    assert _series(text, 'dgpt_donors{state="active"}') == 2
    assert _series(text, "dgpt_heartbeat_seconds_count") > 0
    ledger = sum(s["total_credit"] for s in _api(credit_fabric, "/credit"))
    assert _series(text, "dgpt_credit_ledger") == pytest.approx(ledger, rel=1e-9)
    assert _series(text, "dgpt_credit_issued_total") == pytest.approx(ledger, rel=1e-9)
    metered = sum(e["cpu_s"] for e in worked["credit"]["entries"] if e["kind"] == "credit")
    assert _series(text, 'dgpt_metered_resource_seconds_total{resource="cpu"}') >= metered
    assert not any(d["donor_id"] in text for d in worked["donors"].values()), "no donor id as a label"

    targets = httpx.get(f"{base}/ray/targets", timeout=30).json()
    nodes = [t for group in targets if group["labels"]["ray_component"] == "node" for t in group["targets"]]
    assert len(nodes) == 3, targets  # the head and two donors
    donor_target = next(t for g in targets if g["labels"]["dgpt_role"] == "donor" for t in g["targets"])

    def ray_metrics() -> bool:
        return "ray_" in httpx.get(f"http://{donor_target}/metrics", timeout=10).text
    wait_for(ray_metrics, 60, f"Ray's own metrics at {donor_target}")

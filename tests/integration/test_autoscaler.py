"""The autoscaler and placement on a real local fabric: head + 3 donors, 2 of them standby at first.

Drivers run as separate processes with the fabric's environment, exactly as research code
would (`eval "$(dgpt env)"; python script.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.head.process import shell_env
from dgpt.sdk.client import Client
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

IDLE_TIMEOUT_S = 15.0
NAMESPACE = "autoscaler-test"


@pytest.fixture(scope="module")
def fabric_k1(ray_test_env: None) -> Iterator[Settings]:
    """`dgpt up --donors 3 --min-active 1` with a short idle timeout."""
    home = Path(tempfile.mkdtemp(prefix="dgpt-as-"))
    settings = fabric_settings(home, idle_timeout_s=IDLE_TIMEOUT_S)
    try:
        fabric.up(settings, 3, timeout_s=300, min_active=1)
        yield settings
    finally:
        fabric.down(settings)


@pytest.fixture(scope="module")
def client(fabric_k1: Settings) -> Iterator[Client]:
    key = head_paths(fabric_k1.home)["api_key"].read_text().strip()
    with Client(fabric_k1.local_head_url, key) as c:
        yield c


def _driver(settings: Settings, code: str, timeout_s: float = 240) -> dict:
    """Run a Ray driver against the fabric; it prints its answer as one ``RESULT {json}`` line."""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(settings)},
                         capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # Ray may print its own lines (autoscaler events) to a driver's stdout: find ours.
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out.stdout[-2000:]
    return json.loads(line[len("RESULT "):])


def _active(client: Client) -> list[str]:
    return sorted(d.donor_id for d in client.donors() if d.state == "active" and d.node_id)


_ACTORS = f"""
import json, ray
ray.init(namespace="{NAMESPACE}", logging_level="ERROR", log_to_driver=False)
@ray.remote(num_cpus=1)
class Hold:
    def where(self):
        return ray.get_runtime_context().get_node_labels()["dgpt.io/donor-id"]
actors = [Hold.options(name=f"hold-{{i}}", lifetime="detached").remote() for i in range(3)]
print("RESULT " + json.dumps(ray.get([a.where.remote() for a in actors], timeout=180)))
"""

_RELEASE = f"""
import json, ray
ray.init(namespace="{NAMESPACE}", logging_level="ERROR", log_to_driver=False)
for i in range(3):
    ray.kill(ray.get_actor(f"hold-{{i}}"))
print("RESULT " + json.dumps("released"))
"""


def test_starts_with_min_active_and_the_rest_standby(client: Client) -> None:
    states = sorted(d.state for d in client.donors())
    assert states == ["active", "standby", "standby"]


def test_pending_actors_activate_exactly_enough_donors(fabric_k1: Settings, client: Client) -> None:
    first = _active(client)
    assert len(first) == 1
    cpus = {d.donor_id: d.caps.cpus for d in client.donors()}
    placed = _driver(fabric_k1, _ACTORS)
    assert len(placed) == 3
    active = _active(client)
    # 3 one-CPU actors: the first donor's CPUs plus exactly one more donor (every standby has 2).
    assert len(active) == 2, f"activated {active}, CPUs {cpus}"
    assert set(placed) <= set(active)
    time.sleep(5)  # a few more ticks: no further activation while demand is met
    assert _active(client) == active
    activations = [a for a in client.cluster().autoscaler["recent"] if a["action"] == "activate"]
    assert any("pending demand" in a["reason"] for a in activations)


def test_idle_donor_is_drained_after_the_timeout(fabric_k1: Settings, client: Client) -> None:
    before = _active(client)
    assert len(before) == 2
    _driver(fabric_k1, _RELEASE)
    wait_for(lambda: len(_active(client)) == 1, IDLE_TIMEOUT_S * 2 + 90, "an idle donor to be drained")
    drained = [d for d in client.donors() if d.donor_id in before and d.donor_id not in _active(client)]
    assert len(drained) == 1
    last = drained[0].sessions[-1]
    wait_for(lambda: client.donor(drained[0].donor_id).sessions[-1].ended_as, 60, "the session to close")
    last = client.donor(drained[0].donor_id).sessions[-1]
    assert (last.ended_as, last.end_reason) == ("drained", "autoscaler")
    assert any(a["action"] == "drain" and "idle" in a["reason"] for a in client.cluster().autoscaler["recent"])


_REQUEST_ALL = """
import json, ray
from ray.autoscaler.sdk import request_resources
ray.init(logging_level="ERROR", log_to_driver=False)
request_resources(bundles=[{"CPU": 1}, {"CPU": 2}, {"CPU": 2}])
print("RESULT " + json.dumps("requested"))
"""


def test_request_resources_activates_donors(fabric_k1: Settings, client: Client) -> None:
    _driver(fabric_k1, _REQUEST_ALL)
    wait_for(lambda: len(_active(client)) == 3, 120, "request_resources() to activate every donor")
    reasons = [a["reason"] for a in client.cluster().autoscaler["recent"] if a["action"] == "activate"]
    assert any("pending demand" in r for r in reasons[-2:]), reasons


_INFERENCE = """
import json, ray
import dgpt.placement
ray.init(logging_level="ERROR", log_to_driver=False)
@ray.remote
class Replica:
    def where(self):
        return ray.get_runtime_context().get_node_labels()["dgpt.io/donor-id"]
replicas = [Replica.options(**dgpt.placement.options("inference", num_cpus=0.5)).remote() for _ in range(3)]
print("RESULT " + json.dumps(ray.get([r.where.remote() for r in replicas], timeout=120)))
"""


def test_inference_options_spread_over_three_donors(fabric_k1: Settings, client: Client) -> None:
    wait_for(lambda: len(_active(client)) == 3, 120, "every donor active")
    placed = _driver(fabric_k1, _INFERENCE)
    assert len(set(placed)) == 3, f"replicas landed on {placed}"


_GANG = """
import json, ray
import dgpt.placement
ray.init(logging_level="ERROR", log_to_driver=False)
pg = dgpt.placement.gang("training", [{"CPU": 1}, {"CPU": 1}], horizon_s=4 * 3600)
ray.get(pg.ready(), timeout=120)
@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_labels()["dgpt.io/donor-id"]
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
refs = [where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
        for i in range(2)]
print("RESULT " + json.dumps(ray.get(refs, timeout=120)))
"""


def test_training_gang_lands_on_the_most_reliable_donors(fabric_k1: Settings, client: Client) -> None:
    wait_for(lambda: len(_active(client)) == 3, 120, "every donor active")
    donors = sorted(client.donors(), key=lambda d: d.name)
    flaky, steady = donors[0], donors[1:]
    now = time.time()
    for i in range(20):  # history through the registry: long-lived donors and a flaky one
        start = now - 90 * 86400 + i * 4 * 86400
        for d in steady:
            client.import_session(d.donor_id, start, start + 3 * 86400, "drained")
        client.import_session(flaky.donor_id, start, start + 120, "lost")
    placed = _driver(fabric_k1, _GANG)
    assert sorted(placed) == sorted(d.donor_id for d in steady), f"gang on {placed}; flaky is {flaky.donor_id}"

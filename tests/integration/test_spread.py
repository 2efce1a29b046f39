"""Replicas spread over owners (failure domains), even when fewer owners are active than replicas.

Four donors, three owners: alice has two machines, bob and carol one each. One donor is
active at first; the rest wait in standby. Three digits replicas (one per node) must land on
three different owners: the autoscaler activates standby donors of unused owners for them,
not alice's second machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.fabric import DonorSpec
from dgpt.head.process import shell_env
from dgpt.serve import deploy as serve_deploy
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DIGITS_YAML = Path(__file__).resolve().parents[2] / "deployments" / "digits.yaml"
SPECS = [
    DonorSpec("alice-1", "desktop", "alice", 1.0, 1.5),
    DonorSpec("alice-2", "desktop", "alice", 1.0, 1.5),
    DonorSpec("bob-1", "laptop", "bob", 1.0, 1.5),
    DonorSpec("carol-1", "laptop", "carol", 1.0, 1.5),
]


@pytest.fixture(scope="module")
def owners_fabric(ray_test_env: None) -> Iterator[Settings]:
    # A short idle timeout: between tests the autoscaler drains back to the one active donor.
    settings = fabric_settings(Path(tempfile.mkdtemp(prefix="dgpt-sp-")), idle_timeout_s=15.0)
    try:
        fabric.up(settings, len(SPECS), timeout_s=300, min_active=1, specs=SPECS)
        yield settings
    finally:
        fabric.down(settings)


def _donors(settings: Settings) -> dict[str, dict]:
    with fabric.api_client(settings) as c:
        return {d.name: d.model_dump(mode="json") for d in c.donors()}


def _replica_owners(settings: Settings) -> list[str]:
    by_node = {d["node_id"]: d["owner"] for d in _donors(settings).values() if d["node_id"]}
    app = serve_deploy.status(settings).app("digits")
    if app is None:
        return []
    return [by_node.get(r.node_id or "", "?") for d in app.deployments for r in d.replicas if r.state == "RUNNING"]


def _one_active(settings: Settings) -> None:
    wait_for(lambda: [d["state"] for d in _donors(settings).values()].count("active") == 1, 240,
             "the fabric back to one active donor")


def test_three_replicas_land_on_three_owners_from_one_active_donor(owners_fabric: Settings) -> None:
    _one_active(owners_fabric)
    config = serve_deploy.load_config(DIGITS_YAML)
    config["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=3, max_replicas=3)
    serve_deploy.deploy_config(owners_fabric, config)
    try:
        # Serve asks for one replica per node (max_replicas_per_node: 1): the autoscaler sees
        # that a pending replica fits no running donor, however much CPU is free on them.
        wait_for(lambda: len(_replica_owners(owners_fabric)) == 3, 180, "three RUNNING replicas")
        owners = _replica_owners(owners_fabric)
        assert sorted(owners) == ["alice", "bob", "carol"], f"replicas on owners {owners}"
        active = [n for n, d in _donors(owners_fabric).items() if d["state"] == "active"]
        assert active.count("alice-1") + active.count("alice-2") == 1, "only one of alice's machines was needed"
    finally:
        serve_deploy.delete(owners_fabric, "digits")
        serve_deploy.wait_deleted(owners_fabric, "digits")


_ACTORS = """
import json, ray, dgpt.placement
ray.init(namespace="spread-test", logging_level="ERROR", log_to_driver=False)
@ray.remote
class Replica:
    def owner(self):
        return ray.get_runtime_context().get_node_labels()["dgpt.io/owner"]
owners = []
actors = []
for i in range(3):
    opts = dgpt.placement.options("inference", num_cpus=0.5, existing_owners=set(owners))
    actor = Replica.options(name=f"r{i}", lifetime="detached", **opts).remote()
    actors.append(actor)
    owners.append(ray.get(actor.owner.remote(), timeout=240))
print("RESULT " + json.dumps(owners))
for a in actors:
    ray.kill(a)
"""


def test_placement_options_spread_replicas_over_owners_activating_standby_donors(owners_fabric: Settings) -> None:
    _one_active(owners_fabric)
    out = subprocess.run([sys.executable, "-c", _ACTORS], env={**os.environ, **shell_env(owners_fabric)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    owners = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert sorted(owners) == ["alice", "bob", "carol"], f"replica actors on owners {owners}"

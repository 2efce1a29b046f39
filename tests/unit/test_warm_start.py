"""A warm `ray start`: Ray imported ahead of time, its arguments sent when the head activates the donor."""

from __future__ import annotations

import json
from pathlib import Path

from dgpt.donor.agent import AgentConfig, DonorAgent
from dgpt.ray_node import NodePorts
from dgpt.sdk.models import DeviceProfile, DonorCaps

GIB = 2**30


def _agent(tmp_path: Path) -> DonorAgent:
    cfg = AgentConfig(head_url="http://127.0.0.1:9", join_token="t", name="d", device_class="desktop", owner="o",
                      state_dir=tmp_path, caps=DonorCaps(cpus=1, memory_bytes=GIB),
                      profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=1.0),
                      ports=NodePorts(6380, "10002-10999"))
    return DonorAgent(cfg)


def test_a_warm_ray_start_runs_the_arguments_it_is_sent(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    warm = agent._spawn_ray(None)
    assert warm.stdin is not None and warm.stdout is not None
    warm.stdin.write((json.dumps(["--version"]) + "\n").encode())
    warm.stdin.close()
    out = warm.stdout.read().decode()
    assert warm.wait(60) == 0
    assert "2.60.0" in out, out


def test_a_warm_ray_start_that_gets_nothing_exits_cleanly(tmp_path: Path) -> None:
    warm = _agent(tmp_path)._spawn_ray(None)
    assert warm.stdin is not None
    warm.stdin.close()
    assert warm.wait(60) == 0

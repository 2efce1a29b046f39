"""A donor's caps enforced by the kernel on a real raylet: CPU by its cgroup's quota, memory by its limit.

One donor capped at 1 CPU and 1.5 GiB, its raylet in a cgroup and the sandbox (both ``on``:
the fabric fails to start rather than run unprotected). A task that spins on every core is
held to about one core, measured by the cgroup's own accounting; a task that allocates past
the memory cap is killed inside the cgroup while the agent and its raylet live on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dgpt.config import Settings
from dgpt.donor.cgroups import WorkCgroup, cgroup_name, host_layout, parse_proc_cgroup
from dgpt.exceptions import ProtectionUnavailable
from dgpt.head import fabric
from dgpt.head.fabric import DonorSpec
from dgpt.head.process import shell_env
from dgpt.processes import alive, read_json
from tests.integration.conftest import fabric_settings, wait_for

GIB = 2**30
DONOR = DonorSpec(name="capped", device_class="laptop", owner="owner-capped", cpus=1.0, memory_gb=1.5)
SPIN_S = 6.0


def _protectable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (cgroups, and the sandbox's user switch)"
    if shutil.which("bwrap") is None:
        return "needs bubblewrap (apt-get install bubblewrap)"
    try:
        layout = host_layout()
    except ProtectionUnavailable as exc:
        return exc.message
    if not os.access(layout.memory.parent, os.W_OK) or not os.access(layout.cpu.parent, os.W_OK):
        return "the cgroup filesystem is not writable here"
    return None


pytestmark = [pytest.mark.integration, pytest.mark.skipif(_protectable() is not None, reason=str(_protectable()))]


@pytest.fixture(scope="module")
def capped(ray_test_env: None) -> Iterator[tuple[Settings, dict, WorkCgroup]]:
    home = Path(tempfile.mkdtemp(prefix="dgpt-caps-"))
    settings = fabric_settings(home, enforce_caps="on", sandbox="on")
    group = WorkCgroup(host_layout(), cgroup_name(DONOR.name, home / "donors" / DONOR.name))
    try:
        up = fabric.up(settings, 1, timeout_s=240, specs=[DONOR])
        yield settings, up["donors"][0], group
    finally:
        fabric.down(settings)
    assert not any(d.exists() for d in group.dirs), "the agent removes its cgroup when it stops"


def _driver(settings: Settings, code: str, timeout_s: float = 180) -> dict:
    """Run a Ray driver against the fabric; it prints its answer as one ``RESULT {json}`` line."""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shell_env(settings)},
                         capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(line[len("RESULT "):])


def _raylet(agent_pid: int) -> psutil.Process:
    return next(p for p in psutil.Process(agent_pid).children(recursive=True) if p.name() == "raylet")


def test_the_raylet_and_its_workers_run_in_the_donors_cgroup(capped: tuple[Settings, dict, WorkCgroup]) -> None:
    _settings, donor, group = capped
    assert group.limits() == (DONOR.cpus, int(DONOR.memory_gb * GIB))  # the caps, as the kernel holds them
    raylet = _raylet(donor["pid"])
    paths = parse_proc_cgroup(Path(f"/proc/{raylet.pid}/cgroup").read_text())
    for controller, d in (("cpu", group.cpu_dir), ("cpuacct", group.cpuacct_dir), ("memory", group.memory_dir)):
        assert paths[controller].endswith("/" + group.name), (controller, paths)
        assert d.exists()
    assert raylet.pid in group.pids() and donor["pid"] not in group.pids()  # the agent stays outside


SPIN = f"""
import json, os, time, ray
ray.init(logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1, resources={{"donor": 0.01}}, max_retries=0)
def spin():
    # The donor's cgroup, as the sandbox shows it to the work: it counts all its processes.
    def stat(path):
        return dict((k, int(v)) for k, v in (line.split() for line in open(path)))
    if os.path.exists("/sys/fs/cgroup/cpuacct/cpuacct.usage"):  # cgroup v1
        usage = lambda: int(open("/sys/fs/cgroup/cpuacct/cpuacct.usage").read())
        throttled = lambda: stat("/sys/fs/cgroup/cpu/cpu.stat")["nr_throttled"]
    else:  # cgroup v2
        usage = lambda: stat("/sys/fs/cgroup/cpu.stat")["usage_usec"] * 1000
        throttled = lambda: stat("/sys/fs/cgroup/cpu.stat")["nr_throttled"]
    cores = os.cpu_count()
    before, t0, thr0 = usage(), time.monotonic(), throttled()
    kids = []
    for _ in range(2 * cores):  # more spinners than cores: all of them want a whole core
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + {SPIN_S}
            while time.monotonic() < end:
                pass
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    wall = time.monotonic() - t0
    return {{"cores": cores, "cpu_s": (usage() - before) / 1e9, "wall_s": wall, "throttled": throttled() - thr0}}

print("RESULT " + json.dumps(ray.get(spin.remote(), timeout=120)))
"""


def test_a_task_spinning_on_every_core_gets_about_one_core(capped: tuple[Settings, dict, WorkCgroup]) -> None:
    settings, _donor, group = capped
    host_before, t0 = group.usage(), time.monotonic()
    seen = _driver(settings, SPIN)
    host_after, host_wall = group.usage(), time.monotonic() - t0
    assert seen["cores"] >= 2, "the machine must have more cores than the cap for this test to mean anything"
    rate = seen["cpu_s"] / seen["wall_s"]
    # At most one core (1 CPU cap, plus the raylet's own share of the same quota) ...
    assert rate <= 1.15, seen
    # ... because the quota held it there: the spinners asked for every core.
    assert seen["throttled"] > 0 and host_after.throttled_periods > host_before.throttled_periods, seen
    # The host's view of the same cgroup agrees: the whole driver run stayed under the cap too.
    assert (host_after.cpu_s - host_before.cpu_s) <= 1.1 * host_wall, (host_before, host_after, host_wall)


HOG = """
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1, resources={"donor": 0.01}, max_retries=0)
def hog():
    chunks = []
    for _ in range(48):  # 3 GiB, twice the donor's cap, touched page by page
        chunks.append(bytearray(b"x" * (64 << 20)))
    return len(chunks)

@ray.remote(num_cpus=1, resources={"donor": 0.01})
def after():
    return ray.get_runtime_context().get_node_id()

try:
    ray.get(hog.remote(), timeout=150)
    outcome = {"error": None}
except Exception as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc)[:2000]}
outcome["node_after"] = ray.get(after.remote(), timeout=120)
print("RESULT " + json.dumps(outcome))
"""


def test_a_task_past_the_memory_cap_is_killed_and_the_agent_lives_on(capped: tuple[Settings, dict, WorkCgroup]) -> None:
    settings, donor, group = capped
    raylet_before = _raylet(donor["pid"]).pid
    before = group.usage()
    outcome = _driver(settings, HOG, timeout_s=300)
    after = group.usage()
    cap = int(DONOR.memory_gb * GIB)
    assert outcome["error"] in ("OutOfMemoryError", "WorkerCrashedError"), outcome
    # The cause is the donor's cap: the cgroup reached it, and either Ray's memory monitor
    # (which reads the cap through the sandbox's view of the cgroup) or the kernel's OOM
    # killer inside the cgroup ended the task.
    assert after.memory_peak_bytes is not None and after.memory_peak_bytes >= 0.9 * cap, (after, cap)
    assert after.memory_peak_bytes <= cap
    if outcome["error"] == "OutOfMemoryError":
        assert "memory" in outcome["message"].lower()
    else:
        assert after.oom_kills > before.oom_kills
    # The agent, its raylet and the node are the same as before: only the task died.
    assert alive(donor["pid"])
    assert _raylet(donor["pid"]).pid == raylet_before
    state = wait_for(lambda: read_json(Path(donor["state_dir"]) / "status.json"), 10, "the agent's status")
    assert state["state"] == "active"
    assert outcome["node_after"]  # the same donor ran the next task

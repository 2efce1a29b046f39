"""Protection modes (auto/on/off), and the agent's `ray start` (the warm one too) in its cgroup and sandbox."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgpt.config import load_settings
from dgpt.donor.agent import AgentConfig, DonorAgent
from dgpt.donor.cgroups import WorkCgroup, host_layout
from dgpt.donor.protection import Mode, Protection, ProtectionConfig
from dgpt.exceptions import ConfigError, ProtectionUnavailable
from dgpt.ray_node import NodePorts
from dgpt.sdk.models import DeviceProfile, DonorCaps

GIB = 2**30
CAPS = DonorCaps(cpus=1, memory_bytes=GIB)


def _setup(tmp_path: Path, config: ProtectionConfig) -> Protection:
    return Protection.setup(config, name="unit", state_dir=tmp_path / "state", caps=CAPS,
                            token_file=tmp_path / "state" / "ray_auth_token")


def test_off_leaves_the_command_as_it_is(tmp_path: Path) -> None:
    p = _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.OFF))
    assert p.cgroup is None and p.spec is None and p.notes == []
    assert p.wrap(["ray", "start"]) == ["ray", "start"]
    ran = []
    p.preexec(lambda: ran.append(1))()
    assert ran == [1] and p.usage() is None
    assert p.describe() == "caps not enforced; not sandboxed"


def test_auto_without_bubblewrap_warns_naming_what_is_not_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    with caplog.at_level(logging.WARNING, logger="dgpt.donor"):
        p = _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.AUTO))
    assert p.spec is None and p.wrap(["x"]) == ["x"]
    assert "work not sandboxed (it can read the owner's files): bubblewrap (bwrap) is not installed" in caplog.text


def test_on_without_bubblewrap_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProtectionUnavailable, match="not installed"):
        _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.ON))


def _cgroups_writable() -> bool:
    try:
        layout = host_layout()
    except ProtectionUnavailable:
        return False
    return os.geteuid() == 0 and os.access(layout.memory.parent, os.W_OK)


full = pytest.mark.skipif(not (_cgroups_writable() and shutil.which("bwrap")),
                          reason="needs root, writable cgroups and bubblewrap")


@full
def test_a_wrapped_command_runs_in_the_cgroup_and_sees_the_caps(tmp_path: Path) -> None:
    p = _setup(tmp_path, ProtectionConfig())
    try:
        assert p.cgroup is not None and p.spec is not None
        code = ("import os\nprint(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip(),"
                " open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read().strip(), os.getuid())")
        out = subprocess.run(p.wrap([sys.executable, "-c", code]), preexec_fn=p.preexec(), capture_output=True,
                             text=True, timeout=60)
        # The view Ray reads its node's memory and CPU from is the donor's own cgroup.
        assert out.stdout.split() == [str(GIB), "100000", "65534"], out.stderr
        usage = p.usage()
        assert usage is not None and usage.cpu_s > 0  # the command ran inside, and was counted
        # The token file is bound before it is written, and stays readable by the work after.
        assert (tmp_path / "state" / "ray_auth_token").stat().st_uid == 65534
    finally:
        p.close()
    assert not any(d.exists() for d in p.cgroup.dirs)


def _agent(tmp_path: Path) -> DonorAgent:
    cfg = AgentConfig(head_url="http://127.0.0.1:9", join_token="t", name="d", device_class="desktop", owner="o",
                      state_dir=tmp_path / "state", caps=CAPS,
                      profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=1.0),
                      ports=NodePorts(6380, "10002-10999"))
    return DonorAgent(cfg)


@full
def test_the_warm_ray_start_waits_inside_the_cgroup_and_the_sandbox(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent._protection = Protection.setup(agent.cfg.protection, name="d", state_dir=agent.cfg.state_dir,
                                         caps=agent.cfg.caps, token_file=agent.files["ray_token"])
    group = agent._protection.cgroup
    assert isinstance(group, WorkCgroup)
    try:
        warm = agent._spawn_ray(None)
        assert warm.stdin is not None and warm.stdout is not None
        assert warm.pid in group.pids()  # bwrap itself: everything below it follows
        warm.stdin.write((json.dumps(["--version"]) + "\n").encode())
        warm.stdin.close()
        out = warm.stdout.read().decode()
        assert warm.wait(60) == 0
        assert "2.60.0" in out, out
    finally:
        agent._protection.close()


@pytest.mark.parametrize("value, why", [
    ("shared", "not an absolute path"),
    ("/srv/a::/srv/b", "empty folder"),
    ("/etc/dgpt", "system folder"),
    ("/", "system folder"),
])
def test_sandbox_shared_names_the_setting_and_what_is_wrong(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={"DGPT_SANDBOX_SHARED": value, "DGPT_HOME": "/nonexistent-dgpt-home"})
    assert "DGPT_SANDBOX_SHARED" in str(err.value) and why in str(err.value)


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs bubblewrap and root")


@needs_bwrap
def test_a_missing_shared_folder_stops_the_agent_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ProtectionUnavailable, match="does not exist on this donor") as err:
        _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.ON, shared=(tmp_path / "nope",)))
    assert "DGPT_SANDBOX_SHARED" in (err.value.hint or "")


@needs_bwrap
def test_a_shared_folder_may_not_expose_the_state_folder(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with pytest.raises(ProtectionUnavailable, match="overlaps the agent's state folder"):
        _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.ON, shared=(tmp_path,)))


@needs_bwrap
def test_the_work_writes_a_shared_folder_and_nothing_beside_it(tmp_path: Path) -> None:
    shared = tmp_path / "results"
    shared.mkdir()
    shared.chmod(0o777)  # the work runs as nobody
    (tmp_path / "beside").mkdir()
    p = _setup(tmp_path, ProtectionConfig(caps=Mode.OFF, sandbox=Mode.ON, shared=(shared,)))
    assert str(shared) in p.describe()
    probe = (f"import os\nopen({str(shared / 'w')!r}, 'w').write('ok')\n"
             f"try:\n    open({str(tmp_path / 'beside' / 'w')!r}, 'w')\nexcept OSError as e:\n    print(e.errno)\n")
    out = subprocess.run(p.wrap([sys.executable, "-c", probe]), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (shared / "w").read_text() == "ok"
    assert not (tmp_path / "beside" / "w").exists() and out.stdout.strip() in ("2", "30")  # hidden or read-only

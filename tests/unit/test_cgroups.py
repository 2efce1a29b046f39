"""Enforced caps: cgroup detection, limit files and accounting (pure), and a real cgroup where writable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgpt.donor.cgroups import (
    CPU_PERIOD_US,
    CgroupVersion,
    Layout,
    Mount,
    Place,
    WorkCgroup,
    cgroup_name,
    cpu_limit_files,
    detect_layout,
    host_layout,
    memory_limit_files,
    parse_flat_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
    usage_from,
)
from dgpt.exceptions import ProtectionUnavailable

GIB = 2**30

# A hybrid host: v1 cpu and cpuacct apart, memory, and an empty unified hierarchy for systemd.
MOUNTINFO_V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUP_V1 = """\
9:name=systemd:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
# A container: cgroup2 at /sys/fs/cgroup whose root is the container's own cgroup.
MOUNTINFO_V2 = """\
25 20 0:23 /kubepods/pod1 /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
26 20 0:24 / /media/my\\040disk rw - ext4 /dev/sdb1 rw
"""
PROC_CGROUP_V2 = "0::/kubepods/pod1/agent\n"


def test_mountinfo_lists_cgroup_mounts_with_their_controllers() -> None:
    mounts = {m.path: m for m in parse_mountinfo(MOUNTINFO_V1)}
    assert set(mounts) == {Path(f"/sys/fs/cgroup/{n}") for n in ("cpu", "cpuacct", "memory", "systemd", "unified")}
    assert mounts[Path("/sys/fs/cgroup/cpu")].controllers == {"cpu"}
    assert mounts[Path("/sys/fs/cgroup/systemd")].controllers == frozenset()  # name=systemd is no controller
    assert mounts[Path("/sys/fs/cgroup/unified")].version is CgroupVersion.V2


def test_mountinfo_keeps_the_mount_root_and_unescapes_paths() -> None:
    (mount,) = parse_mountinfo(MOUNTINFO_V2)
    assert mount.root == "/kubepods/pod1" and mount.path == Path("/sys/fs/cgroup")
    line = "26 20 0:24 / /sys/fs/cgroup/my\\040cpu rw - cgroup cgroup rw,cpu,cpuacct\n"
    (spaced,) = parse_mountinfo(line)
    assert spaced.path == Path("/sys/fs/cgroup/my cpu") and spaced.controllers == {"cpu", "cpuacct"}


def test_proc_cgroup_maps_each_controller_to_its_path() -> None:
    own = parse_proc_cgroup(PROC_CGROUP_V1)
    assert own["memory"] == "/process_api/abc" and own["cpu"] == "/" and own[""] == "/"
    assert parse_proc_cgroup("5:cpu,cpuacct:/user.slice\n") == {"cpu": "/user.slice", "cpuacct": "/user.slice"}


def test_v1_layout_puts_each_job_in_its_hierarchy_below_the_agents_own_cgroup() -> None:
    layout = detect_layout(parse_mountinfo(MOUNTINFO_V1), parse_proc_cgroup(PROC_CGROUP_V1))
    assert layout.version is CgroupVersion.V1
    assert layout.cpu == Place(Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu"))
    assert layout.cpuacct.parent == Path("/sys/fs/cgroup/cpuacct")
    assert layout.memory == Place(Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/memory/process_api/abc"))


def test_v1_comounted_cpu_and_cpuacct_share_one_directory() -> None:
    mounts = parse_mountinfo("1 0 0:1 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
                             "2 0 0:2 / /cg/memory rw - cgroup cgroup rw,memory\n")
    layout = detect_layout(mounts, parse_proc_cgroup("3:cpu,cpuacct:/a\n2:memory:/a\n"))
    assert layout.cpu == layout.cpuacct and layout.cpu.parent == Path("/cg/cpu,cpuacct/a")
    group = WorkCgroup(layout, "dgpt-x")
    assert group.dirs == [Path("/cg/cpu,cpuacct/a/dgpt-x"), Path("/cg/memory/a/dgpt-x")]


def test_v2_layout_strips_the_container_root_and_needs_both_controllers() -> None:
    mounts = parse_mountinfo(MOUNTINFO_V2)
    own = parse_proc_cgroup(PROC_CGROUP_V2)
    here = Path("/sys/fs/cgroup/agent")
    layout = detect_layout(mounts, own, {here: frozenset({"cpu", "memory", "io"})})
    assert layout.version is CgroupVersion.V2 and layout.memory == Place(Path("/sys/fs/cgroup"), here)
    with pytest.raises(ProtectionUnavailable, match="memory controller") as err:
        detect_layout(mounts, own, {here: frozenset({"cpu"})})
    assert err.value.hint and "Delegate=yes" in err.value.hint


def test_no_usable_hierarchy_is_a_clear_error() -> None:
    mounts = [Mount(Path("/sys/fs/cgroup/cpu"), CgroupVersion.V1, frozenset({"cpu"}), "/")]
    with pytest.raises(ProtectionUnavailable, match=r"v1 controllers: cpu"):
        detect_layout(mounts, {})


def test_cpu_limit_is_cores_times_the_period() -> None:
    assert cpu_limit_files(CgroupVersion.V1, 1.5) == [("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                                                      ("cpu.cfs_quota_us", "150000")]
    assert cpu_limit_files(CgroupVersion.V2, 2) == [("cpu.max", f"200000 {CPU_PERIOD_US}")]
    assert cpu_limit_files(CgroupVersion.V2, 0.001) == [("cpu.max", f"1000 {CPU_PERIOD_US}")]  # kernel minimum
    with pytest.raises(ValueError, match="cpus must be > 0"):
        cpu_limit_files(CgroupVersion.V1, 0)


def test_memory_limit_counts_swap_where_the_kernel_accounts_it() -> None:
    assert memory_limit_files(CgroupVersion.V1, GIB, ["memory.limit_in_bytes"]) == [
        ("memory.limit_in_bytes", str(GIB))]
    assert memory_limit_files(CgroupVersion.V1, GIB, ["memory.memsw.limit_in_bytes"]) == [
        ("memory.limit_in_bytes", str(GIB)), ("memory.memsw.limit_in_bytes", str(GIB))]
    assert memory_limit_files(CgroupVersion.V2, GIB, ["memory.swap.max"]) == [
        ("memory.max", str(GIB)), ("memory.swap.max", "0")]
    with pytest.raises(ValueError, match="memory_bytes must be at least"):
        memory_limit_files(CgroupVersion.V2, 1024, [])


def test_usage_reads_v1_and_v2_accounting() -> None:
    v1 = usage_from(CgroupVersion.V1, {
        "cpuacct.usage": "2500000000\n",
        "cpu.stat": "nr_periods 40\nnr_throttled 12\nthrottled_time 300000000\n",
        "memory.usage_in_bytes": "1048576\n", "memory.max_usage_in_bytes": "4194304\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    })
    assert (v1.cpu_s, v1.throttled_s, v1.throttled_periods) == (2.5, 0.3, 12)
    assert (v1.memory_bytes, v1.memory_peak_bytes, v1.oom_kills) == (2**20, 4 * 2**20, 2)
    v2 = usage_from(CgroupVersion.V2, {
        "cpu.stat": "usage_usec 1500000\nuser_usec 1000000\nnr_throttled 3\nthrottled_usec 250000\n",
        "memory.current": "2048\n", "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
    })
    assert (v2.cpu_s, v2.throttled_s, v2.throttled_periods, v2.oom_kills) == (1.5, 0.25, 3, 1)
    assert v2.memory_bytes == 2048 and v2.memory_peak_bytes is None  # kernels before 5.19 have no memory.peak
    assert parse_flat_keyed("a 1\nbroken\nb -2\n") == {"a": 1, "b": -2}


def test_cgroup_names_are_readable_and_unique_per_state_folder(tmp_path: Path) -> None:
    a, b = cgroup_name("donor-1", tmp_path / "a"), cgroup_name("donor-1", tmp_path / "b")
    assert a.startswith("dgpt-donor-1-") and a != b
    assert cgroup_name("my donor/../x", tmp_path) .startswith("dgpt-my_donor_.._x-")
    assert "/" not in cgroup_name("../../etc", tmp_path)


# ---------------------------------------------------------------- the real kernel


def _writable_layout() -> Layout | None:
    try:
        layout = host_layout()
    except ProtectionUnavailable:
        return None
    if os.geteuid() != 0 or not all(os.access(p.parent, os.W_OK) for p in (layout.cpu, layout.memory)):
        return None
    return layout


real = pytest.mark.skipif(_writable_layout() is None, reason="needs root and a writable cgroup filesystem")


@real
def test_a_real_cgroup_enforces_its_limits_and_accounts_its_processes(tmp_path: Path) -> None:
    # A fifth of a core against two spinning processes: demand exceeds the quota tenfold,
    # so even on a busy machine the quota, not the competition, sets the pace.
    group = WorkCgroup.create(cgroup_name("unit", tmp_path), 0.2, 256 * 2**20)
    try:
        assert group.limits() == (0.2, 256 * 2**20)  # read back from the kernel
        spin = ("import os, time\nos.fork()\nend = time.time() + 1.5\nwhile time.time() < end: pass\n")
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", spin], preexec_fn=group.join_self)
        assert proc.pid in group.pids()
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while group.pids() and time.monotonic() < deadline:  # the forked spinner ends on its own
            time.sleep(0.05)
        wall_s = time.monotonic() - started
        used = group.usage()
        assert used.cpu_s <= 0.2 * wall_s + 0.1, (used, wall_s)
        assert used.cpu_s >= 0.05 and used.throttled_periods > 0 and used.throttled_s > 0, used
        assert used.memory_peak_bytes and used.memory_peak_bytes > 2**20
    finally:
        assert group.remove()
    assert not any(d.exists() for d in group.dirs)


@real
def test_a_memory_overrun_is_killed_inside_the_cgroup(tmp_path: Path) -> None:
    group = WorkCgroup.create(cgroup_name("oom", tmp_path), 1, 96 * 2**20)
    try:
        hog = "b = bytearray()\nwhile True: b += b'x' * (8 << 20)\n"
        proc = subprocess.run([sys.executable, "-c", hog], preexec_fn=group.join_self, timeout=60)
        assert proc.returncode == -9  # SIGKILL from the OOM killer, not a Python MemoryError
        assert group.usage().oom_kills >= 1
    finally:
        group.remove()


@real
def test_taking_over_a_left_cgroup_kills_the_old_work(tmp_path: Path) -> None:
    name = cgroup_name("stale", tmp_path)
    first = WorkCgroup.create(name, 1, 128 * 2**20)
    orphan = subprocess.Popen(["sleep", "60"], preexec_fn=first.join_self)
    second = WorkCgroup.create(name, 1, 128 * 2**20)
    try:
        assert orphan.wait(10) == -9 and second.pids() == []
    finally:
        second.remove()


@real
def test_a_user_without_rights_gets_an_error_naming_the_path(tmp_path: Path) -> None:
    # Imports first: the interpreter may live where nobody cannot read (a root-only home).
    code = ("import os, sys\n"
            "from dgpt.donor.cgroups import WorkCgroup\n"
            "from dgpt.exceptions import ProtectionUnavailable\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n    WorkCgroup.create('dgpt-unit-noperm', 1, 2**30)\n"
            "except ProtectionUnavailable as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "permission denied (uid 65534)" in out.stdout, out.stdout + out.stderr
    assert "/sys/fs/cgroup" in out.stdout and "Delegate=yes" in out.stdout

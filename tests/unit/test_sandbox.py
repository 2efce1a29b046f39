"""The donor's sandbox: the mount plan and bwrap argv (pure), and real bubblewrap where installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgpt.donor import sandbox as sb
from dgpt.donor.sandbox import MountOp, SandboxSpec, bwrap_argv, mount_plan
from dgpt.exceptions import ProtectionUnavailable

P = Path


def _spec(**kw: object) -> SandboxSpec:
    base: dict[str, object] = {"scratch": P("/var/lib/dgpt/scratch"), "hidden": (P("/home"), P("/root"), P("/tmp"))}
    base.update(kw)
    return SandboxSpec(**base)  # type: ignore[arg-type]


def test_shallower_mounts_come_first_so_deeper_ones_land_on_top() -> None:
    spec = _spec(readable=(P("/root/.pyenv/versions/3.11"),), files=(P("/root/.dgpt/donor/ray_auth_token"),),
                 scratch=P("/root/.dgpt/donor/scratch"))
    plan = mount_plan(spec)
    dests = [op.dest for op in plan]
    assert dests.index(P("/root")) < dests.index(P("/root/.pyenv/versions/3.11"))
    assert dests.index(P("/root")) < dests.index(P("/root/.dgpt/donor/scratch"))
    assert MountOp("bind", P("/tmp"), P("/root/.dgpt/donor/scratch/tmp")) in plan  # the private /tmp
    assert MountOp("ro-bind", P("/root/.dgpt/donor/ray_auth_token"), P("/root/.dgpt/donor/ray_auth_token")) in plan


def test_a_hidden_folder_inside_one_bound_back_stays_hidden() -> None:
    # sys.path may hold a folder that contains the state folder (a script next to it).
    spec = _spec(readable=(P("/tmp/work"),), hidden=(P("/tmp"), P("/tmp/work/state")),
                 scratch=P("/tmp/work/state/scratch"))
    plan = mount_plan(spec)
    kinds = {op.dest: op.kind for op in plan}
    assert kinds[P("/tmp/work")] == "ro-bind" and kinds[P("/tmp/work/state")] == "tmpfs"
    assert kinds[P("/tmp/work/state/scratch")] == "bind"
    order = [op.dest for op in plan]
    assert order.index(P("/tmp/work")) < order.index(P("/tmp/work/state")) < order.index(P("/tmp/work/state/scratch"))


def test_redundant_mounts_are_left_out() -> None:
    spec = _spec(hidden=(P("/home"), P("/home/alice")), readable=(P("/usr/lib/python3"), P("/opt/venv")))
    plan = mount_plan(spec)
    assert P("/home/alice") not in [op.dest for op in plan]  # a tmpfs inside a tmpfs
    assert not [op for op in plan if op.dest in (P("/usr/lib/python3"), P("/opt/venv"))]  # already readable


def test_folders_leading_through_a_tmpfs_are_made_traversable() -> None:
    plan = mount_plan(_spec(readable=(P("/root/.pyenv/versions/3.11"),)))
    dirs = [op.dest for op in plan if op.kind == "dir"]
    assert dirs == [P("/root/.pyenv"), P("/root/.pyenv/versions")]
    argv = bwrap_argv(_spec(readable=(P("/root/.pyenv/versions/3.11"),)), ["true"])
    i = argv.index("/root/.pyenv")
    assert argv[i - 3:i] == ["--perms", "0755", "--dir"]


def test_argv_isolates_processes_drops_capabilities_and_runs_the_init() -> None:
    argv = bwrap_argv(_spec(uid=65534, gid=65534), ["ray", "start", "--block"], bwrap="/usr/bin/bwrap",
                      python="/venv/bin/python")
    assert argv[:4] == ["/usr/bin/bwrap", "--ro-bind", "/", "/"]
    for flag in ("--unshare-pid", "--unshare-ipc", "--as-pid-1"):
        assert flag in argv
    caps = [argv[i + 1] for i, a in enumerate(argv) if a in ("--cap-drop", "--cap-add")]
    assert caps == ["ALL", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"]
    sep = argv.index("--")
    assert argv[sep + 1:sep + 5] == ["/venv/bin/python", "-I", "-S", "-c"] and argv[sep + 5] == sb.INIT
    assert argv[sep + 6:] == ["65534", "65534", "--", "ray", "start", "--block"]
    assert argv[argv.index("HOME") + 1] == "/var/lib/dgpt/scratch/home"
    assert "--unshare-net" not in argv  # the raylet talks to the cluster


def test_argv_without_a_user_keeps_no_capability() -> None:
    argv = bwrap_argv(_spec(), ["true"])
    assert "--cap-add" not in argv and argv[-4:] == ["-1", "-1", "--", "true"]
    with pytest.raises(ValueError, match="command must not be empty"):
        bwrap_argv(_spec(), [])


def test_cgroup_views_and_gpu_devices_are_bound(tmp_path: Path) -> None:
    view = (P("/sys/fs/cgroup/memory/dgpt-x"), P("/sys/fs/cgroup/memory"))
    plan = mount_plan(_spec(views=(view,), devices=(P("/dev/nvidia0"),)))
    assert MountOp("ro-bind", P("/sys/fs/cgroup/memory"), P("/sys/fs/cgroup/memory/dgpt-x")) in plan
    assert MountOp("dev-bind", P("/dev/nvidia0"), P("/dev/nvidia0")) in plan
    (tmp_path / "dev").mkdir()
    for name in ("nvidia0", "nvidiactl", "null"):
        (tmp_path / "dev" / name).touch()
    assert sb.gpu_devices(tmp_path) == (tmp_path / "dev/nvidia0", tmp_path / "dev/nvidiactl")


def test_only_python_paths_under_hidden_folders_are_bound_back() -> None:
    paths = [P("/root/.pyenv/versions/3.11/lib"), P("/usr/lib/python3"), P("/home/al/venv")]
    assert sb.readable_under([P("/root"), P("/home")], paths) == (P("/home/al/venv"), P("/root/.pyenv/versions/3.11/lib"))
    found = sb.python_paths()
    assert P(sys.prefix) in found and P(os.path.realpath(sys.executable)).parent in found


def test_work_user_defaults_to_nobody_for_a_root_agent() -> None:
    if os.geteuid() != 0:
        assert sb.work_user() is None
        with pytest.raises(ProtectionUnavailable, match="needs the agent to run as root"):
            sb.work_user("nobody")
        return
    uid, _gid = sb.work_user() or (None, None)
    assert uid == 65534
    with pytest.raises(ProtectionUnavailable, match="does not exist") as err:
        sb.work_user("no-such-user-dgpt")
    assert err.value.hint and "useradd" in err.value.hint
    with pytest.raises(ProtectionUnavailable, match="is root"):
        sb.work_user("root")


def test_a_missing_bwrap_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProtectionUnavailable, match="not installed") as err:
        sb.find_bwrap()
    assert err.value.hint and "apt-get install bubblewrap" in err.value.hint


# ---------------------------------------------------------------- real bubblewrap

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0,
                                 reason="needs bubblewrap and root (to run the work as another user)")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """An owner's home with a file, a root-only file outside it, and a donor's scratch."""
    home = tmp_path / "owner-home"
    home.mkdir()
    (home / "diary.txt").write_text("private")
    # Outside every hidden folder (the sandbox hides /tmp, where tmp_path lies).
    visible = Path(tempfile.mkdtemp(prefix="dgpt-sandbox-test-", dir="/var/lib"))
    os.chmod(visible, 0o755)
    secret = visible / "root-only"
    secret.write_text("root's")
    os.chmod(secret, 0o600)
    try:
        yield {"home": home, "secret": secret, "scratch": tmp_path / "donor" / "scratch", "visible": visible}
    finally:
        shutil.rmtree(visible)


def _run(spec: SandboxSpec, code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    sb.prepare(spec)
    return subprocess.run(bwrap_argv(spec, [sys.executable, "-c", code]), capture_output=True, text=True,
                          timeout=60, **kw)  # type: ignore[call-overload]


def _world_spec(world: dict[str, Path]) -> SandboxSpec:
    uid, gid = sb.work_user() or (None, None)
    hidden = (world["home"], *(p for p in sb.DEFAULT_HIDDEN if p.exists() and p != P("/tmp")))
    return SandboxSpec(scratch=world["scratch"], hidden=hidden, uid=uid, gid=gid,
                       readable=sb.readable_under((*hidden, P("/tmp")), sb.python_paths()))  # as protection.py: /tmp is private too


@needs_bwrap
def test_the_work_cannot_see_the_owners_home_nor_read_roots_files(world: dict[str, Path]) -> None:
    probe = f"""
import errno, os
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
print("diary", attempt(lambda: open({str(world['home'] / 'diary.txt')!r}).read()))
print("home", os.listdir({str(world['home'])!r}))
print("secret", attempt(lambda: open({str(world['secret'])!r}).read()))
print("write-outside", attempt(lambda: open({str(world['visible'] / 'x')!r}, "w")))
print("write-scratch", attempt(lambda: open(os.environ["HOME"] + "/x", "w").write("x")))
print("shm", attempt(lambda: open("/dev/shm/plasma-probe", "w").write("x")), os.listdir("/dev/shm"))
print("uid", os.getuid(), "pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"""
    assert (world["home"] / "diary.txt").read_text() == "private"  # it is there, outside
    out = _run(_world_spec(world), probe)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["diary"] == "ENOENT" and lines["home"] == "[]"  # hidden, not merely refused
    assert lines["secret"] == "EACCES"  # visible, but the work is not root
    assert lines["write-outside"] == "EROFS"
    assert lines["write-scratch"] == "ok" and (world["scratch"] / "home" / "x").read_text() == "x"
    assert lines["shm"] == "ok ['plasma-probe']"  # Ray's object store: writable, and the sandbox's own
    assert not Path("/dev/shm/plasma-probe").exists()
    assert lines["uid"].startswith("65534 pids [1, 2]")  # the init and the probe: no owner process


@needs_bwrap
def test_sigterm_to_bwrap_reaches_the_command_and_nothing_outlives_the_sandbox(world: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    marker = world["scratch"] / "tmp" / "drained"
    code = f"""
import signal, subprocess, sys, time
subprocess.Popen(["sleep", "300"])  # a stray child the command never waits for
def drain(sig, frame):
    open({str(marker)!r}, "w").write("drained")
    sys.exit(3)
signal.signal(signal.SIGTERM, drain)
print("ready", flush=True)
time.sleep(60)
"""
    spec = _world_spec(world)
    sb.prepare(spec)
    proc = subprocess.Popen(bwrap_argv(spec, [sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    import psutil

    inside = psutil.Process(proc.pid).children(recursive=True)
    sleeper = [p for p in inside if p.name() == "sleep"]
    assert len(sleeper) == 1
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in inside) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "drained"  # the command's own SIGTERM handler ran
    assert not sleeper[0].is_running() or sleeper[0].status() == psutil.STATUS_ZOMBIE


@needs_bwrap
def test_the_commands_exit_status_comes_back(world: dict[str, Path]) -> None:
    assert _run(_world_spec(world), "import sys; sys.exit(7)").returncode == 7
    assert _run(_world_spec(world), "import os, signal; os.kill(os.getpid(), signal.SIGKILL)").returncode == 137


@needs_bwrap
def test_check_reports_what_bwrap_says(world: dict[str, Path]) -> None:
    spec = _world_spec(world)
    sb.prepare(spec)
    sb.check(spec, shutil.which("bwrap") or "bwrap")  # works here
    broken = SandboxSpec(scratch=spec.scratch, files=(world["scratch"] / "no-such-file",))
    with pytest.raises(ProtectionUnavailable, match="cannot build the sandbox here") as err:
        sb.check(broken, shutil.which("bwrap") or "bwrap")
    assert "no-such-file" in err.value.message  # bwrap's own line, naming the missing path

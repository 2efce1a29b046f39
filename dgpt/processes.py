"""Starting and stopping the process trees dgpt owns, by pid (never `ray stop`).

`ray stop` kills every Ray process on the host, other people's too; dgpt instead records the
pid of each process it starts and stops exactly that process and its descendants.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

# Ports dgpt picks for its own listeners: above Ray's worker ports (10002-19999) and below
# Linux's ephemeral range (32768+), which the OS hands to every outgoing connection and to
# every "port 0" bind. A port chosen there can be taken by anyone before its server binds it;
# here only another free_port() caller can collide, and a random pick makes that rare.
_PORT_RANGE = (20000, 32767)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, outside the OS's ephemeral range."""
    import random

    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            if not port_in_use(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: let the OS pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def spawn_detached(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start a process in its own session (it outlives the caller); returns its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    return proc.pid


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_at_once(procs: Iterable[psutil.Process]) -> None:
    """Kill ``procs`` the way a power cut does: all frozen first (SIGSTOP), then SIGKILLed,
    so none can react to another's death (a parent-death signal that starts a graceful
    shutdown, an agent that notices its raylet go). Processes gone already are skipped."""
    procs = list(procs)
    for op in ("suspend", "kill"):
        for proc in procs:
            try:
                getattr(proc, op)()
            except psutil.NoSuchProcess:
                pass


def stop_tree(pid: int, grace_s: float = 30.0, sig: int = signal.SIGTERM) -> list[int]:
    """Signal ``pid``, wait up to ``grace_s`` for it and its descendants, then SIGKILL the rest.

    Descendants are collected before signalling, so orphans re-parented to init are still
    found. Returns the pids that had to be killed.
    """
    return stop_trees([pid], grace_s, sig)


def stop_trees(pids: Iterable[int], grace_s: float = 30.0, sig: int = signal.SIGTERM) -> list[int]:
    """:func:`stop_tree` for several trees at once: one shared grace period, not one each."""
    roots = [p for pid in pids if (p := _process(pid)) is not None]
    procs = {p.pid: p for root in roots for p in tree(root.pid)}
    for root in roots:
        try:
            root.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    survivors = _wait_gone(list(procs.values()), grace_s)
    killed = []
    for proc in survivors:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    _wait_gone(survivors, 5)
    return killed


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _running(proc: psutil.Process) -> bool:
    try:
        # A zombie has exited; only its parent's wait() is missing (in containers PID 1
        # often never reaps orphans), so it counts as gone.
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    left = procs
    while True:
        for proc in left:
            try:
                proc.wait(timeout=0)  # reaps our own children
            except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
                pass
        left = [p for p in left if _running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def become_subreaper() -> None:
    """Adopt orphaned descendants so they are reaped here, not left as zombies.

    `ray start --block` may exit before its raylet; the orphan would go to PID 1, which in
    many containers never reaps. As a subreaper this process inherits it instead, and
    :func:`reap_orphans` (or :func:`stop_tree`) collects it.
    """
    import ctypes

    pr_set_child_subreaper = 36
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except OSError:  # not Linux: nothing to adopt
        pass


def reap_orphans(keep: Iterable[int] = ()) -> int:
    """Reap exited children other than ``keep`` (whose Popen objects reap them); returns how many."""
    kept = set(keep)
    reaped = 0
    for child in psutil.Process().children():
        if child.pid in kept:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
                reaped += 1
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return reaped


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is truthy or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def write_secret(path: Path, value: str) -> None:
    """Write a secret readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


# Looked up once, at import: a forked child may not import or dlopen (another thread may have
# held the import lock or malloc's at the fork; the child would hang before exec, and the
# parent's Popen with it).
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def raise_priority(nice: int) -> tuple[bool, str]:
    """Give this process the CPU priority ``nice`` (<= 0): (done, what happened, for the log).

    Lowering a nice value needs root or CAP_SYS_NICE; without either the process keeps its
    priority and the answer says so (it is not an error: the process works, less promptly
    when its machine is saturated).
    """
    if nice > 0:
        raise ValueError(f"raise_priority takes a nice value <= 0, got {nice}")
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= nice:
        return True, f"CPU priority nice {current}"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        return False, (f"CPU priority left at nice {current}: raising it to {nice} needs root or CAP_SYS_NICE "
                       "(set DGPT_CONTROL_PLANE_NICE=0 to stop asking)")
    return True, f"CPU priority nice {nice}"


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive this process: SIGTERM when it dies.

    Runs in the forked child before exec, so it makes one foreign call and nothing else.
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

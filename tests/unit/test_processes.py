"""Process helpers: a power cut (kill_at_once) leaves no process a moment to react."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from dgpt.processes import kill_at_once, tree

# A parent and a child that, told its parent died (PR_SET_PDEATHSIG -> SIGTERM), writes
# a marker: what a graceful shutdown on a parent's death would do.
CHILD = """
import ctypes, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("reacted"), sys.exit(0)))
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])"


def _family(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / "marker"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)])
    deadline = time.monotonic() + 30
    while not Path(str(marker) + ".ready").exists():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return parent, marker


def test_a_power_cut_gives_no_process_a_chance_to_react(tmp_path: Path) -> None:
    parent, marker = _family(tmp_path)
    procs = tree(parent.pid)
    assert len(procs) == 2
    kill_at_once(procs)
    parent.wait(10)
    psutil.wait_procs(procs[1:], timeout=10)
    time.sleep(0.3)
    assert not marker.exists(), "the child ran its shutdown handler"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def test_the_same_kill_one_by_one_lets_the_child_react(tmp_path: Path) -> None:
    # What the test above guards against: the parent dies first, the child hears of it.
    parent, marker = _family(tmp_path)
    procs = tree(parent.pid)
    procs[0].kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs[1:]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert marker.read_text() == "reacted"


def test_processes_already_gone_are_skipped_and_the_rest_still_die() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_proc = psutil.Process(gone.pid)
    gone.wait(10)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kill_at_once([gone_proc, psutil.Process(live.pid)])
    assert live.wait(10) == -9, "the live one was SIGKILLed although the first was gone"

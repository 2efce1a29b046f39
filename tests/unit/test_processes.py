"""Process helpers: a power cut (kill_at_once) leaves no process a moment to react."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dgpt.processes import kill_at_once, raise_priority, tree

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


# A process that asks for a raised priority, starts a thread after, and prints what each runs at.
PRIORITY = """
import os, sys, threading
from dgpt.processes import raise_priority
if len(sys.argv) > 2:
    os.setuid(int(sys.argv[2]))
done, said = raise_priority(int(sys.argv[1]))
seen = []
t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
t.start(); t.join()
print(done, os.getpriority(os.PRIO_PROCESS, 0), seen[0], said, sep="|")
"""


def _priority(nice: int, *as_uid: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PRIORITY, str(nice), *map(str, as_uid)], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip().split("|")


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a CPU priority needs root (CI runs as root)")
def test_a_raised_priority_holds_for_the_process_and_the_threads_it_starts_after() -> None:
    assert _priority(-5)[:3] == ["True", "-5", "-5"]


def test_without_the_right_to_raise_it_the_process_keeps_its_priority_and_says_why() -> None:
    done, now, thread, said = _priority(-5, *([65534] if os.geteuid() == 0 else []))
    assert (done, now, thread) == ("False", "0", "0")
    assert "CAP_SYS_NICE" in said and "DGPT_CONTROL_PLANE_NICE=0" in said
    with pytest.raises(ValueError, match="<= 0"):
        raise_priority(3)


def test_the_control_plane_priority_setting_is_checked_by_name() -> None:
    from pydantic import ValidationError

    from dgpt.config import Settings

    assert Settings().control_plane_nice == -10
    for bad in (1, -21):
        with pytest.raises(ValidationError, match="control_plane_nice"):
            Settings(control_plane_nice=bad)

"""Helpers for the training tests: run the example drivers, watch storage, find workers, churn donors.

Drivers run as separate processes with the fabric's exports, as a researcher's would.
What the tests observe comes from the system itself: the checkpoint store's folder on the
head's disk, Ray's actor table, and the run's progress actor (each read by a short driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dgpt.config import Settings
from dgpt.donor.agent import state_files
from dgpt.head import fabric
from dgpt.head.process import shell_env
from dgpt.processes import kill_at_once, read_json, tree
from dgpt.train.checkpoint import MANIFEST_NAME, parse_checkpoint_dir_name
from dgpt.train.storage import RUNS_PATH, store_root
from tests.integration.conftest import RAY_TEST_ENV, fabric_settings, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_digits.py"
PLAIN_EXAMPLE = REPO / "examples" / "train_digits_plain.py"
#: Held-out accuracy every finished run must reach (the model reaches ~0.98 in 300 steps).
MIN_ACCURACY = 0.95


def train_fabric(n_donors: int, prefix: str, settings: dict[str, Any] | None = None, **up: Any) -> Iterator[Settings]:
    """A fabric for one test module, whose workers import this checkout; stopped after it."""
    import tempfile

    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_TEST_ENV.items():
            mp.setenv(key, value)
        for key in [k for k in os.environ if k.startswith("DGPT_")] + ["RAY_ADDRESS"]:
            mp.delenv(key, raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        fab = fabric_settings(Path(tempfile.mkdtemp(prefix=prefix)), **(settings or {}))
        try:
            fabric.up(fab, n_donors, timeout_s=300, **up)
            yield fab
        finally:
            fabric.down(fab)


def driver_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **shell_env(settings)}


@dataclass
class Run:
    """A training driver running in the background."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    marker: str

    def result(self, timeout_s: float = 300) -> dict[str, Any]:
        """Wait for the driver to exit; its result line, parsed."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"run {self.name} did not finish in {timeout_s:.0f}s; log tail:\n{self.tail()}") from None
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith(self.marker + " "):
                return dict(json.loads(line.split(" ", 1)[1]))
        raise AssertionError(f"run {self.name} exited {self.proc.returncode} without a result:\n{self.tail()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-n:])


def start_run(settings: Settings, name: str, *args: str, plain: bool = False) -> Run:
    script, marker = (PLAIN_EXAMPLE, "PLAIN_TRAIN_RESULT") if plain else (EXAMPLE, "DGPT_TRAIN_RESULT")
    log = settings.home / "logs" / f"driver-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The tests watch checkpoints arrive in the head store's folder on its disk.
    extra = [] if plain else ["--events", "--checkpoints", "head"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), "--name", name, *extra, *args],
                                env=driver_env(settings), stdout=out, stderr=subprocess.STDOUT, cwd=settings.home)
    return Run(name, proc, log, marker)


def run_dir(settings: Settings, name: str) -> Path:
    """The run's folder in the head's checkpoint store, on the head's disk."""
    return store_root(settings) / RUNS_PATH / name


def checkpoint_dirs(folder: Path) -> dict[Path, int]:
    """Checkpoint folders under ``folder`` and their steps (committed or not)."""
    out = {}
    for p in folder.glob("step-*"):
        parsed = parse_checkpoint_dir_name(p.name)
        if parsed:
            out[p] = parsed[0]
    return out


def committed_steps(folder: Path) -> list[int]:
    return sorted(s for p, s in checkpoint_dirs(folder).items() if (p / MANIFEST_NAME).is_file())


def _driver_json(settings: Settings, code: str, timeout_s: float = 90) -> Any:
    prog = "import json, ray\nray.init(logging_level='ERROR', log_to_driver=False)\n" + code
    out = subprocess.run([sys.executable, "-c", prog], env=driver_env(settings), capture_output=True, text=True,
                         timeout=timeout_s)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("OUT "))
    return json.loads(line[4:])


def train_workers(settings: Settings) -> list[dict[str, Any]]:
    """Live Ray Train worker actors: their pid and the donor they run on (Ray's actor table)."""
    code = (
        "from ray.util.state import list_actors\n"
        "labels = {n['NodeID']: n.get('Labels', {}) for n in ray.nodes()}\n"
        "acts = list_actors(filters=[('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')], limit=100)\n"
        "print('OUT ' + json.dumps([{'pid': a.pid, 'donor_id': labels.get(a.node_id, {}).get('dgpt.io/donor-id')}"
        " for a in acts]))\n"
    )
    return list(_driver_json(settings, code))


def progress_events(settings: Settings, run: str) -> list[dict[str, Any]]:
    code = (
        "from dgpt.train.progress import read_progress\n"
        f"print('OUT ' + json.dumps(read_progress({run!r})))\n"
    )
    return list(_driver_json(settings, code))


def donor_ids(settings: Settings) -> dict[str, str]:
    """name -> donor id of the fabric's donors."""
    with fabric.api_client(settings) as client:
        return {d.name: d.donor_id for d in client.donors()}


def name_of(settings: Settings, donor_id: str) -> str:
    return next(n for n, i in donor_ids(settings).items() if i == donor_id)


def wait_active(settings: Settings, names: list[str], timeout_s: float = 180) -> None:
    def ready() -> bool:
        with fabric.api_client(settings) as client:
            by_name = {d.name: d for d in client.donors()}
        return all(by_name[n].state == "active" and by_name[n].node_id for n in names)
    wait_for(ready, timeout_s, f"donors {names} active")


def pause(settings: Settings, name: str) -> None:
    """The owner comes back: exactly what `dgpt donor pause` does (the agent drains through the head)."""
    state_files(settings.home / "donors" / name)["paused"].write_text(str(time.time()))


def resume(settings: Settings, name: str) -> None:
    state_files(settings.home / "donors" / name)["paused"].unlink(missing_ok=True)


def _agent_pid(settings: Settings, name: str) -> int:
    return int((read_json(state_files(settings.home / "donors" / name)["pid"]) or {})["pid"])


def kill_donor(settings: Settings, name: str) -> None:
    """SIGKILL the donor's agent, `ray start`, raylet and workers: it vanishes, no drain."""
    kill_at_once(tree(_agent_pid(settings, name)))


def host_pid(settings: Settings, name: str, pid: int) -> int:
    """The host's pid of donor ``name``'s process that sees itself as ``pid`` (its sandbox has
    its own PID namespace; without one the two are the same)."""
    for proc in tree(_agent_pid(settings, name)):
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("NSpid:")), f"NSpid:\t{proc.pid}")
        if int(line.split()[-1]) == pid:
            return proc.pid
    raise AssertionError(f"no process of {name} has pid {pid} in its namespace")


def restart_when_gone(settings: Settings, name: str) -> None:
    """Start a killed donor's agent again once the old one is gone; it rejoins with its donor id."""
    entry = next(d for d in (read_json(settings.home / "fabric.json") or {})["donors"] if d["name"] == name)
    wait_for(lambda: not _alive(int(entry["pid"])), 30, f"{name}'s agent to exit")
    fabric.restart_donor(settings, name)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attempt, in order: its world size, resume step and the donors its workers ran on."""
    out = {e["attempt"]: {"t": e["t"], "world_size": e["world_size"], "resume_step": e["resume_step"],
                          "donors": set()} for e in events if e["ev"] == "attempt"}
    for e in events:  # a rank may log itself a moment before rank 0 logs the attempt
        if e["ev"] == "worker" and e["attempt"] in out:
            out[e["attempt"]]["donors"].add(e["donor_id"])
    return sorted(out.values(), key=lambda a: a["t"])

"""Training through donor churn on a real local fabric: `dgpt up --donors 3`, one raylet per donor.

Every test runs the digits example (or its plain Ray Train twin) as its own driver, takes a
donor away mid-run the way a donor's owner or a crash would, and checks from the system's
own records (progress log, checkpoint store on the head's disk, Ray's actor table) that
the run resumed where it should and finished with a model that works. A donor taken away
is brought back at the end of its test; the next test waits for it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dgpt.config import Settings
from dgpt.exceptions import CheckpointCorrupt
from dgpt.train.checkpoint import MANIFEST_NAME, read_checkpoint
from tests.integration.conftest import wait_for
from tests.integration.train_support import (
    MIN_ACCURACY,
    attempts,
    checkpoint_dirs,
    committed_steps,
    donor_ids,
    host_pid,
    kill_donor,
    name_of,
    pause,
    progress_events,
    restart_when_gone,
    resume,
    run_dir,
    start_run,
    train_fabric,
    train_workers,
    wait_active,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DONORS = ["donor-1", "donor-2", "donor-3"]
STEPS = "200"
#: Long enough for a JIT checkpoint (about a second), short enough that the plain run,
#: which restarts only once the deadline passes, stays short.
DRAIN_DEADLINE_S = 8.0


@pytest.fixture(scope="module")
def churn_fabric() -> Iterator[Settings]:
    shared = Path(tempfile.mkdtemp(prefix="dgpt-it-train-shared-"))
    shared.chmod(0o777)  # a root agent's work runs as nobody
    try:
        yield from train_fabric(3, "dgpt-it-train-", settings={"drain_deadline_s": DRAIN_DEADLINE_S,
                                                               "sandbox_shared": str(shared)})
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def fabric3(churn_fabric: Settings) -> Settings:
    """The module's fabric with all three donors active (a previous test may be bringing one back)."""
    wait_active(churn_fabric, DONORS)
    return churn_fabric


def test_a_paused_donor_gets_a_jit_checkpoint_and_the_run_finishes_on_the_others(fabric3: Settings) -> None:
    # No failure budget at all: the drain must be charged to the preemption budget.
    # Every checkpoint kept, so the JIT one is still on disk to check at the end.
    run = start_run(fabric3, "jit", "--workers", "1", "3", "--steps", STEPS, "--checkpoint-every", "50",
                    "--checkpoints-to-keep", "100", "--max-failures", "0", "--max-preemption-failures", "1")
    folder = run_dir(fabric3, "jit")
    wait_for(lambda: committed_steps(folder), 120, "the first periodic checkpoint")
    victim = "donor-2"
    pause(fabric3, victim)
    try:
        result = run.result()
    finally:
        resume(fabric3, victim)
    assert result["ok"], result["error"]
    assert result["return"]["accuracy"] >= MIN_ACCURACY
    (drain,) = result["interruptions"]
    assert drain["cause"] == "drain"
    assert drain["jit_step"] == drain["last_step"] == drain["resumed_from"], "resumed from the JIT checkpoint"
    assert drain["lost_steps"] <= 1, "a graceful drain costs at most the step in flight"
    assert drain["jit_step"] in committed_steps(folder)
    first, second = attempts(result["events"])
    gone = donor_ids(fabric3)[victim]
    assert gone in first["donors"] and gone not in second["donors"]
    assert second["world_size"] == 2 and second["resume_step"] == drain["jit_step"]


def test_a_sigkilled_donor_resumes_from_the_last_periodic_checkpoint(fabric3: Settings) -> None:
    every = 50
    # No preemption budget: a vanished donor is a failure (max_failures), not a preemption.
    run = start_run(fabric3, "vanish", "--workers", "1", "3", "--steps", STEPS, "--checkpoint-every", str(every),
                    "--max-failures", "1", "--max-preemption-failures", "0")
    folder = run_dir(fabric3, "vanish")
    wait_for(lambda: len(committed_steps(folder)) >= 2, 120, "two periodic checkpoints")
    victim = "donor-3"
    kill_donor(fabric3, victim)
    try:
        result = run.result()
    finally:
        restart_when_gone(fabric3, victim)
    assert result["ok"], result["error"]
    assert result["return"]["accuracy"] >= MIN_ACCURACY
    (lost,) = result["interruptions"]
    assert lost["cause"] == "failure"
    written = [e["step"] for e in result["events"] if e["ev"] == "checkpoint" and e["t"] < lost["ended_at"]]
    assert lost["resumed_from"] == max(written), "resumed from the last checkpoint written before the kill"
    assert 0 <= lost["last_step"] - lost["resumed_from"] <= every, "at most one checkpoint interval lost"
    first, second = attempts(result["events"])
    assert donor_ids(fabric3)[victim] not in second["donors"]


def test_a_half_written_checkpoint_is_never_loaded(fabric3: Settings) -> None:
    run = start_run(fabric3, "torn", "--workers", "1", "3", "--steps", STEPS, "--checkpoint-every", "50",
                    "--write-pause-at", "100", "--write-pause-s", "120")
    folder = run_dir(fabric3, "torn")

    def torn() -> list:
        return [p for p, s in checkpoint_dirs(folder).items()
                if s == 100 and (p / "model.pt").is_file() and not (p / MANIFEST_NAME).exists()]

    (partial,) = wait_for(torn, 120, "rank 0 to stop midway through the checkpoint of step 100")
    (rank0,) = [e for e in progress_events(fabric3, "torn") if e["ev"] == "worker" and e["rank"] == 0]
    worker = next(w for w in train_workers(fabric3) if w["pid"] == rank0["pid"])
    # Ray reports the pid the worker sees: in the donor's sandbox, one of its own PID namespace.
    os.kill(host_pid(fabric3, name_of(fabric3, worker["donor_id"]), worker["pid"]), signal.SIGKILL)  # the writer
    # dies with the checkpoint half written
    result = run.result()
    assert result["ok"], result["error"]
    assert result["return"]["accuracy"] >= MIN_ACCURACY
    (crash,) = result["interruptions"]
    assert crash["resumed_from"] == 50, "resumed from the last committed checkpoint, not the torn one"
    assert (partial / "model.pt").is_file() and not (partial / MANIFEST_NAME).exists()
    with pytest.raises(CheckpointCorrupt, match="never committed"):
        read_checkpoint(pafs.LocalFileSystem(), str(partial))
    snapshot = (folder / "checkpoint_manager_snapshot.json").read_text()
    assert partial.name not in snapshot, "Ray Train never registered the torn folder"
    assert 100 in committed_steps(folder), "step 100 was written again, whole, after the resume"
    assert name_of(fabric3, worker["donor_id"]) in DONORS


def test_a_plain_ray_train_script_survives_a_drain(fabric3: Settings) -> None:
    # The one folder every donor's sandbox lets the work write (DGPT_SANDBOX_SHARED), as a
    # shared mount would be on separate machines.
    storage = Path(fabric3.sandbox_shared or fabric3.home) / "plain-results"
    # Ray Train's controller runs on the head (as root, unsandboxed) and makes the run's
    # folder; the workers (nobody, in the sandbox) write checkpoints into it.
    (storage / "plain").mkdir(parents=True)
    (storage / "plain").chmod(0o777)
    # Long enough that the drain deadline passes mid-run (a run that ends first just finishes).
    run = start_run(fabric3, "plain", "--workers", "2", "--steps", "600", "--checkpoint-every", "50",
                    "--storage-path", str(storage), plain=True)
    folder = storage / "plain"
    wait_for(lambda: list(folder.glob("checkpoint_*")), 120, "the plain run's first checkpoint")
    hosts = {w["donor_id"] for w in train_workers(fabric3)}
    assert len(hosts) == 2, f"two workers on two donors (STRICT_SPREAD), got {hosts}"
    victim = name_of(fabric3, sorted(hosts)[0])
    pause(fabric3, victim)
    try:
        result = run.result()
    finally:
        resume(fabric3, victim)
    assert result["ok"], result["error"]
    assert result["return"]["accuracy"] >= MIN_ACCURACY and result["return"]["step"] == 600
    # Ray Train's own preemption handling saw the drain (its controller logs to the driver).
    assert "interrupted by node preemption" in run.output()

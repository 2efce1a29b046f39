"""`dgpt demo`: a local fabric, a real torch job on every donor, a donor's owner coming back.

Steps: `dgpt up` with donors of different classes; `ray job submit` of a plain Ray program
(``dgpt.cli.demo_job``) whose tasks train on every donor; one donor paused mid-job (its owner
"comes back"), drained through DrainNode; the job completes on the others; inference on
donors; a Ray Data pipeline over the donors' storage tier (``dgpt.cli.demo_storage``); a
summary table; `dgpt down`. Everything the demo started is stopped, even on Ctrl-C or an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dgpt.cli.progress import stage_progress
from dgpt.config import Settings
from dgpt.exceptions import DgptError, FabricError
from dgpt.head import fabric
from dgpt.head.process import shell_env
from dgpt.processes import free_port

DEMO_TASKS = 36
DEMO_TASK_SECONDS = 2.0
# The donor whose owner comes back mid-job: the desktop (donor-2), a donor with work on it.
PAUSED_DONOR = "donor-2"
JOB_TIMEOUT_S = 240.0


@dataclass
class JobProgress:
    """What the demo learned from the job's log lines."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    def read(self, logs: str) -> None:
        self.tasks = [json.loads(line.split(" ", 1)[1]) for line in logs.splitlines() if line.startswith("DGPT_TASK ")]
        final = [line for line in logs.splitlines() if line.startswith("DGPT_RESULT ")]
        self.result = json.loads(final[-1].split(" ", 1)[1]) if final else None


def demo_settings(settings: Settings) -> Settings:
    """The demo's own state folder and free ports: it never clashes with a fabric already running."""
    return settings.model_copy(update={
        "home": settings.home / "demo", "node_ip": settings.node_ip or "127.0.0.1",
        "ray_port": free_port(), "dashboard_port": free_port(), "http_port": free_port(), "api_port": free_port(),
        "metrics_port": free_port(),
    })


def submit_with_ray_cli(settings: Settings, submission_id: str) -> None:
    """`ray job submit --no-wait -- python -m dgpt.cli.demo_job`, exactly as a researcher would."""
    env = shell_env(settings)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    argv = [ray_bin, "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--no-wait",
            "--submission-id", submission_id, "--entrypoint-num-cpus", "0", "--",
            "python", "-m", "dgpt.cli.demo_job", "--tasks", str(DEMO_TASKS), "--seconds", str(DEMO_TASK_SECONDS)]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise FabricError(f"`ray job submit` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}",
                          hint=f"see the head's logs in {settings.home / 'logs'}")


def run_demo(settings: Settings, n_donors: int, console: Console) -> int:
    """Run the demo; returns the process exit code (0 when every step held)."""
    settings = demo_settings(settings)
    # Ray reads its auth settings once, when first imported: set them before anything imports it.
    env = shell_env(settings)
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
    started = time.monotonic()
    try:
        console.print(f"[bold]1/6[/] dgpt up: a head and {n_donors} simulated donors, each its own raylet")
        with stage_progress(console, "bringing the fabric up") as say:
            fabric.up(settings, n_donors, progress=say)
        console.print("[bold]2/6[/] ray job submit: torch training tasks on every donor; "
                      f"{PAUSED_DONOR}'s owner comes back mid-job")
        with stage_progress(console, "submitting the job") as say:
            outcome = _run_job(settings, say, console)
        console.print("[bold]3/6[/] inference: the digits classifier on donors, over HTTP")
        from dgpt.cli.demo_serve import run_inference_step

        outcome["serve"] = run_inference_step(settings, console)
        console.print("[bold]4/6[/] Ray Data over dgpt://: Parquet on the donors' disks, transformed and "
                      "aggregated on the donors, checked against local files")
        from dgpt.cli.demo_storage import run_storage_step

        outcome["storage"] = run_storage_step(settings, console)
        console.print("[bold]5/6[/] summary")
        _print_summary(settings, outcome, console)
        ok = _verdict(outcome, console)
    except DgptError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        ok = False
    finally:
        console.print("[bold]6/6[/] dgpt down: draining donors, stopping the head")
        with stage_progress(console, "stopping") as say:
            fabric.down(settings, progress=say)
    console.print(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s; "
                  f"no process of it is left running. State and logs: {settings.home}")
    return 0 if ok else 1


def _run_job(settings: Settings, say: Callable[[str, float], None], console: Console) -> dict[str, Any]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from dgpt.donor.agent import find_state_dir, state_files

    env = shell_env(settings)
    submission_id = f"dgpt-demo-{int(time.time())}"
    submit_with_ray_cli(settings, submission_id)
    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    job = JobProgress()
    paused_at: float | None = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = jobs.get_job_status(submission_id)
        job.read(jobs.get_job_logs(submission_id))
        by_donor = _count(job.tasks)
        say(f"job {status}: {len(job.tasks)}/{DEMO_TASKS} tasks done; per donor "
            + " ".join(f"{d}:{n}" for d, n in sorted(by_donor.items())), len(job.tasks) / DEMO_TASKS)
        if paused_at is None and len(job.tasks) >= DEMO_TASKS // 3:
            # The desktop's owner comes back: exactly what `dgpt donor pause --donor-id donor-2` does.
            files = state_files(find_state_dir(settings.home, PAUSED_DONOR))
            files["paused"].write_text(str(time.time()))
            paused_at = time.time()
            console.print(f"[yellow]owner of {PAUSED_DONOR} is back[/]: pausing it mid-job "
                          f"(drain through DrainNode, deadline {settings.drain_deadline_s:g}s)")
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            jobs.stop_job(submission_id)
            raise FabricError(f"the demo job did not finish within {JOB_TIMEOUT_S:.0f}s",
                              hint=f"see `ray job logs {submission_id}` and {settings.home / 'logs'}")
        time.sleep(1.0)
    # The paused donor's session must end as drained; give the drain its deadline.
    client = fabric.api_client(settings)
    drain_wait = time.monotonic() + settings.drain_deadline_s + 30
    with client:
        while True:
            donors = client.donors()
            paused = next(d for d in donors if d.name == PAUSED_DONOR)
            if (paused.sessions and paused.sessions[-1].ended_as) or time.monotonic() > drain_wait:
                break
            time.sleep(1.0)
    return {"status": str(status.value if hasattr(status, "value") else status), "job": job,
            "paused_at": paused_at, "donors": donors, "submission_id": submission_id}


def _count(tasks: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tasks:
        out[t["donor_id"]] = out.get(t["donor_id"], 0) + 1
    return out


def _print_summary(settings: Settings, outcome: dict[str, Any], console: Console) -> None:
    job: JobProgress = outcome["job"]
    paused_at = outcome["paused_at"] or float("inf")
    table = Table(title=f"dgpt demo: job {outcome['submission_id']} {outcome['status']}")
    for col in ("donor", "name", "class", "owner", "state", "sessions", "tasks before pause", "tasks after pause"):
        table.add_column(col)
    for d in outcome["donors"]:
        mine = [t for t in job.tasks if t["donor_id"] == d.donor_id]
        before = sum(1 for t in mine if t["finished_at"] < paused_at)
        sessions = ", ".join(s.ended_as or "open" for s in d.sessions) or "-"
        table.add_row(d.donor_id, d.name, d.device_class, d.owner, d.state + (" (owner back)" if d.owner_active else ""),
                      sessions, str(before), str(len(mine) - before))
    console.print(table)
    if job.tasks:
        first = sum(t["loss_first"] for t in job.tasks) / len(job.tasks)
        last = sum(t["loss_last"] for t in job.tasks) / len(job.tasks)
        console.print(f"torch: {sum(t['steps'] for t in job.tasks)} SGD steps in {len(job.tasks)} tasks; "
                      f"mean loss {first:.3f} -> {last:.3f}")


def _verdict(outcome: dict[str, Any], console: Console) -> bool:
    job: JobProgress = outcome["job"]
    donors = outcome["donors"]
    paused = next(d for d in donors if d.name == PAUSED_DONOR)
    paused_at = outcome["paused_at"] or float("inf")
    checks = {
        "job succeeded": outcome["status"] == "SUCCEEDED" and job.result is not None,
        "every donor ran tasks": all(any(t["donor_id"] == d.donor_id for t in job.tasks) for d in donors),
        f"{PAUSED_DONOR}'s session ended drained": bool(paused.sessions) and paused.sessions[-1].ended_as == "drained",
        "the job went on without it": any(t["finished_at"] > paused_at and t["donor_id"] != paused.donor_id
                                          for t in job.tasks),
        "inference answered every request": outcome["serve"]["failed_requests"] == 0,
        "predictions are real (>90% right on held-out digits)": outcome["serve"]["accuracy"] > 0.9,
        "Ray Data over dgpt:// matched the same pipeline on local files": bool(outcome["storage"]["matched"]),
    }
    for name, held in checks.items():
        console.print(f"  {'[green]ok[/]' if held else '[red]NO[/]'}  {name}")
    return all(checks.values())

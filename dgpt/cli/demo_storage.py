"""The demo's storage step: a Ray Data pipeline over the donors' storage tier, checked against local files.

It submits :mod:`dgpt.storage.pipeline` as a Ray job (as a researcher would): a small Parquet
dataset written to ``dgpt://demo/pipeline`` (its pieces spread over the donors' disks), read
back with ``ray.data.read_parquet(..., filesystem=DonorFileSystem())``, transformed and
aggregated on the donors, the results written back to ``dgpt://`` and compared with the same
computation on a local copy (in the driver: sandboxed donors cannot read the owner's folders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from dgpt.cli.progress import stage_progress
from dgpt.config import Settings
from dgpt.exceptions import FabricError
from dgpt.head.process import shell_env

#: A short run: big enough to span several segments per file, small enough for a laptop.
DEMO_MB = 24
DEMO_FILES = 4
STEP_TIMEOUT_S = 300.0


def run_storage_step(settings: Settings, console: Console) -> dict[str, Any]:
    """Run the pipeline job; returns its ``DGPT_PIPELINE`` report.

    Raises:
        FabricError: the job could not be submitted, failed, or did not report in time.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = shell_env(settings)
    submission_id = f"dgpt-demo-storage-{int(time.time())}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    argv = [ray_bin, "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--no-wait",
            "--submission-id", submission_id, "--entrypoint-num-cpus", "0", "--",
            "python", "-m", "dgpt.storage.pipeline", "--mb", str(DEMO_MB), "--files", str(DEMO_FILES),
            "--prefix", "demo/pipeline", "--local-dir", str(settings.home / "pipeline-local"),
            # Sandboxed donors cannot see the owner's folders: the baseline runs in the driver.
            "--baseline", "driver"]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise FabricError(f"`ray job submit` of the storage pipeline failed: {proc.stderr.strip()[-800:]}")
    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    deadline = time.monotonic() + STEP_TIMEOUT_S
    with stage_progress(console, "Ray Data over dgpt://") as say:
        while True:
            status = jobs.get_job_status(submission_id)
            say(f"pipeline job {status}", 0.5)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if time.monotonic() > deadline:
                jobs.stop_job(submission_id)
                raise FabricError(f"the storage pipeline did not finish within {STEP_TIMEOUT_S:.0f}s",
                                  hint=f"see `ray job logs {submission_id}`")
            time.sleep(1.0)
    logs = jobs.get_job_logs(submission_id)
    line = next((ln for ln in logs.splitlines() if ln.startswith("DGPT_PIPELINE ")), None)
    if line is None:
        raise FabricError(f"the storage pipeline ended {status} without a report", hint=f"its log ends:\n{logs[-1500:]}")
    report: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    console.print(f"Ray Data: {report['rows']:,} rows ({report['bytes'] / 1e6:.0f} MB of Parquet) on dgpt:// in "
                  f"{report['dgpt_s']:.1f}s; rows per donor "
                  + ", ".join(f"{d}: {n:,}" for d, n in sorted(report["donors"].items()))
                  + f"; results {'match' if report['matched'] else 'DIFFER from'} the same computation on the local copy")
    return report

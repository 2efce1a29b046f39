"""The demo's training step: an elastic digits run on the donors, one donor's owner comes back mid-run.

:func:`run_training_step` takes a running local fabric's settings and a progress callback:
it starts ``examples/train_digits.py`` as a driver (3 workers, one per donor), pauses a
donor once the run has committed its first checkpoint (its owner is back: the agent drains
it through DrainNode with reason PREEMPTION), and waits for the run to finish on the
others. The run takes a just-in-time checkpoint when the drain is noticed, vacates the
donor, and resumes from that checkpoint on the remaining donors. The donor is resumed at
the end. About 40 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgpt.config import Settings
from dgpt.donor.agent import state_files
from dgpt.exceptions import TrainError
from dgpt.head.process import shell_env
from dgpt.train.checkpoint import MANIFEST_NAME, parse_checkpoint_dir_name
from dgpt.train.storage import RUNS_PATH, store_root

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"
DEMO_STEPS = 300
DEMO_CHECKPOINT_EVERY = 100
# The donor whose owner comes back: the desktop, which hosts a worker.
PAUSED_DONOR = "donor-2"
TIMEOUT_S = 240.0


def _committed(folder: Path) -> list[int]:
    steps = []
    for p in folder.glob("step-*"):
        parsed = parse_checkpoint_dir_name(p.name)
        if parsed and (p / MANIFEST_NAME).is_file():
            steps.append(parsed[0])
    return sorted(steps)


def run_training_step(settings: Settings, say: Callable[[str, float], None],
                      paused_donor: str = PAUSED_DONOR) -> dict[str, Any]:
    """Run the elastic training demo on a running local fabric; returns what happened.

    Returns:
        ``ok``, ``accuracy``, ``paused`` (donor name), ``interruption`` (the drain: steps
        lost, JIT step, recovery seconds, workers before/after), ``wall_s``.

    Raises:
        TrainError: the example is missing, or the run failed or did not finish in time.
    """
    if not EXAMPLE.is_file():
        raise TrainError(f"{EXAMPLE} is missing", hint="run the demo from a dgpt checkout (`make demo`)")
    name = f"demo-train-{int(time.time())}"
    log = settings.home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **shell_env(settings)}
    argv = [sys.executable, str(EXAMPLE), "--name", name, "--workers", "1", "3", "--steps", str(DEMO_STEPS),
            "--checkpoint-every", str(DEMO_CHECKPOINT_EVERY), "--horizon-s", "600",
            # The demo watches the checkpoints arrive in the head's folder.
            "--checkpoints", "head"]
    folder = store_root(settings) / RUNS_PATH / name
    paused_file = state_files(settings.home / "donors" / paused_donor)["paused"]
    started = time.monotonic()
    paused_at: float | None = None
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=settings.home)
    try:
        while proc.poll() is None:
            steps = _committed(folder)
            done = max(steps, default=0)
            if paused_at is None and steps:
                paused_file.write_text(str(time.time()))
                paused_at = time.monotonic()
                say(f"checkpoint at step {done}; owner of {paused_donor} is back: draining it mid-run", 0.3)
            elif paused_at is None:
                say("starting 3 training workers, one per donor", 0.1)
            else:
                say(f"training on without {paused_donor}: committed step {done}/{DEMO_STEPS}",
                    0.3 + 0.7 * done / DEMO_STEPS)
            if time.monotonic() - started > TIMEOUT_S:
                proc.kill()
                raise TrainError(f"the training demo did not finish within {TIMEOUT_S:.0f}s", hint=f"see {log}")
            time.sleep(0.5)
    finally:
        paused_file.unlink(missing_ok=True)
    result = next((json.loads(line.split(" ", 1)[1]) for line in log.read_text(errors="replace").splitlines()
                   if line.startswith("DGPT_TRAIN_RESULT ")), None)
    if result is None or not result["ok"]:
        why = result["error"] if result else f"exit code {proc.returncode}"
        raise TrainError(f"the training demo failed: {why}", hint=f"see {log}")
    drains = [i for i in result["interruptions"] if i["cause"] == "drain"]
    say("training finished", 1.0)
    return {
        "ok": True, "name": name, "accuracy": result["return"]["accuracy"], "paused": paused_donor,
        "steps": result["final_step"], "wall_s": result["wall_s"], "lost_steps": result["lost_steps"],
        "interruption": drains[0] if drains else None, "attempts": result["attempts"], "log": str(log),
    }


def describe(outcome: dict[str, Any]) -> list[str]:
    """Lines for the demo's summary."""
    lines = [f"digits CNN: {outcome['steps']} steps in {outcome['wall_s']:.0f}s, held-out accuracy "
             f"{outcome['accuracy']:.3f}, {outcome['attempts']} worker groups"]
    i = outcome.get("interruption")
    if i:
        lines.append(f"{outcome['paused']} drained: JIT checkpoint at step {i['jit_step']}, resumed there on "
                     f"{i['world_size_after']} of {i['world_size_before']} workers after {i['recovery_s']:.1f}s, "
                     f"{i['lost_steps']} steps lost")
    return lines

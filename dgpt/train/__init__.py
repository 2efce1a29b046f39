"""Training on donors: elastic, checkpointing Ray Train runs that survive donors leaving.

A thin layer over Ray Train 2.60 (``TorchTrainer`` and friends stay the user's):

    import dgpt.train
    from ray.train.torch import TorchTrainer

    plan = dgpt.train.configure("digits", workers=(1, 3), horizon_s=1800)
    trainer = TorchTrainer(loop, scaling_config=plan.scaling_config(), run_config=plan.run_config())

and, inside ``loop``, on every rank::

    ckpt = dgpt.train.Checkpointer(every_steps=50)
    state = ckpt.restore()                      # latest checkpoint that verifies, or None
    for step in range(state.step if state else 0, total):
        ...
        ckpt.step_done(step + 1, save=lambda: {"model.pt": ...})   # periodic + JIT on drains

Modules: ``plan`` (spec -> Ray Train configs), ``bounds``, ``budgets`` and ``placement``
(pure policies), ``checkpoint`` (names, manifest, atomic commit), ``storage`` (the head's
checkpoint store as a pyarrow filesystem), ``session`` (the in-loop checkpointer),
``progress`` (the run's event log and goodput), ``coordinator`` (the donor-aware autoscaling
coordinator the head runs for Ray Train), ``live`` (the fleet from the registry).
``session`` imports Ray Train, so it loads on first use of its names.
"""

from __future__ import annotations

from typing import Any

from dgpt.train.live import configure
from dgpt.train.plan import TrainPlan, TrainSpec
from dgpt.train.progress import RunSummary, open_progress, read_progress, summarize
from dgpt.train.storage import as_pyarrow_filesystem, head_filesystem

__all__ = [
    "Checkpointer",
    "DonorDrained",
    "RunSummary",
    "TrainPlan",
    "TrainSpec",
    "as_pyarrow_filesystem",
    "configure",
    "head_filesystem",
    "open_progress",
    "read_progress",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name in ("Checkpointer", "DonorDrained"):
        from dgpt.train import session

        return getattr(session, name)
    raise AttributeError(f"module 'dgpt.train' has no attribute {name!r}")

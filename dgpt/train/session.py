"""Inside the train loop: periodic and just-in-time checkpoints, verified restore, vacating drained donors.

Every rank calls :meth:`Checkpointer.step_done` once per step. It

1. asks Ray Train whether a node of this worker group is being drained
   (``ray.train.get_preemption_info()``, fed by Ray's preemption watcher, which polls the
   GCS for DrainNode requests; the call is a barrier that returns rank 0's view, so every
   rank decides the same);
2. on a drain: writes a checkpoint of the step just finished (a JIT checkpoint; no step is
   lost), reports it, then raises :class:`DonorDrained` on every rank. The workers vacate
   at once instead of training on until the drain deadline (work that would be lost
   anyway), so the donor is free within about a second of the checkpoint and the run
   restarts on the remaining donors right away;
3. otherwise, every ``every_steps`` steps, writes a periodic checkpoint (what a donor
   that vanishes without a drain costs: at most one interval).

:class:`DonorDrained` is a ``RayActorError`` with ``preempted=True``: Ray Train 2.60
classifies a worker error as a preemption by exactly that flag
(``worker_group/poll.py: _is_preempted_actor``), so the restart is charged to
``FailureConfig.max_preemption_failures``, not to ``max_failures``, and the controller
restarts at once (``controller.py: _handle_preempting_state``) instead of waiting out the
drain deadline.

Checkpoints are written straight into the run's storage by rank 0 with the commit
protocol of :mod:`dgpt.train.checkpoint` (files, then the manifest) and reported with
``checkpoint_upload_mode=NO_UPLOAD``; :meth:`Checkpointer.restore` loads the newest
checkpoint folder of the run whose manifest verifies, so a half-written checkpoint is
never loaded and a committed one is never skipped.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
import ray.train
import ray.train.collective
from ray.exceptions import RayActorError

from dgpt import contract
from dgpt.exceptions import CheckpointCorrupt, TrainError
from dgpt.train.checkpoint import (
    CheckpointKind,
    LoadedCheckpoint,
    checkpoint_dir_name,
    parse_checkpoint_dir_name,
    read_checkpoint,
    write_checkpoint,
)
from dgpt.train.progress import find_progress

log = logging.getLogger("dgpt.train")

#: Steps timed after a (re)start before the drain-check interval is fixed.
PROBE_STEPS = 6
#: Aim for one drain check per this many seconds of training: a quarter of the watcher's
#: 1 s poll, so a drain is acted on within ~1.25 s of the GCS knowing it.
CHECK_PERIOD_S = 0.25
#: Never fewer checks than one per this many steps (very fast steps still see a drain soon).
MAX_CHECK_EVERY = 100


class DonorDrained(RayActorError):
    """This worker left its training step because a donor of the worker group is draining.

    Raised after the JIT checkpoint is committed; Ray Train counts it as a preemption.
    """

    def __init__(self, message: str = "a donor of this worker group is draining; checkpoint taken") -> None:
        super().__init__(error_msg=message, preempted=True)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (DonorDrained, (self.message,))


class Checkpointer:
    """Periodic and just-in-time checkpoints for one worker of a Ray Train run.

    Args:
        every_steps: periodic checkpoint interval in steps (what a vanished donor costs).
        check_every_steps: how often to ask whether a donor drains (the same on every rank;
            each check is a barrier through Ray Train's synchronization actor, a few ms).
            None (the default) picks it from the measured step time so a check happens
            about every ``CHECK_PERIOD_S``: Ray's watcher only learns of drains once a
            second, so checking more often buys nothing.
        after_file: called with each checkpoint file's name once it is written, before the
            next one (progress reporting; tests use it to stop a writer midway).
    """

    def __init__(self, every_steps: int, *, check_every_steps: int | None = None,
                 after_file: Callable[[str], None] | None = None) -> None:
        if every_steps < 1 or (check_every_steps is not None and check_every_steps < 1):
            raise TrainError(f"every_steps={every_steps!r} and check_every_steps={check_every_steps!r} must be >= 1",
                             hint="leave check_every_steps unset to have it sized from the step time")
        self.every_steps = every_steps
        self._auto_check = check_every_steps is None
        # Until the step time is known, check every step (a drain at the start is caught too).
        self.check_every_steps = check_every_steps or 1
        self._probe_steps = 0
        self._probe_started = 0.0
        self._after_file = after_file
        self._ctx = ray.train.get_context()
        self.rank = self._ctx.get_world_rank()
        self.world_size = self._ctx.get_world_size()
        self.attempt = secrets.token_hex(4)
        self._progress = find_progress(self._ctx.get_experiment_name()) if self.rank == 0 else None
        self._steps_since_check = 0
        self.resume_step = 0
        self.last_checkpoint_step: int | None = None

    # progress --------------------------------------------------------

    def _event(self, ev: str, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.record.remote({"ev": ev, "t": time.time(), "attempt": self.attempt, **fields})

    def _announce(self) -> None:
        labels = ray.get_runtime_context().get_node_labels()
        if self.rank == 0:
            self._event("attempt", world_size=self.world_size, resume_step=self.resume_step)
        progress = find_progress(self._ctx.get_experiment_name())
        if progress is not None:
            progress.record.remote({"ev": "worker", "t": time.time(), "attempt": self.attempt, "rank": self.rank,
                                    "donor_id": labels.get(contract.LABEL_DONOR_ID), "pid": os.getpid(),
                                    "node_id": ray.get_runtime_context().get_node_id()})

    # restore ---------------------------------------------------------

    def restore(self) -> LoadedCheckpoint | None:
        """The newest checkpoint of this run that verifies, or None to start from scratch.

        A collective call. Rank 0 chooses; every rank reads it (all need the optimizer
        state, not only the parameters). A folder that fails verification is skipped for
        the one before it.
        """
        loaded = self._latest_valid()
        self.resume_step = loaded.step if loaded is not None else 0
        self.last_checkpoint_step = self.resume_step if loaded is not None else None
        # The attempt id must be the same on every rank for the progress log.
        self.attempt = ray.train.collective.broadcast_from_rank_zero(self.attempt)
        self._announce()
        return loaded

    def _candidates(self) -> list[str]:
        """Checkpoint folders of this run in storage, newest step first.

        The run's folder, not only what Ray Train registered: Ray registers a report at
        its controller's next poll (up to a second later), so a donor that vanishes right
        after a commit would otherwise cost the whole interval before it. A folder counts
        only once its manifest verifies.
        """
        import pyarrow.fs as pafs

        storage = self._ctx.get_storage()
        fs = storage.storage_filesystem
        try:
            infos = fs.get_file_info(pafs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
        except OSError as exc:
            log.warning("cannot list %s (%s); using Ray Train's registered checkpoints", storage.experiment_fs_path, exc)
            infos = []
        named = [(parse_checkpoint_dir_name(i.base_name), i.path) for i in infos if i.type == pafs.FileType.Directory]
        found = [(p[0], path) for p, path in named if p is not None]
        registered = ray.train.get_checkpoint()
        if registered is not None and all(path != registered.path for _, path in found):
            found.append((-1, registered.path))  # a folder Ray knows but the listing missed
        return [path for _, path in sorted(found, key=lambda x: x[0], reverse=True)]

    def _latest_valid(self) -> LoadedCheckpoint | None:
        fs = self._ctx.get_storage().storage_filesystem
        # Rank 0 picks, every rank loads the same one.
        chosen: str | None = None
        if self.rank == 0:
            for path in self._candidates():
                try:
                    read_checkpoint(fs, path)
                except CheckpointCorrupt as exc:
                    log.warning("skipping checkpoint %s: %s", path, exc.message)
                    continue
                chosen = path
                break
        chosen = ray.train.collective.broadcast_from_rank_zero(chosen)
        return None if chosen is None else read_checkpoint(fs, chosen)

    # per step --------------------------------------------------------

    def step_done(self, step: int, save: Callable[[], Mapping[str, bytes]],
                  metrics: Mapping[str, float] | None = None) -> None:
        """Record ``step`` (steps completed so far); checkpoint and vacate on a drain.

        Args:
            step: how many steps are done (a resume starts here).
            save: returns the state to checkpoint as ``{file name: bytes}``; called on rank 0 only.
            metrics: reported with each checkpoint.

        Raises:
            DonorDrained: a donor of this worker group is draining; the checkpoint of
                ``step`` is committed. Let it propagate out of the train loop.
        """
        if self.rank == 0:
            self._event("step", step=step)
        self._size_check_interval()
        self._steps_since_check += 1
        if self._steps_since_check >= self.check_every_steps:
            self._steps_since_check = 0
            info = ray.train.get_preemption_info()
            if info is not None:
                self._event("drain", step=step, deadline_ms=info.deadline_ms, preempted_ranks=info.preempted_ranks)
                if self.last_checkpoint_step != step:
                    self.checkpoint(step, save, "jit", metrics)
                raise DonorDrained(f"donor(s) {', '.join(n[:8] for n in info.preempted_node_ids)} draining: "
                                   f"checkpoint of step {step} taken, vacating")
        if step % self.every_steps == 0 and self.last_checkpoint_step != step:
            self.checkpoint(step, save, "periodic", metrics)

    def _size_check_interval(self) -> None:
        """After ``PROBE_STEPS`` steps, check every ~``CHECK_PERIOD_S`` (one collective, all ranks)."""
        if not self._auto_check:
            return
        self._probe_steps += 1
        if self._probe_steps == 1:
            self._probe_started = time.monotonic()
            return
        if self._probe_steps < PROBE_STEPS:
            return
        step_s = (time.monotonic() - self._probe_started) / (self._probe_steps - 1)
        self.check_every_steps = int(ray.train.collective.broadcast_from_rank_zero(
            max(1, min(MAX_CHECK_EVERY, round(CHECK_PERIOD_S / max(step_s, 1e-6))))))
        self._auto_check = False

    def checkpoint(self, step: int, save: Callable[[], Mapping[str, bytes]], kind: CheckpointKind = "periodic",
                   metrics: Mapping[str, float] | None = None) -> None:
        """Write (rank 0) and report (every rank) a checkpoint of ``step``; a collective call."""
        report_metrics = {"step": step, "checkpoint_kind": kind, **(metrics or {})}
        if self.rank != 0:
            ray.train.report(report_metrics, checkpoint=None)
            self.last_checkpoint_step = step
            return
        storage = self._ctx.get_storage()
        fs = storage.storage_filesystem
        path = f"{storage.experiment_fs_path.rstrip('/')}/{checkpoint_dir_name(step, secrets.token_hex(8))}"
        t0 = time.monotonic()
        manifest = write_checkpoint(fs, path, dict(save()), step, kind, between_files=self._after_file)
        write_s = time.monotonic() - t0
        ray.train.report(report_metrics, checkpoint=ray.train.Checkpoint(path, filesystem=fs),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        self.last_checkpoint_step = step
        self._event("checkpoint", step=step, kind=kind, path=path, write_s=round(write_s, 4),
                    bytes=sum(e.size_bytes for e in manifest.files.values()))

    def finish(self, step: int, save: Callable[[], Mapping[str, bytes]] | None = None,
               metrics: Mapping[str, float] | None = None) -> None:
        """Mark the run done at ``step``; with ``save``, commit a final checkpoint first (collective)."""
        if save is not None and self.last_checkpoint_step != step:
            self.checkpoint(step, save, "final", metrics)
        if self.rank == 0:
            self._event("done", step=step)

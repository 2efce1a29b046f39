"""The live side of planning: the fleet from the control plane on the head, and :func:`configure`.

:func:`candidates_from_view` is pure (the head's fleet view -> placement candidates); the
rest talks to the running cluster through the control-plane actor, the way
``dgpt.placement.live`` does.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from dgpt import contract
from dgpt.exceptions import TrainError
from dgpt.fleet import DonorTable, FleetDonor, FleetView
from dgpt.reliability.model import WeibullParams
from dgpt.resources import Resources
from dgpt.train.budgets import lost_fraction
from dgpt.train.plan import Fleet, TrainPlan, parse_spec, plan_training
from dgpt.train.storage import (
    RUNS_PATH,
    StoreChoice,
    as_pyarrow_filesystem,
    choose_checkpoint_store,
    head_filesystem,
)


def _standby_donors(t: DonorTable) -> list[FleetDonor]:
    owners = {code: name for name, code in t.owner_index.items()}
    return [
        FleetDonor(
            donor_id=str(t.donor_ids[i]), owner=owners.get(int(t.owner_codes[i]), ""),
            caps=Resources(float(t.cpu_total[i]), float(t.gpu_total[i]), float(t.mem_total[i]), donors=1.0),
            gflops=float(t.gflops[i]), labels=dict(t.labels[i]) if len(t.labels) else {},
            reliability=WeibullParams(float(t.shape[i]), float(t.scale_s[i])), since_s=float(t.start_s[i]),
        )
        for i in range(len(t))
    ]


def candidates_from_view(view: FleetView) -> list[FleetDonor]:
    """Every donor a run could use: active (draining ones are excluded later, with a reason),
    activating, and standby (pure)."""
    return [*view.active, *view.activating, *_standby_donors(view.standby)]


def fleet_from(view: FleetView, lost: int, ended: int) -> Fleet:
    """The planning view: candidates and the share of departures that were vanishes (pure)."""
    return Fleet(candidates=candidates_from_view(view), vanish_share=lost_fraction(lost, max(ended, lost)),
                 now_s=view.now_s)


def _control_plane(what: str, instead: str = "call configure(..., use_fleet=False)") -> Any:
    """The control-plane actor on the head (connecting to Ray first, as Ray would).

    Raises:
        TrainError: this Ray cluster has no dgpt control plane.
    """
    import ray

    if not ray.is_initialized():
        ray.init()  # as Ray itself would on first use: RAY_ADDRESS, else a local cluster
    try:
        return ray.get_actor(contract.REGISTRY_ACTOR, namespace=contract.NAMESPACE)
    except ValueError:
        raise TrainError(
            f"this Ray cluster has no dgpt control plane, so dgpt cannot {what}",
            hint=f"connect to a dgpt fabric (`eval \"$(dgpt env)\"`), or {instead}",
        ) from None


def live_fleet() -> Fleet:
    """The fleet as the control plane on the head sees it now.

    Raises:
        TrainError: this Ray cluster has no dgpt control plane.
    """
    import ray

    plane = _control_plane("choose donors or size budgets")
    got: Any = ray.get(plane.training_fleet.remote(), timeout=60)
    view, lost, ended = got
    return fleet_from(view, int(lost), int(ended))


def checkpoint_store(requested: str | None) -> StoreChoice:
    """Where a run that names no storage keeps its checkpoints: ``requested``, else the head's
    ``train_checkpoints`` setting, judged against the donor tier's state now.

    Raises:
        TrainError: no dgpt control plane. CheckpointStoreError: ``donors`` was asked for
        and the tier cannot take a write.
    """
    import ray

    plane = _control_plane("choose a checkpoint store", "give configure storage_path= or storage_filesystem=")
    default, profile, problem = ray.get(plane.checkpoint_tier.remote(), timeout=60)
    return choose_checkpoint_store(requested or default, profile, problem)


def configure(
    name: str,
    workers: int | tuple[int, int],
    *,
    storage_filesystem: Any = None,
    use_fleet: bool = True,
    apply_env: bool = True,
    **spec: Any,
) -> TrainPlan:
    """Plan a Ray Train run on this fabric's donors; returns the configs to build the trainer with.

    Use as::

        plan = dgpt.train.configure("digits", workers=(1, 3), horizon_s=1800)
        trainer = TorchTrainer(loop, scaling_config=plan.scaling_config(), run_config=plan.run_config())

    Args:
        name: the run's name (its storage folder; the same name resumes the run).
        workers: ``n`` (1..n workers) or ``(min, max)``.
        storage_filesystem: any pyarrow or fsspec filesystem for checkpoints; with
            ``storage_path`` the folder on it. Default: the store ``checkpoints`` picks
            (:func:`dgpt.train.storage.choose_checkpoint_store`; the plan's notes say why).
        use_fleet: read the donors from the registry (False: no donor choice, default budgets).
        apply_env: set the ``RAY_TRAIN_*`` settings of :data:`dgpt.train.plan.TRAIN_ENV`
            in this process, each unless already set (Ray Train forwards them to its workers).
        **spec: the other :class:`dgpt.train.plan.TrainSpec` fields: ``cpus_per_worker``,
            ``gpus_per_worker``, ``memory_per_worker_bytes``, ``horizon_s``,
            ``one_worker_per_donor``, ``choose_donors``, ``resize_interval_s``,
            ``checkpoints_to_keep``, ``max_failures``, ``max_preemption_failures``,
            ``storage_path``, ``checkpoints`` (``auto``, ``donors`` or ``head``; default:
            the head's ``train_checkpoints`` setting).

    Raises:
        TrainError: an invalid field (named), no dgpt fabric, or no donor can host a worker.
    """
    parsed = parse_spec(name=name, workers=workers, **spec)
    picked: StoreChoice | None = None  # dgpt's choice, when the run names no storage
    if storage_filesystem is not None:
        fs = as_pyarrow_filesystem(storage_filesystem)
        path = parsed.storage_path or RUNS_PATH
    elif parsed.storage_path is not None:
        fs, path = None, parsed.storage_path
    else:
        picked = checkpoint_store(parsed.checkpoints)
        if picked.store == "donors":
            from dgpt.storage.fs import DonorFileSystem, pyarrow_filesystem

            fs = pyarrow_filesystem(DonorFileSystem())
        else:
            fs = head_filesystem()
        path = RUNS_PATH
    fleet = live_fleet() if use_fleet else None
    plan = plan_training(parsed, fleet, storage_path=path, storage_filesystem=fs)
    if picked is not None:
        plan = replace(plan, checkpoint_store=picked.store, notes=(*plan.notes, f"checkpoints: {picked.reason}"))
    if apply_env:
        for key, value in plan.env.items():
            os.environ.setdefault(key, value)
    return plan

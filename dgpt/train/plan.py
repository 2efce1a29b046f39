"""A training run's plan: elastic bounds, donors, failure budgets and storage, as Ray Train configs.

:func:`plan_training` is pure: a validated :class:`TrainSpec` and a :class:`Fleet` view
in, a :class:`TrainPlan` out. The plan builds stock Ray Train objects
(``ScalingConfig``, ``RunConfig``), so research code keeps its own ``TorchTrainer`` and
train loop; dgpt only chooses the numbers:

- ``num_workers=(min, max)`` from :mod:`dgpt.train.bounds`;
- ``resources_per_worker`` with one ``donor`` resource per worker (each donor node has
  exactly one), so every worker sits on its own donor, and a ``label_selector`` naming the
  donors :mod:`dgpt.train.placement` chose for the horizon;
- ``FailureConfig`` budgets from :mod:`dgpt.train.budgets`;
- storage on the head's checkpoint store (:mod:`dgpt.train.storage`) unless the run
  names its own path or filesystem (any pyarrow or fsspec one).

:meth:`TrainPlan.env` lists the ``RAY_TRAIN_*`` settings a donor run wants (Ray Train
propagates them from the driver to its controller and workers); :func:`dgpt.train.configure`
applies them unless the user has set them already.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dgpt.contract import DONOR_RESOURCE
from dgpt.exceptions import TrainError
from dgpt.fleet import FleetDonor
from dgpt.train.bounds import ElasticBounds, elastic_bounds, parse_workers
from dgpt.train.budgets import FailureBudgets, failure_budgets
from dgpt.train.placement import WorkerPlacement, WorkerShape, choose_donors

#: Ray Train settings for donor runs, and why:
#: - the preemption watcher polls the GCS for drains every second (Ray: 5 s), so a JIT
#:   checkpoint starts within about a second of a donor's owner coming back;
#: - the controller polls its workers every second (Ray: 2 s), so a restart begins right
#:   after the workers vacate a draining donor;
#: - a worker group that cannot be placed gives up after 30 s (Ray: 60 s) and is resized
#:   from a fresh count, since a donor can vanish between the count and the start.
TRAIN_ENV: Mapping[str, str] = {
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30",
}


class TrainSpec(BaseModel):
    """What a research run asks for; every field is checked and named in errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="Run name: its storage folder; a rerun with the same name resumes it.")
    workers: int | tuple[int, int] = Field(description="n (1..n workers) or (min, max).")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    memory_per_worker_bytes: int = Field(0, ge=0)
    horizon_s: float = Field(3600.0, gt=0, le=30 * 86400, description="How long the run should hold together.")
    one_worker_per_donor: bool = True
    choose_donors: bool = Field(True, description="Restrict workers to donors chosen for the horizon.")
    resize_interval_s: float = Field(60.0, ge=0, le=86400, description="How often a healthy run may grow or shrink.")
    checkpoints_to_keep: int = Field(3, ge=1, le=1000)
    max_failures: int | None = Field(None, ge=-1, description="None: sized from the fleet; -1: unlimited.")
    max_preemption_failures: int | None = Field(None, ge=-1, description="None: sized from the fleet; -1: unlimited.")
    storage_path: str | None = Field(None, min_length=1, description="None: the checkpoint store `checkpoints` picks.")
    checkpoints: Literal["auto", "donors", "head"] | None = Field(
        None, description="Where checkpoints go when no storage is given: the donor tier, the head, or auto "
        "(the donor tier once it is durable); None: the head's setting train_checkpoints.")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        parse_workers(value)  # raises TrainError with the rule
        return value

    @property
    def shape(self) -> WorkerShape:
        return WorkerShape(self.cpus_per_worker, self.gpus_per_worker, float(self.memory_per_worker_bytes))


def parse_spec(**fields: Any) -> TrainSpec:
    """A :class:`TrainSpec` from keyword arguments.

    Raises:
        TrainError: a field is invalid; the message names it and the value given.
    """
    try:
        return TrainSpec(**fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            given = fields.get(str(err["loc"][0])) if err["loc"] else None
            problems.append(f"{where}={given!r}: {str(err['msg']).removeprefix('Value error, ')}")
        raise TrainError("invalid training spec: " + "; ".join(problems),
                         hint="see help(dgpt.train.configure) for every field and its range") from None
    except TrainError as exc:
        raise TrainError(f"invalid training spec: {exc.message}", hint=exc.hint) from None


@dataclass(frozen=True)
class Fleet:
    """The donors a plan may consider and the share of past departures that were vanishes."""

    candidates: Sequence[FleetDonor]
    vanish_share: float
    now_s: float


@dataclass(frozen=True)
class TrainPlan:
    """Everything dgpt decided for a run, and the Ray Train configs that carry it out."""

    spec: TrainSpec
    bounds: ElasticBounds
    placement: WorkerPlacement | None
    budgets: FailureBudgets | None
    resources_per_worker: Mapping[str, float]
    label_selector: Mapping[str, str]
    max_failures: int
    max_preemption_failures: int
    storage_path: str
    storage_filesystem: Any = None
    notes: Sequence[str] = field(default_factory=tuple)
    #: ``donors`` or ``head`` when dgpt picked the store (the run named none), else ``given``.
    checkpoint_store: str = "given"

    @property
    def env(self) -> Mapping[str, str]:
        return TRAIN_ENV

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0.0) > 0

    def scaling_config(self) -> Any:
        """``ray.train.ScalingConfig`` for this plan."""
        import ray.train

        # Ray's type stubs describe the v1 classes; ray.train exports v2's at run time.
        scaling: Any = ray.train.ScalingConfig
        return scaling(
            num_workers=self.bounds.as_ray(),
            resources_per_worker=dict(self.resources_per_worker),
            use_gpu=self.use_gpu,
            # With a donor resource per worker Ray cannot stack workers anyway; without it,
            # spread them so one departure takes as few as possible.
            placement_strategy="PACK" if self.spec.one_worker_per_donor else "SPREAD",
            label_selector=dict(self.label_selector) or None,
            elastic_resize_monitor_interval_s=self.spec.resize_interval_s,
        )

    def run_config(self, **overrides: Any) -> Any:
        """``ray.train.RunConfig`` for this plan; ``overrides`` pass through (callbacks, ...)."""
        import ray.train

        failure: Any = ray.train.FailureConfig
        kwargs: dict[str, Any] = {
            "name": self.spec.name,
            "storage_path": self.storage_path,
            "storage_filesystem": self.storage_filesystem,
            "failure_config": failure(max_failures=self.max_failures,
                                            max_preemption_failures=self.max_preemption_failures),
            "checkpoint_config": ray.train.CheckpointConfig(num_to_keep=self.spec.checkpoints_to_keep),
        }
        kwargs.update(overrides)
        return ray.train.RunConfig(**kwargs)

    def describe(self) -> str:
        lines = [f"run {self.spec.name!r}: workers {self.bounds.min_workers}..{self.bounds.max_workers}, "
                 f"each {dict(self.resources_per_worker)}"]
        if self.placement is not None:
            lines.append("donors: " + self.placement.describe())
        if self.budgets is not None:
            lines.append(self.budgets.describe())
        lines.append(f"failure budgets used: max_failures={self.max_failures}, "
                     f"max_preemption_failures={self.max_preemption_failures}")
        lines.append(f"storage: {self.storage_path} on "
                     f"{getattr(self.storage_filesystem, 'type_name', 'the path given')}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _resources(spec: TrainSpec) -> dict[str, float]:
    res: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        res["GPU"] = spec.gpus_per_worker
    if spec.memory_per_worker_bytes:
        res["memory"] = float(spec.memory_per_worker_bytes)
    if spec.one_worker_per_donor:
        res[DONOR_RESOURCE] = 1.0
    return res


def plan_training(spec: TrainSpec, fleet: Fleet | None, *, storage_path: str, storage_filesystem: Any = None) -> TrainPlan:
    """The plan for ``spec`` on ``fleet`` (pure).

    Args:
        spec: the validated request.
        fleet: the donors (None: no fleet view, so no donor choice and default budgets).
        storage_path: where runs go on ``storage_filesystem`` (or a local/URI path).
        storage_filesystem: a pyarrow filesystem, or None for ``storage_path`` as Ray parses it.

    Raises:
        TrainError: the request cannot be met (e.g. its minimum exceeds the usable donors).
    """
    notes: list[str] = []
    placement = None
    if fleet is not None and spec.choose_donors:
        _, hi = parse_workers(spec.workers)
        placement = choose_donors(fleet.candidates, spec.shape, hi, spec.horizon_s, fleet.now_s,
                                  one_per_donor=spec.one_worker_per_donor)
        if placement.slots == 0:
            why = "; ".join(f"{d}: {r}" for d, r in sorted(placement.excluded.items())) or "no donors registered"
            raise TrainError(f"no donor can host a worker of {dict(_resources(spec))} ({why})",
                             hint="ask for less per worker, or wait for donors to join (`dgpt status`)")
    bounds = elastic_bounds(spec.workers, placement.slots if placement is not None else None)
    if bounds.note:
        notes.append(bounds.note)
    budgets = None
    if fleet is not None:
        by_id = {d.donor_id: d for d in fleet.candidates}
        members = [by_id[i] for i in (placement.gang if placement is not None else ())] or list(fleet.candidates)
        p = [d.p_stay(fleet.now_s, spec.horizon_s) for d in members][: bounds.max_workers]
        budgets = failure_budgets(p or [1.0], fleet.vanish_share)
    max_failures = spec.max_failures if spec.max_failures is not None else (
        budgets.max_failures if budgets is not None else 3)
    max_pre = spec.max_preemption_failures if spec.max_preemption_failures is not None else (
        budgets.max_preemption_failures if budgets is not None else -1)
    selector = dict(placement.label_selector) if placement is not None else {}
    return TrainPlan(
        spec=spec, bounds=bounds, placement=placement, budgets=budgets, resources_per_worker=_resources(spec),
        label_selector=selector, max_failures=max_failures, max_preemption_failures=max_pre,
        storage_path=storage_path, storage_filesystem=storage_filesystem, notes=tuple(notes),
    )


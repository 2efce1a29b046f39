"""The frozen world the autoscaler policy sees in one tick: demand, active nodes, standby donors.

The loop builds an :class:`AutoscalerContext` from Ray's pending demand and the registry,
passes it to a pure policy, and applies the decisions it gets back. Nothing here talks to
Ray or the registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from autoscaler.bounds import AutoscalerBounds
from dgpt.placement.labels import selector_matches
from dgpt.placement.snapshot import REFERENCE_GFLOPS
from dgpt.reliability.model import WeibullParams, prior_for

#: Ray placement-group strategies whose bundles must sit on distinct nodes.
SPREAD_STRATEGIES = frozenset({"SPREAD", "STRICT_SPREAD"})
_STRATEGIES = frozenset({"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})


@dataclass(frozen=True, slots=True)
class ResourceShape:
    """An amount of CPU, GPU and memory, plus the node labels it requires (a Ray selector)."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: float = 0.0
    label_selector: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("cpus", "gpus", "memory_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_mapping(
        cls, resources: Mapping[str, float], label_selector: Mapping[str, str] | None = None
    ) -> ResourceShape:
        """A shape from a Ray resource dict (``CPU``, ``GPU``, ``memory``; others ignored)."""
        return cls(
            cpus=float(resources.get("CPU", 0.0)),
            gpus=float(resources.get("GPU", 0.0)),
            memory_bytes=float(resources.get("memory", 0.0)),
            label_selector=dict(label_selector or {}),
        )

    def plus(self, other: ResourceShape) -> ResourceShape:
        """The sum of two shapes (label selectors merged)."""
        return ResourceShape(
            self.cpus + other.cpus,
            self.gpus + other.gpus,
            self.memory_bytes + other.memory_bytes,
            {**self.label_selector, **other.label_selector},
        )

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        if self.label_selector:
            parts.append(str(dict(self.label_selector)))
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class GangDemand:
    """A pending placement group: its bundles and Ray strategy (PACK, SPREAD, STRICT_*)."""

    bundles: tuple[ResourceShape, ...]
    strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise ValueError(
                f"strategy must be one of {sorted(_STRATEGIES)}, got {self.strategy!r}"
            )
        object.__setattr__(self, "bundles", tuple(self.bundles))


@dataclass(frozen=True, slots=True)
class DonorProfile:
    """What a donor offers (its caps) and what it is: from the registry."""

    cpus: float
    memory_bytes: float
    gpus: float = 0.0
    gpu_model: str | None = None
    gflops: float = REFERENCE_GFLOPS
    device_class: str = "unknown"
    owner: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StandbyDonor:
    """A donor that could be activated (or one already told to, when in ``activating``).

    ``session_start_s`` is when its current availability began (it went idle), on the
    context's clock; ``reliability`` its fitted uptime model (the class prior if None).
    """

    donor_id: str
    profile: DonorProfile
    session_start_s: float
    reliability: WeibullParams | None = None

    @property
    def params(self) -> WeibullParams:
        return self.reliability or prior_for(self.profile.device_class)

    def p_stay(self, now_s: float, horizon_s: float) -> float:
        return self.params.p_stay(now_s - self.session_start_s, horizon_s)

    def fits(self, shape: ResourceShape) -> bool:
        """True if an empty node of this donor could hold ``shape``."""
        p = self.profile
        return (
            shape.cpus <= p.cpus + 1e-9
            and shape.gpus <= p.gpus + 1e-9
            and shape.memory_bytes <= p.memory_bytes + 1e-9
            and (not shape.label_selector or selector_matches(shape.label_selector, p.labels))
        )


@dataclass(frozen=True, slots=True)
class ActiveNode:
    """A donor whose raylet is in the cluster: its free resources and how long it has idled."""

    donor_id: str
    profile: DonorProfile
    available: ResourceShape
    idle_s: float
    session_start_s: float
    reliability: WeibullParams | None = None
    draining: bool = False

    @property
    def params(self) -> WeibullParams:
        return self.reliability or prior_for(self.profile.device_class)

    def p_stay(self, now_s: float, horizon_s: float) -> float:
        return self.params.p_stay(now_s - self.session_start_s, horizon_s)

    @property
    def used_cpus(self) -> float:
        return max(self.profile.cpus - self.available.cpus, 0.0)


@dataclass(frozen=True)
class AutoscalerContext:
    """Everything one tick of the autoscaler policy decides on.

    Args:
        now_s: the clock (seconds, same clock as every ``session_start_s``).
        bounds: size limits and pacing.
        pending: resource shapes of tasks and actors Ray cannot schedule now.
        pending_gangs: placement groups Ray cannot place now.
        active: donors in the Ray cluster (draining ones included, flagged).
        activating: donors told to activate that have not joined Ray yet.
        standby: donors that could be activated.
    """

    now_s: float
    bounds: AutoscalerBounds
    pending: Sequence[ResourceShape] = ()
    pending_gangs: Sequence[GangDemand] = ()
    active: Sequence[ActiveNode] = ()
    activating: Sequence[StandbyDonor] = ()
    standby: Sequence[StandbyDonor] = ()

    def __post_init__(self) -> None:
        for name in ("pending", "pending_gangs", "active", "activating", "standby"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

"""The one resource type: amounts of CPU, GPU and memory, plus the node labels they require.

:class:`Resources` is what a task, actor or bundle asks for, what Ray cannot place yet
(demand), what a donor offers (its caps) and what it has free. :class:`Gang` is a
placement group's bundles and strategy; :class:`Demand` is everything the cluster cannot
place right now. Placement, the autoscaler and the head all speak these types.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dgpt.contract import DONOR_RESOURCE
from dgpt.wire import positional_pickle

#: Ray resource names dgpt understands as amounts; anything else is a label matter.
RAY_NAMES = ("CPU", "GPU", "memory")
#: Ray placement-group strategies; the SPREAD ones put bundles on distinct nodes.
STRATEGIES = frozenset({"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
SPREAD_STRATEGIES = frozenset({"SPREAD", "STRICT_SPREAD"})
#: Resource comparisons tolerate float dust (0.1 + 0.2 CPUs).
EPS = 1e-9
#: Ray's implicit per-node resources (every node has 1 of each): Serve's
#: ``max_replicas_per_node=m`` asks for 1/m of one per replica (ray._raylet.IMPLICIT_RESOURCE_PREFIX).
IMPLICIT_PREFIX = "node:__internal_implicit_resource_"
_PLAIN = (float, int)


@positional_pickle
@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of CPU, GPU and memory (bytes), and the node labels it requires.

    ``donors`` counts Ray's ``donor`` resource, of which every donor node has exactly one:
    a Ray Train worker asks for one, so no two workers share a donor (and a request for n
    such workers needs n donors, however big each is).
    """

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: float = 0.0
    label_selector: Mapping[str, str] = field(default_factory=dict)
    donors: float = 0.0
    #: A share of one of Ray's implicit per-node resources (:data:`IMPLICIT_PREFIX`): at
    #: most ``1 / per_node_share`` such requests fit on one node (Serve's max_replicas_per_node).
    per_node_key: str = ""
    per_node_share: float = 0.0

    def __post_init__(self) -> None:
        amounts = (self.cpus, self.gpus, self.memory_bytes, self.donors, self.per_node_share)
        if all(type(v) in _PLAIN for v in amounts) and min(amounts) >= 0 and sum(amounts) < math.inf:
            return  # the common case, checked at once (a fleet view unpickles thousands; NaN fails the sum)
        for name in ("cpus", "gpus", "memory_bytes", "donors", "per_node_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(float(value)) and float(value) >= 0
            ):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")

    @classmethod
    def from_ray(
        cls, resources: Mapping[str, float], label_selector: Mapping[str, str] | None = None
    ) -> Resources:
        """From a Ray resource dict (``CPU``, ``GPU``, ``memory``, ``donor``, an implicit
        per-node resource; other keys are ignored)."""
        implicit = sorted((k, float(v)) for k, v in resources.items() if k.startswith(IMPLICIT_PREFIX) and v > 0)
        key, share = max(implicit, key=lambda kv: kv[1]) if implicit else ("", 0.0)
        return cls(
            cpus=float(resources.get("CPU", 0.0)),
            gpus=float(resources.get("GPU", 0.0)),
            memory_bytes=float(resources.get("memory", 0.0)),
            label_selector=dict(label_selector or {}),
            donors=float(resources.get(DONOR_RESOURCE, 0.0)),
            per_node_key=key,
            per_node_share=share,
        )

    def as_ray(self) -> dict[str, float]:
        """The Ray bundle for these amounts (zero amounts left out, as Ray expects)."""
        bundle = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory_bytes, DONOR_RESOURCE: self.donors}
        return {k: v for k, v in bundle.items() if v > 0}

    @property
    def empty(self) -> bool:
        return self.cpus <= 0 and self.gpus <= 0 and self.memory_bytes <= 0 and self.donors <= 0

    def plus(self, other: Resources) -> Resources:
        """The sum of two amounts (label selectors merged)."""
        return Resources(
            self.cpus + other.cpus,
            self.gpus + other.gpus,
            self.memory_bytes + other.memory_bytes,
            {**self.label_selector, **other.label_selector},
            self.donors + other.donors,
        )

    def minus(self, other: Resources) -> Resources:
        """What is left of these amounts after ``other`` (never below zero)."""
        return Resources(
            max(0.0, self.cpus - other.cpus),
            max(0.0, self.gpus - other.gpus),
            max(0.0, self.memory_bytes - other.memory_bytes),
            self.label_selector,
            max(0.0, self.donors - other.donors),
        )

    def fits_in(self, room: Resources) -> bool:
        """True if these amounts fit in ``room`` (labels are the caller's matter)."""
        return (
            self.cpus <= room.cpus + EPS
            and self.gpus <= room.gpus + EPS
            and self.memory_bytes <= room.memory_bytes + EPS
            and self.donors <= room.donors + EPS
        )

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            parts.append(f"{self.gpus:g} GPU")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.2f} GiB")
        if self.label_selector:
            parts.append(f"labels {dict(self.label_selector)}")
        if self.per_node_key:
            parts.append(f"at most {int(1 / self.per_node_share + EPS)} per node")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Gang:
    """A placement group: its bundles and Ray strategy (PACK, SPREAD, STRICT_*)."""

    bundles: tuple[Resources, ...]
    strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        object.__setattr__(self, "bundles", tuple(self.bundles))


@dataclass(frozen=True, slots=True)
class Demand:
    """What the cluster cannot place now.

    ``pending``: tasks and actors waiting for a node (Serve replicas and Train workers
    included); ``gangs``: placement groups waiting; ``constraints``: standing
    ``request_resources()`` bundles, which reserve capacity whether or not work uses it.
    """

    pending: tuple[Resources, ...] = ()
    gangs: tuple[Gang, ...] = ()
    constraints: tuple[Resources, ...] = ()

    def __post_init__(self) -> None:
        for name in ("pending", "gangs", "constraints"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def of(
        cls,
        pending: Sequence[Resources] = (),
        gangs: Sequence[Gang] = (),
        constraints: Sequence[Resources] = (),
    ) -> Demand:
        return cls(tuple(pending), tuple(gangs), tuple(constraints))

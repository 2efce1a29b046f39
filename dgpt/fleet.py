"""The one fleet view that placement and the autoscaler read: donors, and donors as columns.

:class:`FleetDonor` is one donor as policy sees it, whether it runs a raylet (``available``
is set: Ray's free resources on its node) or waits in standby. :class:`DonorTable` is a set
of donors as numpy columns, so a policy scores hundreds of candidates with a few vector
operations instead of a Python loop over 100k donors. :class:`FleetView` is the frozen
fleet at one instant: the active donors (placement's candidates), the donors already told
to activate, and the eligible standby donors as a table (the autoscaler's candidates).

The head maintains this view incrementally (``dgpt.head.fleet_index``), so taking one costs
O(active donors) plus a copy of the standby columns, never a walk over the whole fleet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

from dgpt import contract
from dgpt.reliability.model import WeibullParams, prior_for
from dgpt.reliability.score import REFERENCE_GFLOPS, donor_score
from dgpt.resources import Resources
from dgpt.wire import positional_pickle

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@positional_pickle
@dataclass(frozen=True, slots=True)
class FleetDonor:
    """One donor as placement and the autoscaler see it.

    ``caps`` is what the donor offers; ``available`` what Ray reports free on its node
    (``None`` while it is not in the cluster). ``since_s`` is when its current session began
    (active) or when its current availability began (standby), on the view's clock;
    ``idle_s`` how long Ray has seen its node idle; ``load`` the node's busy CPU share, 0..1.
    ``relayed``: Ray reaches it only through the head's overlay relay (low bandwidth).
    """

    donor_id: str
    owner: str = ""
    device_class: str = "unknown"
    caps: Resources = field(default_factory=Resources)
    available: Resources | None = None
    gflops: float = REFERENCE_GFLOPS
    labels: Mapping[str, str] = field(default_factory=dict)
    reliability: WeibullParams | None = None
    since_s: float = 0.0
    node_id: str | None = None
    idle_s: float = 0.0
    load: float = 0.0
    draining: bool = False
    relayed: bool = False

    @property
    def params(self) -> WeibullParams:
        """The donor's uptime model, or its device-class prior when none was fitted."""
        return self.reliability or prior_for(self.device_class)

    @property
    def free(self) -> Resources:
        """What work could still use: Ray's free resources, or the caps when not running."""
        return self.available if self.available is not None else self.caps

    @property
    def used_cpus(self) -> float:
        return max(self.caps.cpus - self.free.cpus, 0.0)

    @property
    def gpu(self) -> str | None:
        """The GPU model it offers, or None."""
        model = self.labels.get(contract.LABEL_GPU)
        return model if self.caps.gpus and model and model != contract.NO_GPU else None

    @property
    def is_donor(self) -> bool:
        """False for the head (role label ``head``), which never takes user work."""
        return self.labels.get(contract.LABEL_ROLE, contract.ROLE_DONOR) != contract.ROLE_HEAD

    def p_stay(self, now_s: float, horizon_s: float) -> float:
        return self.params.p_stay(now_s - self.since_s, horizon_s)

    def fits(self, request: Resources) -> bool:
        """True if ``request`` fits in what this donor has free, labels included."""
        return request.fits_in(self.free) and (
            not request.label_selector
            or contract.selector_matches(request.label_selector, self.labels)
        )


@dataclass(frozen=True)
class DonorTable:
    """Donors as read-only numpy columns for vectorised scoring.

    Index ``i`` in every array is the same donor. ``usable`` lists the indices of donors
    that may take new work (not the head, not draining); ``gpu_usable`` the subset with
    GPUs. ``owner_index`` maps an owner's name to its ``owner_codes`` value. A simulator
    may own a table and update its arrays between decisions; policies never write to it.
    ``relayed`` is 1.0 for donors Ray reaches only through the head's relay, else 0.0.
    """

    node_ids: Sequence[str]
    donor_ids: Sequence[str]
    owner_codes: IntArray
    cpu_total: FloatArray
    cpu_free: FloatArray
    gpu_total: FloatArray
    gpu_free: FloatArray
    mem_total: FloatArray
    mem_free: FloatArray
    load: FloatArray
    gflops: FloatArray
    shape: FloatArray
    scale_s: FloatArray
    start_s: FloatArray
    usable: IntArray
    gpu_usable: IntArray
    labels: Sequence[Mapping[str, str]] = ()
    owner_index: Mapping[str, int] = field(default_factory=dict)
    owner_names: Sequence[str] = ()  # owner code -> name (the inverse of owner_index)
    relayed: FloatArray | None = None

    def __len__(self) -> int:
        return len(self.donor_ids)

    def free_of(self, i: int) -> Resources:
        """What donor ``i`` has free, as a :class:`Resources`."""
        return Resources(float(self.cpu_free[i]), float(self.gpu_free[i]), float(self.mem_free[i]))


def _amount(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def build_table(donors: Sequence[FleetDonor]) -> DonorTable:
    """Columns of ``donors`` (free capacity: ``available`` when running, else the caps)."""
    owners: dict[str, int] = {}
    owner_codes = np.array([owners.setdefault(d.owner, len(owners)) for d in donors], dtype=np.int64)

    def col(values: list[float]) -> FloatArray:
        return np.array(values, dtype=np.float64)

    cpu_total = col([_amount(d.caps.cpus) for d in donors])
    gpu_total = col([_amount(d.caps.gpus) for d in donors])
    mem_total = col([_amount(d.caps.memory_bytes) for d in donors])
    # Never trust free > total: a stale report must not create capacity.
    cpu_free = np.minimum(col([_amount(d.free.cpus) for d in donors]), cpu_total)
    gpu_free = np.minimum(col([_amount(d.free.gpus) for d in donors]), gpu_total)
    mem_free = np.minimum(col([_amount(d.free.memory_bytes) for d in donors]), mem_total)
    usable = np.flatnonzero(np.array([d.is_donor and not d.draining for d in donors], dtype=bool))
    usable = usable.astype(np.int64)
    return DonorTable(
        node_ids=[d.node_id or "" for d in donors],
        donor_ids=[d.donor_id for d in donors],
        owner_codes=owner_codes,
        cpu_total=cpu_total,
        cpu_free=cpu_free,
        gpu_total=gpu_total,
        gpu_free=gpu_free,
        mem_total=mem_total,
        mem_free=mem_free,
        load=np.clip(col([d.load for d in donors]), 0.0, 1.0),
        gflops=np.maximum(col([d.gflops for d in donors]), 1e-3),
        shape=col([d.params.shape for d in donors]),
        scale_s=col([d.params.scale_s for d in donors]),
        start_s=col([d.since_s for d in donors]),
        usable=usable,
        gpu_usable=usable[gpu_total[usable] > 0],
        labels=[dict(d.labels) for d in donors],
        owner_index=owners,
        owner_names=list(owners),
        relayed=col([float(d.relayed) for d in donors]),
    )


EMPTY_TABLE = build_table(())


@dataclass(frozen=True)
class FleetView:
    """The fleet frozen at one instant.

    ``active``: donors in the Ray cluster (draining ones included, flagged), placement's
    candidates. ``activating``: donors told to join that have not yet. ``standby``: donors
    that could be activated now (fresh, owner away), as columns.
    """

    now_s: float
    active: tuple[FleetDonor, ...] = ()
    activating: tuple[FleetDonor, ...] = ()
    standby: DonorTable = EMPTY_TABLE
    # Owners with a fresh standby donor and none in the cluster, best first (a few): where a
    # replica that must not share an owner can go once the autoscaler activates it.
    spare_owners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not math.isfinite(self.now_s):
            raise ValueError(f"now_s must be finite, got {self.now_s!r}")
        object.__setattr__(self, "active", tuple(self.active))
        object.__setattr__(self, "activating", tuple(self.activating))
        object.__setattr__(self, "spare_owners", tuple(self.spare_owners))

    @cached_property
    def table(self) -> DonorTable:
        """The active donors as columns (built on first use, then cached)."""
        return build_table(self.active)

    def with_standby(self, donors: Sequence[FleetDonor]) -> FleetView:
        """This view with ``donors`` as its standby table (tests, the simulator)."""
        return FleetView(self.now_s, self.active, self.activating, build_table(donors), self.spare_owners)

    def best_spare_owners(self, limit: int = 32) -> tuple[str, ...]:
        """Owners of standby donors with no donor active or activating, best donor first."""
        t = self.standby
        if not len(t):
            return ()
        busy = {d.owner for d in self.active} | {d.owner for d in self.activating}
        value = donor_score(t.shape, t.scale_s, self.now_s - t.start_s, 3600.0, t.gflops)
        # The best few hundred are plenty to find ``limit`` free owners among.
        top = np.argpartition(-value, min(len(value) - 1, 16 * limit))[: 16 * limit + 1]
        out: list[str] = []
        for i in top[np.argsort(-value[top], kind="stable")]:
            owner = t.owner_names[int(t.owner_codes[i])]
            if owner not in busy and owner not in out:
                out.append(owner)
                if len(out) == limit:
                    break
        return tuple(out)

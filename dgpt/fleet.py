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
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, cast, overload

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
    #: What readers derived from this table once (it never changes): see ``FleetView.best_spare_owners``.
    memo: dict[Any, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.donor_ids)

    def free_of(self, i: int) -> Resources:
        """What donor ``i`` has free, as a :class:`Resources`."""
        return Resources(float(self.cpu_free[i]), float(self.gpu_free[i]), float(self.mem_free[i]))


def _amounts(values: FloatArray) -> FloatArray:
    """Finite positive amounts kept, anything else 0 (a bad report must not create capacity)."""
    return np.where(np.isfinite(values) & (values > 0), values, 0.0)


#: The amounts of a :class:`Resources`, in the column order of :class:`DonorColumns`.
_AMOUNTS = ("cpus", "gpus", "memory_bytes", "donors", "per_node_share")
_NONE_ROW = (math.nan,) * len(_AMOUNTS)


def _amount_row(r: Resources) -> tuple[float, ...]:
    return (r.cpus, r.gpus, r.memory_bytes, r.donors, r.per_node_share)


def _plain(r: Resources | None) -> bool:
    return r is None or (not r.label_selector and not r.per_node_key)


class DonorColumns(Sequence[FleetDonor]):
    """Donors held as columns, each built as a :class:`FleetDonor` only when it is read.

    It is how a fleet view's active donors cross processes: a placement view of 2,000
    donors pickles as a few arrays and lists instead of 6,000 small objects, and a driver
    that only scores them (:meth:`table`) never builds one. Reading an item (or iterating)
    builds it, exactly as it was: the columns are lossless, and the rare donor whose
    resources carry a label selector or a per-node key is kept whole in ``whole``.

    ``caps``/``available``: one row of :data:`_AMOUNTS` per donor, ``available`` NaN where
    it is None; ``reliability``: (shape, scale_s), NaN where None; ``numbers``: (gflops,
    since_s, idle_s, load); ``flags``: (draining, relayed).
    """

    __slots__ = ("donor_ids", "owners", "device_classes", "node_ids", "labels", "caps", "available",
                 "reliability", "numbers", "flags", "whole", "_built", "_table")

    def __init__(self, donor_ids: Sequence[str], owners: Sequence[str], device_classes: Sequence[str],
                 node_ids: Sequence[str | None], labels: Sequence[Mapping[str, str]], caps: FloatArray,
                 available: FloatArray, reliability: FloatArray, numbers: FloatArray, flags: BoolArray,
                 whole: Mapping[int, FleetDonor] | None = None) -> None:
        n = len(donor_ids)
        shapes = {"caps": (caps, len(_AMOUNTS)), "available": (available, len(_AMOUNTS)),
                  "reliability": (reliability, 2), "numbers": (numbers, 4), "flags": (flags, 2)}
        for name, (array, width) in shapes.items():
            if array.shape != (n, width):
                raise ValueError(f"DonorColumns.{name} must have shape ({n}, {width}), got {array.shape}")
        if not len(owners) == len(device_classes) == len(node_ids) == len(labels) == n:
            raise ValueError(f"DonorColumns: every column must hold {n} donors")
        self.donor_ids, self.owners, self.device_classes = list(donor_ids), list(owners), list(device_classes)
        self.node_ids, self.labels = list(node_ids), list(labels)
        self.caps, self.available, self.reliability, self.numbers, self.flags = caps, available, reliability, numbers, flags
        self.whole = dict(whole or {})
        self._built: list[FleetDonor | None] = [None] * n
        self._table: DonorTable | None = None

    @classmethod
    def of(cls, donors: Sequence[FleetDonor]) -> DonorColumns:
        """The columns of ``donors`` (``donors`` itself when it already is columns)."""
        if isinstance(donors, DonorColumns):
            return donors

        def matrix(rows: list[tuple[float, ...]], width: int) -> FloatArray:
            return np.array(rows, dtype=np.float64).reshape(len(rows), width)

        out = cls(
            [d.donor_id for d in donors], [d.owner for d in donors], [d.device_class for d in donors],
            [d.node_id for d in donors], [d.labels for d in donors],
            matrix([_amount_row(d.caps) for d in donors], len(_AMOUNTS)),
            matrix([_NONE_ROW if (a := d.available) is None else _amount_row(a) for d in donors], len(_AMOUNTS)),
            matrix([(math.nan, math.nan) if (r := d.reliability) is None else (r.shape, r.scale_s)
                    for d in donors], 2),
            matrix([(d.gflops, d.since_s, d.idle_s, d.load) for d in donors], 4),
            np.array([(d.draining, d.relayed) for d in donors], dtype=np.bool_).reshape(len(donors), 2),
            {i: d for i, d in enumerate(donors) if not (_plain(d.caps) and _plain(d.available))},
        )
        out._built = list(donors)
        return out

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return DonorColumns, (self.donor_ids, self.owners, self.device_classes, self.node_ids, self.labels,
                              self.caps, self.available, self.reliability, self.numbers, self.flags, self.whole)

    def __len__(self) -> int:
        return len(self.donor_ids)

    @overload
    def __getitem__(self, i: int) -> FleetDonor: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[FleetDonor, ...]: ...

    def __getitem__(self, i: int | slice) -> FleetDonor | tuple[FleetDonor, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        j = operator.index(i)
        j = j + len(self) if j < 0 else j
        if not 0 <= j < len(self):
            raise IndexError(f"donor index {i} out of range for {len(self)} donors")
        built = self._built[j]
        if built is None:
            built = self._built[j] = self.whole.get(j) or self._build(j)
        return built

    def __iter__(self) -> Iterator[FleetDonor]:
        built = self._built
        if None not in built:  # every donor at hand already (always so on the sending side)
            return iter(cast(list[FleetDonor], built))
        return (self[j] for j in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DonorColumns({len(self)} donors)"

    def _build(self, j: int) -> FleetDonor:
        c0, c1, c2, c3, c4 = self.caps[j].tolist()
        a0, a1, a2, a3, a4 = self.available[j].tolist()
        shape, scale_s = self.reliability[j].tolist()
        gflops, since_s, idle_s, load = self.numbers[j].tolist()
        draining, relayed = self.flags[j].tolist()
        return FleetDonor(
            self.donor_ids[j], self.owners[j], self.device_classes[j], Resources(c0, c1, c2, {}, c3, "", c4),
            None if math.isnan(a0) else Resources(a0, a1, a2, {}, a3, "", a4), gflops, self.labels[j],
            None if math.isnan(shape) else WeibullParams(shape, scale_s), since_s, self.node_ids[j], idle_s, load,
            draining, relayed)

    def with_free(self, free: Mapping[str, Resources]) -> DonorColumns:
        """These donors with the free resources of the named ones (by donor id) replaced."""
        available = self.available.copy()
        for j, donor_id in enumerate(self.donor_ids):
            if donor_id in free:
                available[j] = _amount_row(free[donor_id])
        return DonorColumns(self.donor_ids, self.owners, self.device_classes, self.node_ids, self.labels, self.caps,
                            available, self.reliability, self.numbers, self.flags,
                            {j: replace(d, available=free[d.donor_id]) if d.donor_id in free else d
                             for j, d in self.whole.items()})

    def table(self) -> DonorTable:
        """These donors as a :class:`DonorTable` (free capacity: ``available`` when running,
        else the caps; never more than the caps), without building a single donor. Built once."""
        if self._table is None:
            self._table = self._make_table()
        return self._table

    def _make_table(self) -> DonorTable:
        caps = _amounts(self.caps[:, :3])
        raw_free = np.where(np.isnan(self.available[:, :1]), self.caps[:, :3], self.available[:, :3])
        free = np.minimum(_amounts(raw_free), caps)
        shape, scale_s = self.reliability[:, 0].copy(), self.reliability[:, 1].copy()
        for j in np.flatnonzero(np.isnan(shape)).tolist():
            prior = prior_for(self.device_classes[j])
            shape[j], scale_s[j] = prior.shape, prior.scale_s
        owners: dict[str, int] = {}
        owner_codes = np.array([owners.setdefault(o, len(owners)) for o in self.owners], dtype=np.int64)
        is_donor = np.array([lab.get(contract.LABEL_ROLE, contract.ROLE_DONOR) != contract.ROLE_HEAD
                             for lab in self.labels], dtype=np.bool_)
        usable = np.flatnonzero(is_donor & ~self.flags[:, 0]).astype(np.int64)
        gflops, since_s, _, load = self.numbers.T
        return DonorTable(
            node_ids=[n or "" for n in self.node_ids],
            donor_ids=list(self.donor_ids),
            owner_codes=owner_codes,
            cpu_total=caps[:, 0].copy(),
            cpu_free=free[:, 0].copy(),
            gpu_total=caps[:, 1].copy(),
            gpu_free=free[:, 1].copy(),
            mem_total=caps[:, 2].copy(),
            mem_free=free[:, 2].copy(),
            load=np.clip(load, 0.0, 1.0),
            gflops=np.maximum(gflops, 1e-3),
            shape=shape,
            scale_s=scale_s,
            start_s=since_s.copy(),
            usable=usable,
            gpu_usable=usable[caps[usable, 1] > 0],
            labels=[dict(lab) for lab in self.labels],
            owner_index=owners,
            owner_names=list(owners),
            relayed=self.flags[:, 1].astype(np.float64),
        )


def build_table(donors: Sequence[FleetDonor]) -> DonorTable:
    """Columns of ``donors`` for scoring (free capacity: ``available`` when running, else the caps)."""
    return DonorColumns.of(donors).table()


EMPTY_TABLE = build_table(())


@dataclass(frozen=True)
class FleetView:
    """The fleet frozen at one instant.

    ``active``: donors in the Ray cluster (draining ones included, flagged), placement's
    candidates. ``activating``: donors told to join that have not yet. ``standby``: donors
    that could be activated now (fresh, owner away), as columns.

    A view pickles its active donors as :class:`DonorColumns`: a driver that unpickles one
    scores them from :attr:`table` without building each donor.
    """

    now_s: float
    active: Sequence[FleetDonor] = ()
    activating: tuple[FleetDonor, ...] = ()
    standby: DonorTable = EMPTY_TABLE
    # Owners with a fresh standby donor and none in the cluster, best first (a few): where a
    # replica that must not share an owner can go once the autoscaler activates it.
    spare_owners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not math.isfinite(self.now_s):
            raise ValueError(f"now_s must be finite, got {self.now_s!r}")
        if not isinstance(self.active, DonorColumns):
            object.__setattr__(self, "active", tuple(self.active))
        object.__setattr__(self, "activating", tuple(self.activating))
        object.__setattr__(self, "spare_owners", tuple(self.spare_owners))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return FleetView, (self.now_s, DonorColumns.of(self.active), self.activating, self.standby,
                           self.spare_owners)

    @cached_property
    def table(self) -> DonorTable:
        """The active donors as columns (built on first use, then cached)."""
        return build_table(self.active)

    def with_standby(self, donors: Sequence[FleetDonor]) -> FleetView:
        """This view with ``donors`` as its standby table (tests, the simulator)."""
        return FleetView(self.now_s, self.active, self.activating, build_table(donors), self.spare_owners)

    def best_spare_owners(self, limit: int = 32) -> tuple[str, ...]:
        """Owners of standby donors with no donor active or activating, best donor first.

        The standby donors are ranked once per standby table (the registry hands the same
        table to every view for up to ``STANDBY_VIEW_MAX_AGE_S``; its donors' scores age by
        those few seconds), so a placement view costs no scoring of the whole standby fleet.
        """
        t = self.standby
        if not len(t):
            return ()
        ranked = t.memo.get(("spare owners", limit))
        if ranked is None:
            value = donor_score(t.shape, t.scale_s, self.now_s - t.start_s, 3600.0, t.gflops)
            # The best few hundred are plenty to find ``limit`` free owners among.
            top = np.argpartition(-value, min(len(value) - 1, 16 * limit))[: 16 * limit + 1]
            best = top[np.argsort(-value[top], kind="stable")]
            ranked = t.memo[("spare owners", limit)] = tuple(
                dict.fromkeys(t.owner_names[int(c)] for c in t.owner_codes[best]))
        busy = {d.owner for d in self.active} | {d.owner for d in self.activating}
        return tuple(o for o in ranked if o not in busy)[:limit]

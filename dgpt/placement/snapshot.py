"""The frozen cluster view placement decides on: one NodeView per active Ray node, plus a clock.

:class:`ClusterSnapshot` is what the live source (``dgpt.placement.live``) or a test builds.
:class:`NodeTable` is the same data as columns of numpy arrays, built once per snapshot, so a
policy can score hundreds of candidates with a few vector operations instead of a Python
loop over 100k nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

from dgpt.placement import labels as lbl
from dgpt.reliability.model import WeibullParams, prior_for

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Mean CPU GFLOPS of the BOINC fleet (Anderson 2020): speeds are scored relative to it.
REFERENCE_GFLOPS = 16.5


@dataclass(frozen=True)
class NodeView:
    """One active donor node as placement sees it.

    ``total`` and ``available`` map Ray resource names (``"CPU"``, ``"GPU"``, ``"memory"``
    in bytes, custom ones) to amounts. ``load`` is the owner's plus Ray's load, 0..1.
    ``reliability`` is the donor's fitted uptime distribution and ``session_start_s`` when
    its current session began (same clock as :attr:`ClusterSnapshot.now_s`).
    """

    node_id: str
    donor_id: str
    owner: str
    device_class: str
    gpu: str | None
    total: Mapping[str, float]
    available: Mapping[str, float]
    load: float = 0.0
    gflops: float = REFERENCE_GFLOPS
    draining: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    reliability: WeibullParams | None = None
    session_start_s: float = 0.0

    @property
    def params(self) -> WeibullParams:
        """The donor's reliability, or its device-class prior when none was fitted."""
        return self.reliability or prior_for(self.device_class)

    @property
    def is_donor(self) -> bool:
        """False for the head (role label ``head``), which never takes user work."""
        return self.labels.get(lbl.ROLE, lbl.ROLE_DONOR) != lbl.ROLE_HEAD


@dataclass(frozen=True)
class NodeTable:
    """Columnar, read-only view of the nodes for vectorised scoring.

    Index ``i`` in every array is the same node. ``usable`` lists the indices of nodes that
    may take new work (donors, not draining); ``gpu_usable`` the subset with GPUs.
    ``owner_index`` maps an owner's name to its ``owner_codes`` value. A
    simulator may own a table and update its arrays between decisions; policies never
    write to it.
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

    def __len__(self) -> int:
        return len(self.node_ids)


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every active node and the clock, frozen at one instant."""

    nodes: tuple[NodeView, ...]
    now_s: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.now_s):
            raise ValueError(f"now_s must be finite, got {self.now_s!r}")
        object.__setattr__(self, "nodes", tuple(self.nodes))

    @cached_property
    def table(self) -> NodeTable:
        """The nodes as numpy columns (built on first use, then cached)."""
        return build_table(self.nodes)


def _amount(resources: Mapping[str, float], key: str) -> float:
    value = float(resources.get(key, 0.0))
    return value if math.isfinite(value) and value > 0 else 0.0


def build_table(nodes: Sequence[NodeView]) -> NodeTable:
    """Columns of ``nodes`` for :mod:`dgpt.placement.policy`."""
    owners: dict[str, int] = {}
    owner_codes = np.array([owners.setdefault(n.owner, len(owners)) for n in nodes], dtype=np.int64)

    def col(values: list[float]) -> FloatArray:
        return np.array(values, dtype=np.float64)

    cpu_total = col([_amount(n.total, "CPU") for n in nodes])
    gpu_total = col([_amount(n.total, "GPU") for n in nodes])
    mem_total = col([_amount(n.total, "memory") for n in nodes])
    # Never trust available > total: a stale report must not create capacity.
    cpu_free = np.minimum(col([_amount(n.available, "CPU") for n in nodes]), cpu_total)
    gpu_free = np.minimum(col([_amount(n.available, "GPU") for n in nodes]), gpu_total)
    mem_free = np.minimum(col([_amount(n.available, "memory") for n in nodes]), mem_total)
    usable_mask = np.array([n.is_donor and not n.draining for n in nodes], dtype=bool)
    usable = np.flatnonzero(usable_mask).astype(np.int64)
    return NodeTable(
        node_ids=[n.node_id for n in nodes],
        donor_ids=[n.donor_id for n in nodes],
        owner_codes=owner_codes,
        cpu_total=cpu_total,
        cpu_free=cpu_free,
        gpu_total=gpu_total,
        gpu_free=gpu_free,
        mem_total=mem_total,
        mem_free=mem_free,
        load=np.clip(col([n.load for n in nodes]), 0.0, 1.0),
        gflops=np.maximum(col([n.gflops for n in nodes]), 1e-3),
        shape=col([n.params.shape for n in nodes]),
        scale_s=col([n.params.scale_s for n in nodes]),
        start_s=col([n.session_start_s for n in nodes]),
        usable=usable,
        gpu_usable=usable[gpu_total[usable] > 0],
        labels=[dict(n.labels) for n in nodes],
        owner_index=owners,
    )

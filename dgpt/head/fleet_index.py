"""The fleet view kept up to date incrementally, so taking one never walks the whole fleet.

The registry tells the index about every donor whose lifecycle, caps or Ray usage changed
(:meth:`FleetIndex.put`) and about every heartbeat (:meth:`FleetIndex.touch`). Active and
activating donors are kept as :class:`~dgpt.fleet.FleetDonor` objects (there are at most a
few thousand: Ray's envelope), the active ones also as columns until one changes; standby donors, who may number 100k, are kept as numpy
columns with reusable slots. :meth:`FleetIndex.view` copies the columns of the standby
donors whose heartbeat is still fresh: O(active) Python work plus a few array copies.
Not thread-safe by itself: the registry calls it under its lock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np

from dgpt.fleet import DonorColumns, DonorTable, FleetDonor, FleetView

_INITIAL_SLOTS = 1024


class Role(enum.Enum):
    """Which part of the fleet view a donor belongs in."""

    ACTIVE = "active"  # in the Ray cluster: placement's candidates
    ACTIVATING = "activating"  # told to join, not seen in Ray yet
    STANDBY = "standby"  # could be activated (fresh heartbeats permitting)
    NONE = "none"  # owner active, gone, draining without a node: in no part


class FleetIndex:
    """Active, activating and standby donors, maintained as they change."""

    def __init__(self) -> None:
        self._active: dict[str, FleetDonor] = {}
        self._active_columns: DonorColumns | None = None  # of _active; None once it changed
        self._activating: dict[str, tuple[FleetDonor, float]] = {}
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._size = 0
        # Owner codes only grow and never change meaning, so views may share the mapping.
        self._owner_codes: dict[str, int] = {}
        self._owner_names: list[str] = []
        self._alloc(_INITIAL_SLOTS)

    def _alloc(self, n: int) -> None:
        def grow(old: np.ndarray | None, dtype: type, fill: object) -> np.ndarray:
            arr: np.ndarray = np.full(n, fill, dtype=dtype)
            if old is not None:
                arr[: old.size] = old
            return arr

        old = getattr(self, "_used", None)
        self._used = grow(old, bool, False)
        self._deadline = grow(getattr(self, "_deadline", None), np.float64, -np.inf)
        self._cpus = grow(getattr(self, "_cpus", None), np.float64, 0.0)
        self._gpus = grow(getattr(self, "_gpus", None), np.float64, 0.0)
        self._mem = grow(getattr(self, "_mem", None), np.float64, 0.0)
        self._gflops = grow(getattr(self, "_gflops", None), np.float64, 1.0)
        self._shape = grow(getattr(self, "_shape", None), np.float64, 1.0)
        self._scale = grow(getattr(self, "_scale", None), np.float64, 1.0)
        self._since = grow(getattr(self, "_since", None), np.float64, 0.0)
        self._owner = grow(getattr(self, "_owner", None), np.int64, 0)
        self._ids = grow(getattr(self, "_ids", None), object, "")
        self._labels = grow(getattr(self, "_labels", None), object, None)
        self._relayed = grow(getattr(self, "_relayed", None), np.float64, 0.0)

    # ------------------------------------------------------------ updates

    def put(self, donor: FleetDonor, role: Role, deadline: float) -> None:
        """Place ``donor`` in the part of the view its ``role`` names (and no other).

        ``deadline`` is when its heartbeat stops being fresh; stale standby and activating
        donors are left out of views (they may be gone).
        """
        donor_id = donor.donor_id
        if role is Role.ACTIVE or donor_id in self._active:
            self._active_columns = None
        if role is not Role.ACTIVE:
            self._active.pop(donor_id, None)
        if role is not Role.ACTIVATING:
            self._activating.pop(donor_id, None)
        if role is not Role.STANDBY:
            self._release(donor_id)
        if role is Role.ACTIVE:
            self._active[donor_id] = donor
        elif role is Role.ACTIVATING:
            self._activating[donor_id] = (donor, deadline)
        elif role is Role.STANDBY:
            self._store_standby(donor, deadline)

    def touch(self, donor_id: str, deadline: float) -> None:
        """A heartbeat arrived: the donor stays fresh until ``deadline``."""
        slot = self._slot.get(donor_id)
        if slot is not None:
            self._deadline[slot] = deadline
        elif donor_id in self._activating:
            donor, _ = self._activating[donor_id]
            self._activating[donor_id] = (donor, deadline)

    def remove(self, donor_id: str) -> None:
        self.put(FleetDonor(donor_id), Role.NONE, -np.inf)

    def _release(self, donor_id: str) -> None:
        slot = self._slot.pop(donor_id, None)
        if slot is not None:
            self._used[slot] = False
            self._labels[slot] = None
            self._free.append(slot)

    def _store_standby(self, d: FleetDonor, deadline: float) -> None:
        slot = self._slot.get(d.donor_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                if self._size == self._used.size:
                    self._alloc(2 * self._used.size)
                slot = self._size
                self._size += 1
            self._slot[d.donor_id] = slot
        params = d.params
        self._used[slot] = True
        self._deadline[slot] = deadline
        self._cpus[slot] = d.caps.cpus
        self._gpus[slot] = d.caps.gpus
        self._mem[slot] = d.caps.memory_bytes
        self._gflops[slot] = max(d.gflops, 1e-3)
        self._shape[slot] = params.shape
        self._scale[slot] = params.scale_s
        self._since[slot] = d.since_s
        code = self._owner_codes.get(d.owner)
        if code is None:
            code = self._owner_codes[d.owner] = len(self._owner_names)
            self._owner_names.append(d.owner)
        self._owner[slot] = code
        self._ids[slot] = d.donor_id
        self._labels[slot] = d.labels
        self._relayed[slot] = float(d.relayed)

    # ------------------------------------------------------------ reads

    def active(self) -> list[FleetDonor]:
        return list(self._active.values())

    def active_columns(self) -> DonorColumns:
        """The active donors as columns, built again only after one of them changed: every
        view until then shares them, and a placement view pickles them as they are."""
        if self._active_columns is None:
            self._active_columns = DonorColumns.of(tuple(self._active.values()))
        return self._active_columns

    def view(self, now: float) -> FleetView:
        """The fleet frozen now: active and fresh activating donors, fresh standby columns."""
        n = self._size
        sel = np.flatnonzero(self._used[:n] & (self._deadline[:n] >= now))
        cpus, gpus, mem = self._cpus[sel], self._gpus[sel], self._mem[sel]
        usable = np.arange(sel.size, dtype=np.int64)
        standby = DonorTable(
            # Object arrays: indexing copies references in C, not 100k Python appends.
            node_ids=cast(Sequence[str], np.full(sel.size, "", dtype=object)),
            donor_ids=cast(Sequence[str], self._ids[sel]),
            owner_codes=self._owner[sel],
            cpu_total=cpus,
            cpu_free=cpus,
            gpu_total=gpus,
            gpu_free=gpus,
            mem_total=mem,
            mem_free=mem,
            load=np.zeros(sel.size),
            gflops=self._gflops[sel],
            shape=self._shape[sel],
            scale_s=self._scale[sel],
            start_s=self._since[sel],
            usable=usable,
            gpu_usable=usable[gpus > 0],
            labels=cast(Sequence[Mapping[str, str]], self._labels[sel]),
            owner_index=self._owner_codes,
            owner_names=self._owner_names,
            relayed=self._relayed[sel],
        )
        activating = tuple(d for d, deadline in self._activating.values() if deadline >= now)
        return FleetView(now_s=now, active=self.active_columns(), activating=activating, standby=standby)

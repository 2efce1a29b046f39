"""Placement: pure scoring over the fleet view, and the Ray options it emits.

    f.options(**dgpt.placement.options("batch", num_cpus=2)).remote()
    pg = dgpt.placement.gang("training", [{"CPU": 4}] * 8, horizon_s=4 * 3600)

Only :func:`gang` touches Ray (imported inside it); without a ``snapshot`` both read the
live fleet through ``dgpt.placement.live.current_snapshot``.
"""

from dgpt.fleet import DonorTable, FleetDonor, FleetView
from dgpt.placement.options import gang, options
from dgpt.placement.policy import (
    Placement,
    Unplaced,
    WorkloadKind,
    place_gang,
    place_replicas,
    place_task,
)
from dgpt.resources import Resources

__all__ = [
    "DonorTable",
    "FleetDonor",
    "FleetView",
    "Placement",
    "Resources",
    "Unplaced",
    "WorkloadKind",
    "gang",
    "options",
    "place_gang",
    "place_replicas",
    "place_task",
]

"""Placement: pure scoring over a cluster snapshot, and the Ray options it emits.

    f.options(**dgpt.placement.options("batch", num_cpus=2)).remote()
    pg = dgpt.placement.gang("training", [{"CPU": 4}] * 8, horizon_s=4 * 3600)

Only :func:`gang` touches Ray (imported inside it); without a ``snapshot`` both read the
live cluster through ``dgpt.placement.live.current_snapshot``.
"""

from dgpt.placement.options import gang, options
from dgpt.placement.policy import (
    Placement,
    ResourceRequest,
    Unplaced,
    WorkloadKind,
    place_gang,
    place_replicas,
    place_task,
)
from dgpt.placement.snapshot import ClusterSnapshot, NodeTable, NodeView

__all__ = [
    "ClusterSnapshot",
    "NodeTable",
    "NodeView",
    "Placement",
    "ResourceRequest",
    "Unplaced",
    "WorkloadKind",
    "gang",
    "options",
    "place_gang",
    "place_replicas",
    "place_task",
]

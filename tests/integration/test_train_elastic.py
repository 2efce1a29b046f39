"""An elastic run grows onto a standby donor that its own demand activated (`dgpt up --min-active 2`).

Ray Train registers ``max_workers`` bundles with the autoscaling coordinator, which turns
them into ``request_resources``; dgpt's autoscaler sees that demand, activates the standby
donor, and once it has joined, Ray Train resizes the worker group onto it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from tests.integration.train_support import (
    MIN_ACCURACY,
    attempts,
    donor_ids,
    start_run,
    train_fabric,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def standby_fabric() -> Iterator[Settings]:
    yield from train_fabric(3, "dgpt-it-elastic-", min_active=2)


def test_a_standby_donor_activated_by_train_demand_joins_the_elastic_run(standby_fabric: Settings) -> None:
    with fabric.api_client(standby_fabric) as client:
        before = {d.name: d for d in client.donors()}
    (standby,) = [n for n, d in before.items() if d.state == "standby"]
    assert not before[standby].sessions, f"{standby} has not been activated yet"
    started = time.time()
    run = start_run(standby_fabric, "grow", "--workers", "1", "3", "--steps", "600", "--checkpoint-every", "50",
                    "--resize-interval-s", "5")
    result = run.result(timeout_s=420)
    assert result["ok"], result["error"]
    assert result["return"]["accuracy"] >= MIN_ACCURACY
    standby_id = donor_ids(standby_fabric)[standby]
    assert standby_id in result["plan"]["donors"], "standby donors are eligible"
    with fabric.api_client(standby_fabric) as client:
        joined = {d.name: d for d in client.donors()}[standby]
    assert joined.sessions and joined.sessions[0].started_at > started, f"the run's demand activated {standby}"
    grown = [a for a in attempts(result["events"]) if standby_id in a["donors"]]
    assert grown and grown[0]["world_size"] == 3, f"the run grew onto {standby}"
    assert result["return"]["world_size"] == 3

"""The control plane's door: JSON requests only, checked against the methods' annotations."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest

from dgpt.exceptions import InvalidRequest
from dgpt.head.control_link import ControlPlaneDoor, LinkServer, Pickled, answer, call_link
from dgpt.verify.trust import DonorOutcome


class FakePlane:
    """The door's side of the control plane: the allowed method names, typed like the real one."""

    def __init__(self) -> None:
        self.recorded: list[Any] = []

    def ping(self) -> str:
        return "ok"

    def node_states(self) -> dict[str, Any]:
        return {"n1": {"state": "active"}}

    placement_view = training_fleet = checkpoint_tier = autoscaler_status = node_states

    def autoscaler_ticks(self, start: float, end: float) -> list[float]:
        return [end - start]

    def void_credit(self, donor_id: str, start_at: float, end_at: float, reason: str) -> dict[str, Any]:
        return {"donor_id": donor_id, "span": end_at - start_at, "reason": reason}

    def trust_records(self, donor_ids: list[str]) -> dict[str, Any]:
        return dict.fromkeys(donor_ids)

    def record_trust(self, outcomes: list[DonorOutcome]) -> list[Any]:
        self.recorded += outcomes
        return [o.donor_id for o in outcomes]

    def record_verification(self, outcome: str) -> None:
        self.recorded.append(outcome)

    def report_durability_margin(self, margin: float) -> None:
        self.recorded.append(margin)

    def storage_call(self, method: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
        return "ok", (method, kwargs)

    def fleet_timings(self, n: int = 20) -> dict[str, float]:
        return {"n": float(n)}

    def secret(self) -> str:  # not a door method: never reachable
        return "the api key"


def _req(method: str, **args: Any) -> bytes:
    return json.dumps({"method": method, "args": args}).encode()


def test_only_the_listed_methods_answer() -> None:
    from dgpt.head.control_link import _decoders

    calls = _decoders(FakePlane())
    status, exc = answer(calls, _req("secret"))
    assert status == "error" and isinstance(exc, InvalidRequest) and exc.status_code == 404 and "secret" in exc.message
    assert answer(calls, _req("ping")) == ("ok", "ok")


def test_a_pickle_is_refused_unread() -> None:
    from dgpt.head.control_link import _decoders

    status, exc = answer(_decoders(FakePlane()), pickle.dumps(("ping", {})))
    assert status == "error" and exc.status_code == 400 and "not JSON" in exc.message


def test_arguments_are_checked_against_the_annotations() -> None:
    from dgpt.head.control_link import _decoders

    plane = FakePlane()
    calls = _decoders(plane)
    status, exc = answer(calls, _req("void_credit", donor_id="d-1", start_at="soon", end_at=2.0, reason="x"))
    assert status == "error" and exc.status_code == 422 and "start_at" in exc.message
    status, exc = answer(calls, _req("record_verification", outcome="ok", extra=1))
    assert status == "error" and exc.status_code == 422 and "extra" in exc.message
    assert plane.recorded == []


def test_outcomes_cross_as_json_and_arrive_as_donor_outcomes(tmp_path: Path) -> None:
    plane = FakePlane()
    server = LinkServer(plane, tmp_path / "control.sock").start()
    try:
        door = ControlPlaneDoor(str(tmp_path / "control.sock"))
        outcome = DonorOutcome(donor_id="d-1", task_id="t-1", outcome="invalid", reason="differs", at=5.0)
        assert door.record_trust([outcome]) == ["d-1"]
        assert plane.recorded == [outcome]
        with pytest.raises(InvalidRequest, match="DonorOutcome"):
            door.record_trust([{"donor_id": "d-1"}])
        assert door.void_credit("d-2", 1.0, 4.0, "failed") == {"donor_id": "d-2", "span": 3.0, "reason": "failed"}
        assert door.fleet_timings(3) == {"n": 3.0}
        assert door.autoscaler_ticks(1.0, 3.5) == [2.5]
        # Large answers pass the door still pickled: Ray's pickling of them hands the bytes on.
        handed = door.placement_view()
        assert isinstance(handed, Pickled) and pickle.loads(pickle.dumps(handed)) == plane.node_states()
        status, value = door.storage_call("no_such_call", {})
        assert status == "error" and "no_such_call" in value.message
        # Many callers at once, each answered on its own connection.
        answers: list[Any] = []
        threads = [threading.Thread(target=lambda: answers.append(door.ping())) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == ["ok"] * 16
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_control_plane_is_named_after_the_wait(tmp_path: Path) -> None:
    from dgpt.exceptions import FabricError

    with pytest.raises(FabricError, match="no control plane answers on"):
        call_link(tmp_path / "none.sock", "ping", {}, wait_s=0.3)

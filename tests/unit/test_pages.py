"""The pages and the routes behind them, over real HTTP (uvicorn) on a real registry and SQLite
file, without Ray: the pages and their assets as the head serves them, the pause and resume of
a donor by its owner and by an operator, the donor's own view, the fleet's ended sessions, and
the series the plots draw (fleet size, credit) with the endpoints list built from Serve's
answer. The browser test on a real fabric is tests/integration/test_pages.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgpt.contract import DonorState, PausedBy, Target
from dgpt.credit.meter import Interval
from dgpt.credit.unit import ResourceSeconds, Weights
from dgpt.exceptions import AuthError, Conflict, NotFound
from dgpt.head import pages
from dgpt.head.pages import credit_points, endpoint_views
from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import Heartbeat, RegisterResponse
from tests.unit.conftest import ApiServer
from tests.unit.test_api import _join_token, _req

#: What Ray's dashboard answers for two apps (the fields dgpt reads), replicas on two donors and the head.
SERVE_DETAILS: dict[str, Any] = {
    "controller_info": {"node_id": "head-node"},
    "applications": {
        "digits": {"route_prefix": "/digits", "status": "RUNNING", "message": "", "deployments": {
            "Model": {"replicas": [{"node_id": "node-a", "state": "RUNNING"}, {"node_id": "node-a", "state": "RUNNING"},
                                   {"node_id": "node-b", "state": "STARTING"}, {"node_id": "head-node",
                                                                                "state": "RUNNING"}]},
            "Ingress": {"replicas": [{"node_id": "0123456789abcdef", "state": "RUNNING"}]}}},
        "broken": {"route_prefix": None, "status": "DEPLOY_FAILED", "message": "no module named x", "deployments": {}},
    },
}


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ApiServer, list[Any]]]:
    """The API with Serve's answer faked (``answers[0]``: the details, or an exception to raise)."""
    answers: list[Any] = [SERVE_DETAILS]

    def read() -> dict[str, Any]:
        if isinstance(answers[0], Exception):
            raise answers[0]
        return dict(answers[0])

    monkeypatch.setattr(pages, "_default_serve_details", lambda registry: read)
    server = ApiServer(tmp_path)
    yield server, answers
    server.stop()


def _registered(server: ApiServer, name: str = "alice-laptop") -> RegisterResponse:
    with DonorClient(server.url) as d:
        reg = d.register(_req(name), _join_token(server))
        d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="standby"))
    return reg


# ---------------------------------------------------------------- the pages


def test_the_pages_and_their_assets_are_served_with_a_strict_policy(api_server: ApiServer) -> None:
    for path, marker in (("/pages/operator", 'id="fleet-plot"'), ("/pages/donor", 'id="pause-switch"'),
                         ("/pages/", 'href="operator"')):
        r = httpx.get(f"{api_server.url}{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and marker in r.text, path
        assert "script-src 'self'" in r.headers["content-security-policy"], path
        # Everything a page loads comes from the head: no other host, no inline script.
        for src in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert src.startswith(("assets/", "data:")) or src in ("operator", "donor"), (path, src)
        assert not re.search(r"<script>(?!</script>)", r.text), path
        for asset in re.findall(r'(?:src|href)="assets/([^"]+)"', r.text):
            got = httpx.get(f"{api_server.url}/pages/assets/{asset}")
            assert got.status_code == 200 and got.headers["x-content-type-options"] == "nosniff", asset
            assert got.headers["content-type"].startswith("text/javascript" if asset.endswith(".js") else "text/css")
            text = got.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace name, never loaded
            assert "http://" not in text and "https://" not in text, f"{asset} loads from another host"


def test_only_the_pages_assets_are_served(api_server: ApiServer) -> None:
    r = httpx.get(f"{api_server.url}/pages/assets/missing.js")
    assert r.status_code == 404 and "common.js" in r.json()["hint"]
    for bad in ("..%2Fpages.py", "operator.html", "x.py"):
        r = httpx.get(f"{api_server.url}/pages/assets/{bad}")
        assert r.status_code == 422 and "name" in r.json()["message"], bad


def test_the_pages_are_package_data(api_server: ApiServer) -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dgpt.head"]
    shipped = {p.name for pattern in patterns for p in pages.PAGES_DIR.parent.glob(pattern) if p.parent == pages.PAGES_DIR}
    assert shipped == {p.name for p in pages.PAGES_DIR.iterdir()}, "every page file is packaged"


# ---------------------------------------------------------------- pause and resume


def test_a_donor_pauses_and_resumes_itself_with_its_secret(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    with DonorClient(api_server.url) as d:
        paused = d.pause(reg.donor_id, reg.donor_secret)
        assert (paused.paused, paused.paused_by, paused.state) == (True, PausedBy.DONOR, DonorState.STANDBY)
        own = d.donor(reg.donor_id, reg.donor_secret)
        assert own.paused and own.paused_by is PausedBy.DONOR and own.paused_at == paused.paused_at
        # The autoscaler wants it: it stays out, and its heartbeat says why.
        api_server.registry.set_target(reg.donor_id, Target.ACTIVE)
        beat = d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="standby"))
        assert beat.action.value == "standby" and beat.ray is None and "paused" in beat.reason
        resumed = d.resume(reg.donor_id, reg.donor_secret)
        assert not resumed.paused and not d.donor(reg.donor_id, reg.donor_secret).paused
    with Client(api_server.url, api_server.api_key) as c:
        view = c.donor(reg.donor_id)
    assert not view.paused and view.paused_by is None


def test_an_operator_pauses_with_an_api_key_and_only_an_operator_lifts_it(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    with Client(api_server.url, api_server.api_key) as c, DonorClient(api_server.url) as d:
        assert c.pause_donor(reg.donor_id).paused_by is PausedBy.OPERATOR
        assert c.donor(reg.donor_id).paused
        with pytest.raises(Conflict) as err:
            d.resume(reg.donor_id, reg.donor_secret)
        assert err.value.status_code == 409 and "operator" in err.value.message
        assert not c.resume_donor(reg.donor_id).paused
        with pytest.raises(NotFound):
            c.pause_donor("d-nobody")


def test_pause_refuses_other_credentials_alike_and_stores_nothing(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    other = _registered(api_server, "bob-desktop")
    for path in (f"donors/{reg.donor_id}/pause", f"donors/{reg.donor_id}/resume", "donors/d-nobody/pause"):
        for headers in ({}, {"Authorization": f"Bearer {other.donor_secret}"}, {"Authorization": "Bearer x" * 3}):
            r = httpx.post(f"{api_server.api}/{path}", headers=headers)
            assert r.status_code == 401 and set(r.json()) >= {"error", "message", "hint"}, (path, headers, r.text)
    assert not api_server.registry.donor_view(reg.donor_id).paused
    with DonorClient(api_server.url) as d, pytest.raises(AuthError):
        d.donor(reg.donor_id, other.donor_secret)  # one donor cannot read another's view


# ---------------------------------------------------------------- what the operator page lists and plots


def test_ended_sessions_list_the_fleets_drains_and_losses(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    registry = api_server.registry
    registry.record_session(reg.donor_id, 100.0, 400.0, "lost")
    registry.record_session(reg.donor_id, 500.0, 900.0, "drained")
    with Client(api_server.url, api_server.api_key) as c:
        ended = c.ended_sessions()
        assert [(s.donor_name, s.ended_as.value if s.ended_as else None, s.ended_at) for s in ended] == [
            ("alice-laptop", "drained", 900.0), ("alice-laptop", "lost", 400.0)]
        assert len(c.ended_sessions(limit=1)) == 1
    r = httpx.get(f"{api_server.api}/sessions?limit=0", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "limit" in r.json()["message"]


def test_fleet_history_ends_with_the_fleet_now(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    with Client(api_server.url, api_server.api_key) as c:
        history = c.fleet_history()
        assert history.step_s == 10.0 and history.points[-1].donors_by_state == {"standby": 1}
        assert c.fleet_history(since=history.points[-1].at + 1).points[-1].donors_by_state == {"standby": 1}
        c.pause_donor(reg.donor_id)  # a paused donor is still counted by its state
        assert c.fleet_history().points[-1].donors_by_state == {"standby": 1}
    assert httpx.get(f"{api_server.api}/cluster/history").status_code == 401


def test_credit_history_sums_the_ledger_per_interval_up_to_the_total(api_server: ApiServer) -> None:
    reg = _registered(api_server)
    book = api_server.app.state.credit
    now = book.clock()
    weights = Weights(cpu=1.0, gpu=0.0, memory=0.0)
    book.record([Interval(reg.donor_id, 1, "n1", now - 7200 - 30, now - 7200, ResourceSeconds(10.0, 0, 0), weights),
                 # Mid-interval, whatever the few milliseconds until the head reads its clock.
                 Interval(reg.donor_id, 1, "n1", now - 1330, now - 1300, ResourceSeconds(4.0, 0, 0), weights),
                 Interval(reg.donor_id, 1, "n1", now - 430, now - 400, ResourceSeconds(2.0, 0, 0), weights)])
    with Client(api_server.url, api_server.api_key) as c:
        history = c.credit_history(window_s=3600, points=4)
    assert history.total_credit == pytest.approx(16.0) and history.step_s == 900
    assert [p.credit for p in history.points] == pytest.approx([0.0, 0.0, 4.0, 2.0])
    assert [p.total_credit for p in history.points] == pytest.approx([10.0, 10.0, 14.0, 16.0]), \
        "the row before the window counts in every total"
    assert history.points[-1].end_at == pytest.approx(now, abs=5)
    r = httpx.get(f"{api_server.api}/credit/history?points=0", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "points" in r.json()["message"]


def test_credit_points_count_rows_after_the_window_as_later() -> None:
    points = credit_points({0: 1.0, 2: 3.0, 5: 0.5}, total_now=10.0, since=0.0, step_s=10.0, n=3)
    assert [(p.start_at, p.end_at, p.credit, p.total_credit) for p in points] == [
        (0.0, 10.0, 1.0, 6.5), (10.0, 20.0, 0.0, 6.5), (20.0, 30.0, 3.0, 9.5)]


def test_endpoints_count_running_replicas_per_donor(served: tuple[ApiServer, list[Any]]) -> None:
    server, answers = served
    reg = _registered(server)
    registry = server.registry
    registry.set_target(reg.donor_id, Target.ACTIVE)
    with DonorClient(server.url) as d:
        d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="starting"))
    with Client(server.url, server.api_key) as c:
        before = {e.app: e for e in c.endpoints()}
        assert before["digits"].replicas == {"01234567": 1, "head": 1, "node-a": 2}, "node-a is no donor's yet"
        assert before["digits"].replicas_total == 4 and before["broken"].message == "no module named x"
        # Its node is matched to the donor: its replicas count as the donor's.
        registry.adapter = _OneNode("node-a", reg.donor_id)
        registry.tick()
        assert c.endpoints()[1].replicas == {"01234567": 1, "head": 1, reg.donor_id: 2}
        answers[0] = OSError("connection refused")
        with pytest.raises(Exception) as err:
            c.endpoints()
    assert getattr(err.value, "status_code", None) == 503 and "connection refused" in str(err.value)


def test_endpoint_views_without_replicas() -> None:
    assert endpoint_views({}, {}) == []
    (view,) = endpoint_views({"applications": {"a": {"status": "DEPLOYING"}}}, {})
    assert (view.app, view.route_prefix, view.replicas, view.replicas_total) == ("a", None, {}, 0)


class _OneNode:
    """Ray's node table with one live donor node (what the monitor matches sessions by)."""

    def __init__(self, node_id: str, donor_id: str) -> None:
        self.node_id, self.donor_id = node_id, donor_id

    def nodes(self) -> list[Any]:
        from dgpt.contract import LABEL_DONOR_ID
        from dgpt.head.ray_adapter import RayNode

        labels = {LABEL_DONOR_ID: self.donor_id}
        return [RayNode(node_id=self.node_id, alive=True, labels=labels, resources_total={}, node_ip="127.0.0.1",
                        is_head=False, started_ms=1)]

    def drain_node(self, node_id: str, reason: str, message: str, deadline_s: float) -> tuple[bool, str]:
        return True, ""


def test_the_agent_drains_for_a_pause_on_the_head_with_that_reason(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dgpt.contract import HeartbeatAction, LeaveReason
    from dgpt.donor.agent import DonorAgent
    from dgpt.sdk.models import HeartbeatResponse
    from tests.unit.test_warm_start import _agent

    agent = _agent(tmp_path)
    drains: list[tuple[LeaveReason, float | None]] = []
    monkeypatch.setattr(DonorAgent, "ray_running", lambda self: True)
    monkeypatch.setattr(DonorAgent, "drain", lambda self, reason, deadline_s=None: drains.append((reason, deadline_s)))
    for reason in ("paused", "scaled down"):
        agent._act(HeartbeatResponse(action=HeartbeatAction.DRAIN, reason=reason, drain_deadline_s=12.0,
                                     heartbeat_interval_s=1.0))
    assert drains == [(LeaveReason.PAUSED, 12.0), (LeaveReason.AUTOSCALER, 12.0)]

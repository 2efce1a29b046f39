"""The heartbeat's fast path (``dgpt.head.api.HeartbeatFastPath``) over real HTTP: it answers
every heartbeat exactly as the framework's route does, and hands anything not well formed
to the route, which answers it as the schema says."""

from __future__ import annotations

import json

import httpx
import pytest

from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import DeviceProfile, DonorCaps, RegisterRequest
from tests.unit.conftest import ApiServer

GIB = 2**30


@pytest.fixture
def donor(api_server: ApiServer) -> tuple[str, str]:
    with Client(api_server.url, api_server.api_key) as c:
        token = c.create_token("join", "unit").token
    req = RegisterRequest(name="fast", device_class="desktop", owner="fast",
                          profile=DeviceProfile(cpus=4, memory_bytes=8 * GIB, cpu_gflops=20.0),
                          caps=DonorCaps(cpus=2, memory_bytes=2 * GIB))
    with DonorClient(api_server.url) as d:
        reg = d.register(req, token)
    return reg.donor_id, reg.donor_secret


def _cases(donor_id: str, secret: str) -> list[tuple[str, bool | None, str, dict[str, str], bytes]]:
    """(what, answered by the fast path (None: not taken for a heartbeat at all), donor id in
    the path, headers, body)."""
    ok = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    standby = json.dumps({"state": "standby"}).encode()
    return [
        ("standby", True, donor_id, ok, standby),
        ("standby, owner active", True, donor_id, ok, json.dumps({"state": "standby", "owner_active": True,
                                                                    "owner_reason": "keyboard"}).encode()),
        ("no content type", False, donor_id, {"authorization": f"Bearer {secret}"}, standby),
        ("lower-case scheme, charset", True, donor_id,
         {"authorization": f"bearer {secret}", "content-type": "application/json; charset=utf-8"}, standby),
        ("a +json content type", True, donor_id, {**ok, "content-type": "application/vnd.dgpt+json"}, standby),
        ("wrong secret", True, donor_id, {**ok, "authorization": "Bearer not-the-secret"}, standby),
        ("unknown donor", True, "d-nobody", ok, standby),
        ("no credentials", False, donor_id, {"content-type": "application/json"}, standby),
        ("basic auth", False, donor_id, {**ok, "authorization": "Basic eDp5"}, standby),
        ("not JSON", False, donor_id, ok, b"{state: standby"),
        ("empty body", False, donor_id, ok, b""),
        ("bad state", False, donor_id, ok, json.dumps({"state": "flying"}).encode()),
        ("unknown field", False, donor_id, ok, json.dumps({"state": "standby", "colour": "red"}).encode()),
        ("wait too long", False, donor_id, ok, json.dumps({"state": "standby", "wait_s": 601}).encode()),
        ("not a JSON content type", False, donor_id, {**ok, "content-type": "text/plain"}, standby),
        ("bad donor id", False, "-bad", ok, standby),
        # A path with an escape is never the fast path's (the app routes it as it was sent).
        ("encoded slash", None, f"{donor_id}%2Fheartbeat", ok, standby),
        ("encoded character", None, donor_id.replace("-", "%2D", 1), ok, standby),
        ("over the body limit", False, donor_id, ok, b'{"state": "standby", "owner_reason": "' + b"x" * (1 << 20) + b'"}'),
    ]


def test_the_fast_path_answers_as_the_route_does(api_server: ApiServer, donor: tuple[str, str]) -> None:
    donor_id, secret = donor
    fast = api_server.app.fast_path
    assert fast is not None
    with httpx.Client(base_url=api_server.api, timeout=30) as http:
        for what, answered, path_id, headers, body in _cases(donor_id, secret):
            answers = []
            for on in (False, True):
                api_server.app.fast_path = fast if on else None
                before = (fast.answered, fast.handed_on)
                r = http.post(f"/donors/{path_id}/heartbeat", content=body, headers=headers)
                answers.append((r.status_code, r.headers.get("content-type"), r.json()))
                if on:
                    want = {True: (1, 0), False: (0, 1), None: (0, 0)}[answered]
                    assert (fast.answered - before[0], fast.handed_on - before[1]) == want, (
                        f"{what}: answered by the wrong path")
            assert answers[0] == answers[1], f"{what}: the route answered {answers[0]}, the fast path {answers[1]}"
    api_server.app.fast_path = fast


def test_a_fast_heartbeat_is_recorded(api_server: ApiServer, donor: tuple[str, str]) -> None:
    donor_id, secret = donor
    fast = api_server.app.fast_path
    before = api_server.registry.donor_view(donor_id).last_heartbeat_at
    r = httpx.post(f"{api_server.api}/donors/{donor_id}/heartbeat", json={"state": "standby"},
                   headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 200 and r.json()["action"] == "standby"
    assert fast is not None and fast.answered == 1
    after = api_server.registry.donor_view(donor_id).last_heartbeat_at
    assert after is not None and (before is None or after > before)

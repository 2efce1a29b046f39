"""The control-plane REST API over real HTTP (uvicorn) on a real registry and SQLite file, without Ray.

Error shapes and statuses, nothing stored for a refused request, pagination headers, the
body limit, and the long-poll: a held standby heartbeat is answered the moment the
autoscaler activates the donor.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from dgpt.contract import DonorState, Target
from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import DeviceProfile, DonorCaps, Heartbeat, RegisterRequest
from tests.unit.conftest import ApiServer

GIB = 2**30


def _req(name: str, **kw: object) -> RegisterRequest:
    return RegisterRequest(name=name, device_class="desktop", owner=kw.pop("owner", name),  # type: ignore[arg-type]
                           profile=DeviceProfile(cpus=4, memory_bytes=8 * GIB, cpu_gflops=20.0),
                           caps=DonorCaps(cpus=2, memory_bytes=2 * GIB), **kw)  # type: ignore[arg-type]


def _join_token(api_server: ApiServer) -> str:
    with Client(api_server.url, api_server.api_key) as c:
        token = c.create_token("join", "unit").token
    assert token
    return token


def test_errors_have_one_shape_and_name_the_problem(api_server: ApiServer) -> None:
    api = api_server.api
    r = httpx.get(f"{api}/donors")
    assert r.status_code == 401 and set(r.json()) >= {"error", "message", "hint"} and "API key" in r.json()["message"]
    r = httpx.post(f"{api}/donors", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"][0]["field"] == "body"
    r = httpx.post(f"{api}/donors", json={"name": "x"}, headers={"Authorization": "Bearer t"})
    fields = {d["field"] for d in r.json()["detail"]}
    assert r.status_code == 422 and {"owner", "profile", "caps"} <= fields
    r = httpx.get(f"{api}/nowhere")
    assert r.status_code == 404 and r.json()["error"] == "not found"
    r = httpx.get(f"{api}/donors/bad id!", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "donor_id" in r.json()["message"]
    assert _rows(api_server) == 0, "a refused request stored nothing"


def _rows(api_server: ApiServer) -> int:
    import sqlite3

    with sqlite3.connect(api_server.registry.store.path) as db:
        return db.execute("SELECT COUNT(*) FROM donors").fetchone()[0]


def test_oversize_bodies_get_413_before_they_are_read(api_server: ApiServer) -> None:
    r = httpx.post(f"{api_server.api}/donors", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload too large"

    def chunks():
        for _ in range(40):
            yield b"y" * 65536  # no Content-Length: counted as it streams in

    r = httpx.post(f"{api_server.api}/donors", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_donors_come_a_page_at_a_time_with_a_cursor(api_server: ApiServer) -> None:
    token = _join_token(api_server)
    with DonorClient(api_server.url) as d:
        ids = [d.register(_req(f"d{i}", owner=f"o{i % 4}"), token).donor_id for i in range(23)]
    with Client(api_server.url, api_server.api_key) as c:
        page = c.donors_page(limit=10)
        assert [x.donor_id for x in page.items] == ids[:10] and page.total == 23 and page.next_cursor == ids[9]
        assert [x.donor_id for x in c.donors()] == ids
        assert len(c.donors(owner="o1")) == 6
        assert len(c.donors(state=DonorState.REGISTERED)) == 23
        assert c.donors(state="active") == []
    r = httpx.get(f"{api_server.api}/donors?limit=0", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "limit" in r.json()["message"]
    r = httpx.get(f"{api_server.api}/donors?state=sleepy", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "state" in r.json()["message"]


def test_a_held_heartbeat_is_answered_the_moment_the_donor_is_activated(api_server: ApiServer) -> None:
    token = _join_token(api_server)
    with DonorClient(api_server.url, timeout_s=60) as d:
        reg = d.register(_req("waiting"), token)
        first = d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="standby"))
        assert first.action.value == "standby" and first.wait_s == 30.0, "the head offers to hold the next one"

        def activate() -> None:
            time.sleep(1.0)
            api_server.registry.set_target(reg.donor_id, Target.ACTIVE)

        threading.Thread(target=activate).start()
        started = time.monotonic()
        answer = d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="standby", wait_s=first.wait_s))
        waited = time.monotonic() - started
    assert answer.action.value == "activate" and answer.ray is not None
    assert 0.9 <= waited < 10, f"answered after {waited:.1f}s: held, then woken (not at the end of the hold)"


def test_an_unwoken_held_heartbeat_ends_with_its_wait(api_server: ApiServer) -> None:
    token = _join_token(api_server)
    with DonorClient(api_server.url, timeout_s=30) as d:
        reg = d.register(_req("patient"), token)
        started = time.monotonic()
        answer = d.heartbeat(reg.donor_id, reg.donor_secret, Heartbeat(state="standby", wait_s=1.5))
        waited = time.monotonic() - started
    assert answer.action.value == "standby" and 1.4 <= waited < 5


@pytest.mark.parametrize("scheme", ["joinToken", "donorSecret", "apiKey"])
def test_the_schema_declares_its_security_schemes(api_server: ApiServer, scheme: str) -> None:
    schema = httpx.get(f"{api_server.url}/api/openapi.json").json()
    assert schema["components"]["securitySchemes"][scheme]["scheme"] == "bearer"
    users = [(path, method) for path, ops in schema["paths"].items() for method, op in ops.items()
             if any(scheme in req for req in op.get("security", []))]
    assert users, f"no operation uses {scheme}"

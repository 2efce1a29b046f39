"""The credit routes over real HTTP (a real API server on a real SQLite file, no Ray), the SDK
and `dgpt donor credit` / `dgpt status` against it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dgpt.cli.main import app
from dgpt.credit.meter import Interval
from dgpt.credit.unit import ResourceSeconds, weights_for
from dgpt.exceptions import AuthError, NotFound
from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import RegisterResponse
from tests.unit.conftest import ApiServer
from tests.unit.test_api import _join_token, _req

runner = CliRunner()


def _donor(api_server: ApiServer, name: str) -> RegisterResponse:
    with DonorClient(api_server.url) as d:
        return d.register(_req(name), _join_token(api_server))


NOW = time.time()
T0 = NOW - 3600.0


def _meter(api_server: ApiServer, donor_id: str, *cpu_s: float, start: float = T0) -> None:
    w = weights_for(_req("x").profile)
    api_server.app.state.credit.record([Interval(donor_id, 1, "node-1", start + 60 * i, start + 60 * (i + 1),
                                                 ResourceSeconds(c), w) for i, c in enumerate(cpu_s)])


def test_operators_and_the_donor_itself_read_its_credit(api_server: ApiServer) -> None:
    a = _donor(api_server, "a")
    _meter(api_server, a.donor_id, 30.0, 90.0)
    w = weights_for(_req("a").profile)
    with Client(api_server.url, api_server.api_key) as c:
        credit = c.credit(a.donor_id)
        assert credit.total_credit == pytest.approx(120.0 * w.cpu, rel=1e-12) and credit.cpu_s == 120.0
        assert credit.weights is not None and credit.weights.cpu == w.cpu
        assert [e.seq for e in credit.entries] == [1, 2] and credit.tip.seq == 2
        assert credit.recent_average_credit > 0
        assert [s.donor_id for s in c.credits()] == [a.donor_id]
        fresh = _donor(api_server, "fresh")
        assert c.credit(fresh.donor_id).total_credit == 0.0, "a donor with no metered work has zero credit"
        with pytest.raises(NotFound):
            c.credit("d-nobody")
    with DonorClient(api_server.url) as d:
        own = d.credit(a.donor_id, a.donor_secret, entries=1)
        assert own.total_credit == credit.total_credit and [e.seq for e in own.entries] == [2]
        with pytest.raises(AuthError) as wrong:
            d.credit(a.donor_id, "not-its-secret")
        with pytest.raises(AuthError) as unknown:
            d.credit("d-nobody", "whatever")
        assert wrong.value.message.split(": 401 ")[1] == unknown.value.message.split(": 401 ")[1], \
            "unknown donors and wrong secrets answer alike"
    r = httpx.get(f"{api_server.api}/donors/{a.donor_id}/credit", headers={"Authorization": f"Bearer {a.donor_secret}"})
    assert r.status_code == 401, "a donor secret is not an API key"


def test_a_void_takes_back_the_overlapping_rows_and_bad_spans_are_refused(api_server: ApiServer) -> None:
    a = _donor(api_server, "a")
    _meter(api_server, a.donor_id, 10.0, 20.0, 30.0)  # rows over T0+0-60, 60-120, 120-180
    with Client(api_server.url, api_server.api_key) as c:
        out = c.void_credit(a.donor_id, T0 + 70.0, T0 + 130.0, "verification failed: task t-1")
        assert out.voided_seqs == [2, 3]
        after = c.credit(a.donor_id)
        w = weights_for(_req("a").profile)
        assert after.total_credit == pytest.approx(10.0 * w.cpu, rel=1e-9)
        assert after.voided_credit == pytest.approx(50.0 * w.cpu, rel=1e-9)
        assert [(e.seq, e.voided) for e in after.entries if e.kind == "credit"] == [(1, False), (2, True), (3, True)]
        bad = httpx.post(f"{api_server.api}/donors/{a.donor_id}/credit/void",
                         json={"start_at": T0 + 200, "end_at": T0 + 100, "reason": "backwards"},
                         headers={"Authorization": f"Bearer {api_server.api_key}"})
        assert bad.status_code == 422 and "end_at" in bad.json()["message"] and "start_at" in bad.json()["message"]
        assert c.credit(a.donor_id).tip.seq == 5, "a refused void stores nothing"
        with pytest.raises(NotFound):
            c.void_credit("d-nobody", 0.0, 1.0, "x")
        check = c.verify_credit()
        assert check.ok and check.rows == 5 and check.tip.seq == 5
        assert c.verify_credit(anchor_seq=2, anchor_hash=after.entries[1].hash).ok
        rewritten = c.verify_credit(anchor_seq=2, anchor_hash="0" * 64)
        assert not rewritten.ok and rewritten.first_bad_seq == 2
    r = httpx.get(f"{api_server.api}/credit/verify", params={"anchor_seq": 2},
                  headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 422 and "anchor_hash" in r.json()["message"]


def test_dgpt_donor_credit_uses_the_donors_own_secret_and_status_shows_credit(api_server: ApiServer,
                                                                             tmp_path: Path) -> None:
    a = _donor(api_server, "a")
    _meter(api_server, a.donor_id, 60.0)
    state = api_server.home / "donors" / "a"
    state.mkdir(parents=True)
    (state / "donor.json").write_text(json.dumps({"donor_id": a.donor_id, "donor_secret": a.donor_secret, "name": "a",
                                                  "head_url": api_server.url}))
    env = {"DGPT_HOME": str(api_server.home), "DGPT_API_PORT": str(api_server.settings.api_port),
           "DGPT_NODE_IP": "127.0.0.1", "DGPT_HTTP_HOST": "127.0.0.1", "COLUMNS": "220"}
    out = runner.invoke(app, ["donor", "credit", "--donor-id", "a", "--json"], env=env)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["donor_id"] == a.donor_id and data["cpu_s"] == 60.0 and data["total_credit"] > 0
    table = runner.invoke(app, ["donor", "credit", "--donor-id", a.donor_id], env=env)
    assert table.exit_code == 0 and "recent average" in table.output and "ledger tip: row 1" in table.output
    # Not a donor of this machine: asked as an operator, with the head's API key.
    other = _donor(api_server, "b")
    by_key = runner.invoke(app, ["donor", "credit", "--donor-id", other.donor_id, "--json"], env=env)
    assert by_key.exit_code == 0 and json.loads(by_key.output)["total_credit"] == 0.0
    status = runner.invoke(app, ["status", "--json"], env=env)
    donors = {d["donor_id"]: d for d in json.loads(status.output)["donors"]}
    assert donors[a.donor_id]["credit"] == pytest.approx(data["total_credit"]) and donors[other.donor_id]["credit"] == 0
    plain = runner.invoke(app, ["status"], env=env)
    assert plain.exit_code == 0 and "credit (RAC/day)" in plain.output

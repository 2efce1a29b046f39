"""The storage tier wired into the head's API, the donor side and the CLI, without Ray.

A real control-plane API (uvicorn, a real registry on SQLite) runs with a real
:class:`HeadStorage`; donors register through the real REST endpoint with a piece-server URL,
get their storage key in the answer and start real piece servers (``dgpt.donor.storage``,
HTTP on free ports, pieces in their own folders). Files go in and out through the CLI, the
SDK and the fsspec filesystem over REST.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dgpt.cli.main import app
from dgpt.config import load_settings
from dgpt.contract import DonorState
from dgpt.donor.storage import DonorStorage
from dgpt.exceptions import AuthError, ConfigError, NotFound
from dgpt.head.storage_tier import HeadStorage, storage_options, storage_states
from dgpt.processes import free_port
from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import DeviceProfile, DonorCaps, DonorView, RegisterRequest
from dgpt.storage.service import StorageOptions
from tests.unit.conftest import ApiServer

runner = CliRunner()
GIB = 2**30
MIB = 2**20


@dataclass
class Tier:
    api: ApiServer
    storage: HeadStorage
    donors: dict[str, tuple[DonorStorage, str]]  # donor_id -> (its piece server, its secret)

    def client(self) -> Client:
        return Client(self.api.url, self.api.api_key)

    def env(self) -> dict[str, str]:
        return {"DGPT_HOME": str(self.api.home), "DGPT_API_PORT": str(self.api.settings.api_port),
                "DGPT_NODE_IP": "127.0.0.1", "DGPT_HTTP_HOST": "127.0.0.1", "COLUMNS": "200"}

    def piece_files(self, donor_id: str) -> list[Path]:
        return [p for p in (self.donors[donor_id][0].root / "pieces").rglob("*") if p.is_file()]


def _register(tier_api: ApiServer, join: str, i: int, disk_bytes: int, state_dir: Path) -> tuple[str, str, DonorStorage]:
    caps = DonorCaps(cpus=1, memory_bytes=GIB, disk_bytes=disk_bytes)
    storage = DonorStorage(caps, state_dir, free_port(), bind_host="127.0.0.1")
    req = RegisterRequest(name=f"dn{i}", owner=f"own{i}", profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=1.0),
                          caps=caps, storage_url=storage.url_for("127.0.0.1"))
    with DonorClient(tier_api.url) as d:
        resp = d.register(req, join)
    storage.start(resp.donor_id, resp.storage_key, "127.0.0.1")
    return resp.donor_id, resp.donor_secret, storage


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[Tier]:
    settings = load_settings({"home": tmp_path, "storage_gc_grace_s": 0.0, "storage_audits_per_round": 8}, env={})
    storage = HeadStorage(settings, tmp_path / "head" / "storage")
    storage.service.options = StorageOptions(segment_bytes=256 * 1024, stripe_plain_bytes=64 * 1024, gc_grace_s=0.0)
    api = ApiServer(tmp_path, storage=storage)
    join = api.registry.create_token("join", "storage test").token
    assert join
    donors = {}
    for i in range(5):
        donor_id, secret, server = _register(api, join, i, 64 * MIB, tmp_path / f"donor-{i}")
        donors[donor_id] = (server, secret)
    yield Tier(api, storage, donors)
    for server, _ in donors.values():
        server.stop()
    storage.close()
    api.stop()


def test_registering_with_disk_gives_the_key_and_serves_pieces(tier: Tier) -> None:
    assert all(server.handle is not None and server.handle.running for server, _ in tier.donors.values())
    known = {d.donor_id: d for d in tier.storage.service.donors()}
    assert set(known) == set(tier.donors)
    for donor_id, (server, _) in tier.donors.items():
        assert known[donor_id].url == server.handle.url  # type: ignore[union-attr]
        assert known[donor_id].capacity_bytes == 64 * MIB and known[donor_id].state == "online"
        # The key it got is the one the head MACs its capabilities with.
        assert server.handle.service._key == tier.storage.service.donor_key(donor_id)  # type: ignore[union-attr]


def test_a_donor_without_disk_gets_no_key(tier: Tier, tmp_path: Path) -> None:
    join = tier.api.registry.create_token("join", "no disk").token
    req = RegisterRequest(name="nodisk", owner="own-x", profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=1.0),
                          caps=DonorCaps(cpus=1, memory_bytes=GIB), storage_url="http://127.0.0.1:1")
    with DonorClient(tier.api.url) as d:
        resp = d.register(req, join)  # type: ignore[arg-type]
    assert resp.storage_key is None
    assert resp.donor_id not in {d.donor_id for d in tier.storage.service.donors()}


def test_cli_put_get_ls_rm_status(tier: Tier, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 12345)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    env = tier.env()
    put = runner.invoke(app, ["storage", "put", str(src), "data/in.bin"], env=env)
    assert put.exit_code == 0, put.output
    assert "stored data/in.bin" in put.output
    # The pieces are on the donors' disks, not on the head.
    file_id = tier.storage.service.info("data/in.bin").file_id
    segments = len(tier.storage.service.store.segment_infos(file_id))
    assert segments == 13  # 256 KiB segments in these tests
    assert sum(len(tier.piece_files(d)) for d in tier.donors) == segments * 4  # rs-2-of-4
    assert not list((tier.api.home / "head" / "storage").rglob("pieces"))

    out = tmp_path / "out.bin"
    got = runner.invoke(app, ["storage", "get", "data/in.bin", str(out)], env=env)
    assert got.exit_code == 0, got.output
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()

    ls = runner.invoke(app, ["storage", "ls", "data"], env=env)
    assert ls.exit_code == 0 and "data/in.bin" in ls.output and "rs-2-of-4" in ls.output

    status = runner.invoke(app, ["storage", "status"], env=env)
    assert status.exit_code == 0, status.output
    assert "data/in.bin" in status.output and "healthy" in status.output and "repair backlog: 0" in status.output

    rm = runner.invoke(app, ["storage", "rm", "data/in.bin"], env=env)
    assert rm.exit_code == 0, rm.output
    missing = runner.invoke(app, ["storage", "get", "data/in.bin", str(tmp_path / "x")], env=env)
    assert isinstance(missing.exception, NotFound) and "no such file" in missing.exception.message
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()
    tier.storage.upkeep()  # garbage past its (zero) grace is deleted from the donors
    assert not any(tier.piece_files(d) for d in tier.donors)


def test_status_shows_a_lost_donor_as_repair_backlog_and_upkeep_repairs(tier: Tier) -> None:
    with tier.client() as c:
        c.storage_put("a.bin", os.urandom(300_000))
    holder = next(d for d in tier.donors if tier.piece_files(d))
    tier.donors[holder][0].stop()
    tier.storage.service.set_donor_state(holder, "gone")
    with tier.client() as c:
        before = c.storage_status()
        assert before.repair_backlog >= 1 and before.files[0].state == "repair due"
        tier.storage.upkeep()
        after = c.storage_status()
    assert after.repair_backlog == 0 and after.files[0].state == "healthy"
    assert after.files[0].min_durable == after.files[0].n


def test_range_reads_and_bad_ranges(tier: Tier) -> None:
    data = os.urandom(700_000)
    with tier.client() as c:
        c.storage_put("r.bin", data)
        assert c.storage_get("r.bin", 1000, 250_000) == data[1000:250_000]
        r = httpx.get(f"{tier.api.api}/storage/files/r.bin", headers={"Authorization": f"Bearer {tier.api.api_key}",
                                                                      "Range": "bytes=9999999-"})
    assert r.status_code == 416 and r.json()["error"] == "ApiError"


def test_no_api_key_gets_nothing(tier: Tier) -> None:
    with tier.client() as c:
        c.storage_put("secret.bin", b"x" * 1000)
    with Client(tier.api.url, "wrong-key") as c, pytest.raises(AuthError):
        c.storage_get("secret.bin")
    r = httpx.put(f"{tier.api.api}/storage/files/other.bin", content=b"abc")
    assert r.status_code == 401
    assert "other.bin" not in {e.path for e in tier.storage.service.find("")}


def test_a_piece_server_refuses_a_client_without_a_capability(tier: Tier) -> None:
    with tier.client() as c:
        c.storage_put("p.bin", os.urandom(100_000))
    file_id = tier.storage.service.info("p.bin").file_id
    piece = tier.storage.service.store.pieces(file_id)[0]
    url = f"{piece.url}/v1/pieces/{piece.piece_id}"
    assert httpx.get(url).status_code == 401
    other_donor = next(d for d in tier.donors if d != piece.donor_id)
    forged = tier.storage.service.admin_capability(other_donor, ["get"], [piece.piece_id])  # type: ignore[list-item]
    assert httpx.get(url, headers={"Authorization": f"Bearer {forged}"}).status_code in (401, 403)
    good = tier.storage.service.grant_piece(piece).capability
    assert httpx.get(url, headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_fsspec_over_rest_with_the_api_key_from_settings(tier: Tier, monkeypatch: pytest.MonkeyPatch) -> None:
    from dgpt.storage.fs import DonorFileSystem

    monkeypatch.setenv("DGPT_HEAD_URL", tier.api.url)
    monkeypatch.setenv("DGPT_API_KEY", tier.api.api_key)
    fs = DonorFileSystem()  # fabric://, outside Ray: the REST API from the settings
    assert fs._fs_token == DonorFileSystem()._fs_token
    data = os.urandom(600_000)
    with fs.open("dgpt://fs/one.bin", "wb") as f:
        f.write(data)
    assert fs.cat("fs/one.bin") == data
    assert fs.ls("fs", detail=False) == ["fs/one.bin"]
    with pytest.raises(FileNotFoundError):
        fs.cat("fs/none.bin")
    fs.rm("fs/one.bin")
    assert not fs.exists("fs/one.bin")
    monkeypatch.setenv("DGPT_API_KEY", "wrong")
    from dgpt.storage.fs import storage_client

    with pytest.raises(AuthError):
        storage_client(f"{tier.api.url}", 3).metadata.ls("")


def test_metadata_calls_name_bad_arguments(tier: Tier) -> None:
    h = {"Authorization": f"Bearer {tier.api.api_key}"}
    r = httpx.post(f"{tier.api.api}/storage/meta/begin_write", json={"path": "x", "bogus": 1}, headers=h)
    assert r.status_code == 422 and "bogus" in r.json()["message"]
    r = httpx.post(f"{tier.api.api}/storage/meta/drop_everything", json={}, headers=h)
    assert r.status_code == 404 and "begin_write" in r.json()["hint"]


def test_a_donor_leaving_has_its_pieces_moved_first(tier: Tier) -> None:
    data = os.urandom(500_000)
    with tier.client() as c:
        c.storage_put("keep.bin", data)
    leaving = next(d for d in tier.donors if tier.piece_files(d))
    held = len(tier.piece_files(leaving))
    server, secret = tier.donors[leaving]
    with DonorClient(tier.api.url) as d:
        with pytest.raises(AuthError):
            d.storage_leave(leaving, "not-its-secret-0123456789")
        resp = d.storage_leave(leaving, secret)
    assert resp.moved == held and resp.remaining == 0 and resp.state == "gone"
    server.stop()  # only now is it let go
    file_id = tier.storage.service.info("keep.bin").file_id
    assert leaving not in {p.donor_id for p in tier.storage.service.store.pieces(file_id)}
    with tier.client() as c:
        assert c.storage_get("keep.bin") == data
        assert c.storage_status().files[0].state == "healthy"


def _view(donor_id: str, state: DonorState, heard_s_ago: float, now: float) -> DonorView:
    return DonorView(donor_id=donor_id, name=donor_id, state=state, device_class="desktop", owner="o", node_id=None,
                     profile=DeviceProfile(cpus=1, memory_bytes=GIB, cpu_gflops=1.0),
                     caps=DonorCaps(cpus=1, memory_bytes=GIB), resources={}, labels={}, registered_at=now - 1e5,
                     last_heartbeat_at=now - heard_s_ago)


def test_storage_states_follow_the_registry() -> None:
    now = time.time()
    views = [_view("a", DonorState.STANDBY, 1, now), _view("b", DonorState.GONE, 60, now),
             _view("c", DonorState.GONE, 4000, now), _view("d", DonorState.ACTIVE, 1, now),
             _view("e", DonorState.GONE, 5000, now), _view("f", DonorState.GONE, 10, now),
             _view("x", DonorState.ACTIVE, 1, now)]
    current = {"a": "offline", "b": "online", "c": "offline", "d": "online", "e": "gone", "f": "leaving"}
    assert storage_states(views, current, now, 3600.0) == {"a": "online", "b": "offline", "c": "gone"}


def test_storage_settings_map_to_options_and_name_the_setting(tmp_path: Path) -> None:
    s = load_settings({"home": tmp_path, "storage_capability_ttl_s": 120.0}, env={})
    assert storage_options(s).capability_ttl_s == 120.0
    assert storage_options(s).gc_grace_s == s.storage_gc_grace_s
    with pytest.raises(ConfigError, match="DGPT_STORAGE_CAPABILITY_TTL_S"):
        load_settings({"home": tmp_path}, env={"DGPT_STORAGE_CAPABILITY_TTL_S": "100000"})
    with pytest.raises(ConfigError, match="DGPT_STORAGE_PORT"):
        load_settings({"home": tmp_path}, env={"DGPT_STORAGE_PORT": "0"})


def test_leave_for_an_unknown_donor_is_not_found(tier: Tier) -> None:
    with pytest.raises(NotFound):
        tier.storage.leave("d-nobody")


def test_an_upload_cut_off_half_way_leaves_no_file(tier: Tier) -> None:
    import socket

    body = os.urandom(9 * MIB)  # more than the head hands its writer at once: pieces get uploaded
    host, port = "127.0.0.1", tier.api.settings.api_port
    with socket.create_connection((host, port)) as s:
        s.sendall((f"PUT /api/v1/storage/files/cut/off.bin HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {tier.api.api_key}\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {3 * len(body)}\r\n\r\n").encode() + body)
        time.sleep(0.5)  # the head has started sealing and uploading what it got
    # The writer is aborted: nothing at the path, and its pieces become garbage, not a file.
    def aborted() -> bool:
        rows = tier.storage.service.store.garbage(time.time() + 1, 1000)
        return bool(rows)
    deadline = time.monotonic() + 20
    while not aborted() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted(), "the cut-off write's pieces were not released"
    with pytest.raises(NotFound):
        tier.storage.service.info("cut/off.bin")
    with tier.client() as c:
        assert "cut/off.bin" not in {f.path for f in c.storage_status().files}


def test_bad_paths_are_422_naming_the_path(tier: Tier) -> None:
    h = {"Authorization": f"Bearer {tier.api.api_key}"}
    for method, url in (("PUT", "files/a/%2E%2E/b"), ("GET", "files/a/%2E/b"), ("DELETE", "files/a//b")):
        r = httpx.request(method, f"{tier.api.api}/storage/{url}", headers=h, content=b"x")
        assert r.status_code == 422 and r.json()["message"].startswith("path"), (method, url, r.text)
    assert not tier.storage.service.find("")


def test_a_path_with_a_newline_reaches_its_route(tier: Tier) -> None:
    # Starlette's own path convertor stops at a newline (an undocumented 404): names are bytes
    # but '/', as in fsspec and S3, so it is a file like any other.
    h = {"Authorization": f"Bearer {tier.api.api_key}"}
    assert httpx.put(f"{tier.api.api}/storage/files/a%0Ab", headers=h, content=b"x").status_code == 201
    got = httpx.get(f"{tier.api.api}/storage/files/a%0Ab", headers=h)
    assert got.status_code == 200 and got.content == b"x"


def test_the_actor_path_round_trips_answers_and_typed_errors_through_pickle(tier: Tier) -> None:
    """What ``ControlPlane.storage_call`` does over Ray: arguments and answers pickled, errors as values."""
    import pickle

    from dgpt.exceptions import WriteConflict
    from dgpt.storage.datapath import StorageClient
    from dgpt.storage.rpc import RemoteMetadata
    from dgpt.storage.transport import HttpTransport

    def over_the_wire(method: str, kwargs: dict) -> tuple[str, object]:  # type: ignore[type-arg]
        answer = tier.storage.call_as_value(method, pickle.loads(pickle.dumps(kwargs)))
        return pickle.loads(pickle.dumps(answer))

    client = StorageClient(RemoteMetadata(over_the_wire), HttpTransport(), io_workers=4, pool=None)  # type: ignore[arg-type]
    try:
        data = os.urandom(700_000)
        client.write_bytes("actor/a.bin", data)
        assert client.read_bytes("actor/a.bin") == data
        with pytest.raises(NotFound) as missing:
            client.metadata.info("actor/none.bin")
        assert missing.value.status_code == 404 and "actor/none.bin" in missing.value.message
        with pytest.raises(WriteConflict):
            client.metadata.begin_write("actor/a.bin", overwrite=False)
    finally:
        client.close()


def test_a_donor_failing_audits_is_trusted_with_fewer_pieces(tier: Tier) -> None:
    with tier.client() as c:
        c.storage_put("audited.bin", os.urandom(600_000))
    # The donor holding the most pieces: one failed audit alone moves its trust less than 10%.
    holder = max(tier.donors, key=lambda d: len(tier.piece_files(d)))
    assert len(tier.piece_files(holder)) >= 2
    for f in tier.piece_files(holder):
        f.write_bytes(os.urandom(f.stat().st_size))  # every piece on its disk rotten through
    views, _, _ = tier.api.registry.list_donors(limit=1000, max_sessions=0)
    tier.storage.sync(views)
    before = {d.donor_id: d.reliability for d in tier.storage.service.donors()}
    results = tier.storage.auditor._audit(tier.storage.service.audit_tasks_on(holder, 64))
    assert results and all(r.outcome == "failed" for r in results if r.donor_id == holder)
    tier.storage.sync(views)  # the next upkeep round
    after = {d.donor_id: d for d in tier.storage.service.donors()}
    assert after[holder].audits_failed == len(results)
    assert after[holder].reliability < before[holder] * 0.9, "the failures show in the reliability pieces go by"
    others = [d for d in after if d != holder]
    assert all(after[d].reliability == pytest.approx(before[d]) for d in others)


def test_audit_trust_forgives_a_rare_failure_and_not_a_steady_one() -> None:
    from dgpt.storage.placement import audit_trust

    assert audit_trust(0, 0) == pytest.approx(0.9)
    assert audit_trust(1000, 1) > 0.99
    assert audit_trust(0, 8) == pytest.approx(0.5) and audit_trust(0, 90) < 0.1
    with pytest.raises(ValueError, match="audit counts"):
        audit_trust(-1, 0)

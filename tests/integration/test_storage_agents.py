"""Real donor agents serving the storage tier, without Ray: they never leave standby.

The head side is the real control-plane API (uvicorn, a registry on SQLite) with the real
storage tier in this process; no Ray runs (there is no autoscaler to activate anyone), so
every donor stays standby - the case the storage tier must cover: its pieces are served by
the agent itself, not by a raylet. Each donor is a real ``dgpt donor join`` process with
its own state folder, disk cap and piece-server port. Donors are SIGKILLed whole (the agent
and everything under it), or leave gracefully (SIGINT, as `dgpt donor leave` sends).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dgpt.head.storage_tier import HeadStorage
from dgpt.processes import free_port, kill_at_once, tree
from dgpt.sdk.client import Client
from dgpt.storage.service import StorageOptions
from tests.integration.conftest import wait_for
from tests.unit.conftest import ApiServer

DONORS = 5
MIB = 2**20


@dataclass
class Agents:
    api: ApiServer
    storage: HeadStorage
    procs: dict[str, subprocess.Popen[bytes]]  # donor name -> its agent
    home: Path

    def client(self) -> Client:
        return Client(self.api.url, self.api.api_key)

    def donor_id(self, name: str) -> str:
        with self.client() as c:
            return next(d.donor_id for d in c.donors() if d.name == name)

    def name_of(self) -> dict[str, str]:
        with self.client() as c:
            return {d.donor_id: d.name for d in c.donors()}

    def pieces_on_disk(self, name: str) -> set[str]:
        return {p.name for p in (self.home / name / "pieces" / "pieces").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    home = tmp_path_factory.mktemp("agents")
    api_home = home / "head-home"
    api_home.mkdir()
    from dgpt.config import load_settings

    settings = load_settings({"home": api_home, "storage_gc_grace_s": 0.0}, env={})
    storage = HeadStorage(settings, api_home / "head" / "storage")
    # Small segments: megabyte files span several, each spread over its own donors.
    storage.service.options = StorageOptions(segment_bytes=512 * 1024, stripe_plain_bytes=128 * 1024, gc_grace_s=0.0)
    api = ApiServer(api_home, storage=storage)
    token = api.registry.create_token("join", "agents").token
    assert token
    token_file = home / "join_token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DGPT_", "RAY_ADDRESS"))}
    env["DGPT_HOME"] = str(home / "donor-home")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for i in range(DONORS):
        name = f"sd{i}"
        argv = [sys.executable, "-m", "dgpt.cli.main", "donor", "join", "--head", api.url, "--token-file", str(token_file),
                "--name", name, "--owner", f"owner-{i}", "--cpus", "1", "--memory-gb", "0.5", "--disk-gb", "0.25",
                "--state-dir", str(home / name), "--node-ip", "127.0.0.1", "--ray-port-base", str(free_port()),
                "--storage-port", str(free_port()), "--load-threshold", "off", "--no-warm-start"]
        log = open(home / f"{name}.log", "wb")
        procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
    fixture = Agents(api, storage, procs, home)
    try:
        wait_for(lambda: len([d for d in storage.service.donors() if d.state == "online"]) == DONORS, 120,
                 f"{DONORS} agents serving pieces (logs in {home})")
        yield fixture
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                for p in tree(proc.pid):
                    p.kill()
        storage.close()
        api.stop()


def test_agents_serve_pieces_while_standby_under_their_disk_cap(agents: Agents) -> None:
    data = os.urandom(3 * MIB)
    with agents.client() as c:
        entry = agents.client().storage_put("standby/file.bin", data)
        assert all(d.state.value in ("standby", "registered") and d.node_id is None for d in c.donors())
        assert c.storage_get("standby/file.bin") == data
    assert entry.profile == "rs-2-of-4"
    for d in agents.storage.service.donors():
        assert d.capacity_bytes == int(0.25 * 2**30)
    file_id = agents.storage.service.info("standby/file.bin").file_id
    names = agents.name_of()
    for p in agents.storage.service.store.pieces(file_id):
        # Each piece sits in its donor agent's own state folder, named by its hash.
        assert p.piece_id in agents.pieces_on_disk(names[p.donor_id])


def test_a_gracefully_leaving_agent_has_its_pieces_moved_before_it_exits(agents: Agents) -> None:
    data = os.urandom(2 * MIB + 5)
    with agents.client() as c:
        c.storage_put("leave/file.bin", data)
    file_id = agents.storage.service.info("leave/file.bin").file_id
    names = agents.name_of()
    rows = agents.storage.service.store.pieces(file_id)
    leaving = names[rows[0].donor_id]
    held = [p for p in agents.storage.service.pieces_on(rows[0].donor_id) if p.state == "stored"]  # every file's
    agents.procs[leaving].send_signal(signal.SIGINT)  # what `dgpt donor leave` sends
    agents.procs[leaving].wait(120)
    log = (agents.home / f"{leaving}.log").read_text()
    assert f"storage: {len(held)} piece(s) moved to other donors, 0 left" in log, log[-2000:]
    leaving_id = agents.donor_id(leaving)
    state = {d.donor_id: d for d in agents.storage.service.donors()}[leaving_id]
    assert state.state == "gone" and state.pieces == 0
    after = agents.storage.service.store.pieces(file_id)
    assert leaving_id not in {p.donor_id for p in after}
    assert {p.piece_id for p in after} == {p.piece_id for p in rows}  # the same pieces, elsewhere
    for p in after:
        assert p.piece_id in agents.pieces_on_disk(names[p.donor_id])
    with agents.client() as c:
        assert c.storage_get("leave/file.bin") == data
        f = next(f for f in c.storage_status().files if f.path == "leave/file.bin")
    assert f.min_durable == f.n and f.state == "healthy"


def test_sigkill_n_minus_k_agents_and_read_back_bit_identical(agents: Agents) -> None:
    data = os.urandom(4 * MIB + 321)
    with agents.client() as c:
        c.storage_put("chaos/file.bin", data)
    file_id = agents.storage.service.info("chaos/file.bin").file_id
    names = agents.name_of()
    alive = sorted({names[p.donor_id] for p in agents.storage.service.store.pieces(file_id)}
                   & {n for n, p in agents.procs.items() if p.poll() is None})
    assert len(alive) == 4
    victims = alive[:2]  # n - k of rs-2-of-4
    for name in victims:
        kill_at_once(tree(agents.procs[name].pid))
        agents.procs[name].wait(10)
    with agents.client() as c:
        got = c.storage_get("chaos/file.bin")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # The reads found the dead donors' pieces unreachable and used the others: nothing is marked bad.
    with agents.client() as c:
        f = next(f for f in c.storage_status().files if f.path == "chaos/file.bin")
    assert f.min_durable == f.n  # offline is not lost: the head has not written them off

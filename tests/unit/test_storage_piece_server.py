"""The piece server over real HTTP: nothing without a valid capability, everything with one."""

from __future__ import annotations

import base64
import json
import os
import time

import httpx
import pytest

from dgpt.exceptions import AuthError, NotFound, PieceCorrupt, StoreFull
from dgpt.processes import free_port
from dgpt.storage import capability, crypto, merkle
from dgpt.storage.capability import Op
from dgpt.storage.piece_server import start
from dgpt.storage.piece_store import PieceStore, stored_bytes
from dgpt.storage.transport import HttpTransport

LEAF = 512
SECRET = crypto.new_secret()
DONOR = "donor-a"
KEY = crypto.donor_storage_key(SECRET, DONOR)
CAPACITY = 4 * stored_bytes(4096, LEAF)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    handle = start(PieceStore(root, CAPACITY, fsync=False), DONOR, KEY, port=free_port())
    yield handle
    handle.stop()
    assert not handle.running


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=10) as client:
        yield client


def cap(ops, pieces=(), donor=DONOR, key=KEY, now=None, ttl=60.0) -> str:
    return capability.issue(key, donor, ops, pieces, time.time() if now is None else now, ttl)


def new_piece(size: int = 4096) -> tuple[str, bytes]:
    data = os.urandom(size)
    return merkle.piece_id(data, LEAF), data


def disk(server) -> list[tuple[str, int]]:
    root = server.service.store.root
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def put(http, server, pid, data, token, leaf=LEAF):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http.put(f"{server.url}/v1/pieces/{pid}", params={"leaf_bytes": leaf}, content=data, headers=headers)


def test_full_round_trip_with_capabilities(server, http):
    t = HttpTransport()
    pid, data = new_piece()
    assert t.put(server.url, pid, data, LEAF, cap([Op.PUT], [pid])) is True
    assert t.put(server.url, pid, data, LEAF, cap([Op.PUT], [pid])) is False
    read = cap([Op.GET], [pid])
    assert t.get(server.url, pid, read) == data
    assert t.get(server.url, pid, read, 100, 1100) == data[100:1100]
    r = http.get(f"{server.url}/v1/pieces/{pid}", headers={"Authorization": f"Bearer {read}", "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20] and r.headers["content-range"] == "bytes 10-19/4096"
    piece_bytes, leaf_bytes, blob = t.leaves(server.url, pid, read)
    assert (piece_bytes, leaf_bytes) == (4096, LEAF) and blob == b"".join(merkle.leaf_hashes(data, LEAF))
    proof = t.audit(server.url, pid, 3, "n0nce-abc", cap([Op.AUDIT], [pid]))
    assert proof.nonce == "n0nce-abc" and merkle.verify_leaf(pid, 4096, LEAF, 3, proof.leaf, proof.path)
    assert (pid, stored_bytes(4096, LEAF)) in t.list(server.url, cap([Op.LIST]))
    assert t.stats(server.url, cap([Op.STATS])).pieces >= 1
    assert t.delete(server.url, pid, cap([Op.DELETE], [pid])) is True
    with pytest.raises(NotFound):
        t.get(server.url, pid, read)
    assert http.get(f"{server.url}/v1/health").json() == {"status": "ok", "donor_id": DONOR}


def test_no_valid_capability_gets_nothing_and_changes_nothing(server, http):
    t = HttpTransport()
    pid, data = new_piece()
    t.put(server.url, pid, data, LEAF, cap([Op.PUT], [pid]))
    other_pid, other_data = new_piece()
    other_key = crypto.donor_storage_key(SECRET, "donor-b")
    foreign_key = crypto.donor_storage_key(crypto.new_secret(), DONOR)
    good = cap([Op.GET], [pid])
    head, body, mac = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["o"] = ["delete", "get", "put"]
    tampered = ".".join([head, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), mac])
    cases = {
        "none": (None, 401),
        "garbage": ("not-a-capability", 401),
        "expired": (cap([Op.GET, Op.PUT, Op.DELETE], [pid, other_pid], now=time.time() - 3600, ttl=60), 401),
        "wrong donor": (cap([Op.GET, Op.PUT, Op.DELETE], [pid, other_pid], donor="donor-b", key=other_key), 401),
        "another cluster": (cap([Op.GET, Op.PUT, Op.DELETE], [pid, other_pid], key=foreign_key), 401),
        "tampered": (tampered, 401),
        "wrong op": (cap([Op.STATS, Op.LIST], []), 403),
        "wrong piece": (cap([Op.GET, Op.PUT, Op.DELETE, Op.AUDIT], [merkle.piece_id(b"x", LEAF)]), 403),
    }
    before = disk(server)
    for name, (token, status) in cases.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        responses = {
            "get": http.get(f"{server.url}/v1/pieces/{pid}", headers=headers),
            "range": http.get(f"{server.url}/v1/pieces/{pid}", headers={**headers, "Range": "bytes=0-9"}),
            "leaves": http.get(f"{server.url}/v1/pieces/{pid}/leaves", headers=headers),
            "put": put(http, server, other_pid, other_data, token),
            "delete": http.delete(f"{server.url}/v1/pieces/{pid}", headers=headers),
            "audit": http.post(f"{server.url}/v1/pieces/{pid}/audit", json={"leaf_index": 0, "nonce": "12345678"},
                               headers=headers),
        }
        if name != "wrong op":  # a list/stats capability does allow list and stats
            responses["list"] = http.get(f"{server.url}/v1/pieces", headers=headers)
            responses["stats"] = http.get(f"{server.url}/v1/stats", headers=headers)
        for what, r in responses.items():
            assert r.status_code == status, (name, what, r.status_code, r.text)
            assert data not in r.content and r.json()["code"] == "AuthError", (name, what)
        assert disk(server) == before, name
    # The real capability still works afterwards: the piece was never touched.
    assert HttpTransport().get(server.url, pid, good) == data
    with pytest.raises(AuthError) as err:
        t.get(server.url, pid, cases["wrong piece"][0])
    assert err.value.status_code == 403


def test_corrupt_upload_is_refused_and_not_stored(server, http):
    pid, data = new_piece()
    before = disk(server)
    r = put(http, server, pid, data[:-1] + bytes([data[-1] ^ 1]), cap([Op.PUT], [pid]))
    assert r.status_code == 422 and "not the claimed" in r.json()["error"]
    assert disk(server) == before
    with pytest.raises(PieceCorrupt):
        HttpTransport().put(server.url, pid, data[::-1], LEAF, cap([Op.PUT], [pid]))
    r = put(http, server, pid, data, cap([Op.PUT], [pid]), leaf="abc")
    assert r.status_code == 400 and "leaf_bytes must be an integer" in r.json()["error"]


def test_put_over_capacity_is_refused_with_507(server):
    t = HttpTransport()
    stored = []
    with pytest.raises(StoreFull) as err:
        for _ in range(10):
            pid, data = new_piece()
            t.put(server.url, pid, data, LEAF, cap([Op.PUT], [pid]))
            stored.append(pid)
    assert "piece store is full" in err.value.message
    stats = t.stats(server.url, cap([Op.STATS]))
    assert stats.used_bytes <= stats.capacity_bytes == CAPACITY
    for pid in stored:
        t.delete(server.url, pid, cap([Op.DELETE], [pid]))


def test_bad_range_is_416(server, http):
    pid, data = new_piece()
    HttpTransport().put(server.url, pid, data, LEAF, cap([Op.PUT], [pid]))
    headers = {"Authorization": f"Bearer {cap([Op.GET], [pid])}"}
    for spec in ("bytes=5000-6000", "bytes=10-5", "pages=1-2", "bytes=1-2,5-6"):
        assert http.get(f"{server.url}/v1/pieces/{pid}", headers={**headers, "Range": spec}).status_code == 416, spec
    HttpTransport().delete(server.url, pid, cap([Op.DELETE], [pid]))


def test_capabilities_cannot_outlive_the_cap():
    with pytest.raises(ValueError, match="ttl_s"):
        capability.issue(KEY, DONOR, [Op.GET], ["a" * 64], time.time(), capability.MAX_TTL_S + 1)
    with pytest.raises(ValueError, match="need piece ids"):
        capability.issue(KEY, DONOR, [Op.GET], [], time.time())
    with pytest.raises(ValueError, match="at most"):
        capability.issue(KEY, DONOR, [Op.GET], [f"{i:064x}" for i in range(capability.MAX_PIECES + 1)], time.time())

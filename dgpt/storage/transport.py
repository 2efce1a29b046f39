"""How clients talk to piece servers: one small protocol, over HTTP or in-process.

:class:`HttpTransport` is the real path (httpx, pooled keep-alive connections, safe to share
across threads). :class:`LocalTransport` calls :class:`~dgpt.storage.piece_server.PieceService`
objects directly, capability checks and all, so benchmarks and the durability simulation
run the very same piece logic without sockets (like httpx's MockTransport, it swaps only
the wire). Both raise the same errors:

- :class:`~dgpt.exceptions.PieceServerUnreachable`: nothing answered;
- :class:`~dgpt.exceptions.AuthError` (401/403), :class:`~dgpt.exceptions.NotFound` (404),
  :class:`~dgpt.exceptions.InvalidRequest`;
- :class:`~dgpt.exceptions.PieceCorrupt` (422: the body did not match its id),
  :class:`~dgpt.exceptions.StoreFull` (507).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from dgpt.exceptions import (
    AuthError,
    DgptError,
    InvalidRequest,
    NotFound,
    PieceCorrupt,
    PieceServerUnreachable,
    StorageError,
    StoreFull,
)
from dgpt.storage.merkle import LeafProof
from dgpt.storage.piece_server import PieceService
from dgpt.storage.piece_store import StoreStats

Body = bytes | memoryview | Sequence[bytes | memoryview]


class PieceTransport(Protocol):
    """The operations a client performs on a donor's piece server at ``url``."""

    def put(self, url: str, piece_id: str, body: Body, leaf_bytes: int, capability: str) -> bool: ...

    def get(self, url: str, piece_id: str, capability: str, start: int = 0, end: int | None = None) -> bytes: ...

    def leaves(self, url: str, piece_id: str, capability: str) -> tuple[int, int, bytes]: ...

    def delete(self, url: str, piece_id: str, capability: str) -> bool: ...

    def audit(self, url: str, piece_id: str, leaf_index: int, nonce: str, capability: str) -> LeafProof: ...

    def list(self, url: str, capability: str) -> list[tuple[str, int]]: ...

    def stats(self, url: str, capability: str) -> StoreStats: ...


def _chunks(body: Body) -> list[bytes | memoryview]:
    if isinstance(body, bytes | bytearray | memoryview):
        return [body]
    return list(body)


class LocalTransport:
    """Piece services in this process, addressed by their url (e.g. ``local://d-1``)."""

    def __init__(self, services: Mapping[str, PieceService] | None = None) -> None:
        self.services: dict[str, PieceService] = dict(services or {})
        self.offline: set[str] = set()

    def _service(self, url: str) -> PieceService:
        service = self.services.get(url)
        if service is None or url in self.offline:
            raise PieceServerUnreachable(f"piece server {url} is not reachable")
        return service

    def put(self, url: str, piece_id: str, body: Body, leaf_bytes: int, capability: str) -> bool:
        chunks = _chunks(body)
        return self._service(url).put(capability, piece_id, chunks, sum(len(c) for c in chunks), leaf_bytes)

    def get(self, url: str, piece_id: str, capability: str, start: int = 0, end: int | None = None) -> bytes:
        return self._service(url).get(capability, piece_id, start, end)

    def leaves(self, url: str, piece_id: str, capability: str) -> tuple[int, int, bytes]:
        return self._service(url).leaves(capability, piece_id)

    def delete(self, url: str, piece_id: str, capability: str) -> bool:
        return self._service(url).delete(capability, piece_id)

    def audit(self, url: str, piece_id: str, leaf_index: int, nonce: str, capability: str) -> LeafProof:
        return self._service(url).audit(capability, piece_id, leaf_index, nonce)

    def list(self, url: str, capability: str) -> list[tuple[str, int]]:
        return self._service(url).list(capability)

    def stats(self, url: str, capability: str) -> StoreStats:
        return self._service(url).stats(capability)


_ERRORS: dict[str, type[DgptError]] = {
    "PieceCorrupt": PieceCorrupt,
    "StoreFull": StoreFull,
}


class HttpTransport:
    """Piece servers over HTTP (one pooled httpx client, shared by all threads)."""

    def __init__(self, connect_timeout_s: float = 3.0, timeout_s: float = 60.0, max_connections: int = 64) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def close(self) -> None:
        self._client.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("HttpTransport holds open connections; make a new one in each process")

    def _request(self, method: str, url: str, capability: str | None, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if capability is not None:
            headers["Authorization"] = f"Bearer {capability}"
        try:
            response = self._client.request(method, url, headers=headers, **kw)
        except self._httpx.TransportError as exc:
            raise PieceServerUnreachable(
                f"piece server {url.split('/v1/')[0]} did not answer: {type(exc).__name__}: {exc}",
                hint="the donor may be offline; reads use other pieces and the head repairs lost ones",
            ) from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: Any) -> DgptError:
        try:
            body = response.json()
            message, hint, code = body.get("error", ""), body.get("hint"), body.get("code", "")
        except ValueError:
            message, hint, code = response.text[:200], None, ""
        status = response.status_code
        if code in _ERRORS:
            return _ERRORS[code](message, hint)
        if status in (401, 403):
            return AuthError(message, status, hint)
        if status == 404:
            return NotFound(message, status, hint)
        if status < 500:
            return InvalidRequest(message, status, hint)
        return StorageError(f"piece server error {status}: {message}", hint)

    def put(self, url: str, piece_id: str, body: Body, leaf_bytes: int, capability: str) -> bool:
        chunks = _chunks(body)
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = self._request(
            "PUT", f"{url}/v1/pieces/{piece_id}", capability, params={"leaf_bytes": leaf_bytes}, content=bytes(content)
            if isinstance(content, memoryview) else content,
        )
        return response.status_code == 201

    def get(self, url: str, piece_id: str, capability: str, start: int = 0, end: int | None = None) -> bytes:
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        return bytes(self._request("GET", f"{url}/v1/pieces/{piece_id}", capability, headers=headers).content)

    def leaves(self, url: str, piece_id: str, capability: str) -> tuple[int, int, bytes]:
        response = self._request("GET", f"{url}/v1/pieces/{piece_id}/leaves", capability)
        return int(response.headers["X-Piece-Bytes"]), int(response.headers["X-Leaf-Bytes"]), bytes(response.content)

    def delete(self, url: str, piece_id: str, capability: str) -> bool:
        try:
            self._request("DELETE", f"{url}/v1/pieces/{piece_id}", capability)
        except NotFound:
            return False
        return True

    def audit(self, url: str, piece_id: str, leaf_index: int, nonce: str, capability: str) -> LeafProof:
        response = self._request(
            "POST", f"{url}/v1/pieces/{piece_id}/audit", capability, json={"leaf_index": leaf_index, "nonce": nonce}
        )
        try:
            body = response.json()
            return LeafProof(
                piece_id=str(body["piece_id"]),
                leaf_index=int(body["leaf_index"]),
                leaf=base64.b64decode(body["leaf"]),
                path=tuple(bytes.fromhex(h) for h in body["path"]),
                nonce=str(body["nonce"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"piece server {url} answered an audit with a malformed proof: {exc}") from exc

    def list(self, url: str, capability: str) -> list[tuple[str, int]]:
        body = self._request("GET", f"{url}/v1/pieces", capability).json()
        return [(str(p), int(b)) for p, b in body["pieces"]]

    def stats(self, url: str, capability: str) -> StoreStats:
        body = self._request("GET", f"{url}/v1/stats", capability).json()
        return StoreStats(int(body["used_bytes"]), int(body["capacity_bytes"]), int(body["pieces"]))

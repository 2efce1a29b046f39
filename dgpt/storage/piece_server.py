"""The piece server a donor agent embeds: capability-checked piece operations over HTTP.

:class:`PieceService` is the whole policy (every operation checks a capability, then acts on
the :class:`~dgpt.storage.piece_store.PieceStore`); :func:`build_app` puts it behind a small
Starlette app and :func:`start` runs that app on uvicorn in a background thread::

    handle = start(PieceStore(folder, capacity_bytes), donor_id, donor_key, port=port)
    handle.url      # http://127.0.0.1:PORT, what the donor reports to the head
    handle.stop()

Routes (all but ``/v1/health`` need ``Authorization: Bearer <capability>``):

    PUT    /v1/pieces/{id}?leaf_bytes=N   store (body = the piece)       201 new, 200 had it
    GET    /v1/pieces/{id}                the piece; ``Range: bytes=a-b`` -> 206
    GET    /v1/pieces/{id}/leaves         its leaf hashes (X-Piece-Bytes, X-Leaf-Bytes)
    DELETE /v1/pieces/{id}                204, or 404
    POST   /v1/pieces/{id}/audit          {"leaf_index", "nonce"} -> leaf + Merkle path
    GET    /v1/pieces                     [[id, stored bytes], ...]
    GET    /v1/stats                      used / capacity / pieces
    GET    /v1/health                     liveness, no capability

Errors are JSON ``{"error", "hint", "code"}``: 401/403 capability, 404 no such piece,
400/411/413/416 bad request, 422 body does not match its id, 507 store full.
``python -m dgpt.storage.piece_server`` runs one as its own process (tests stand these in
for donor agents).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgpt.exceptions import ApiError, DgptError, InvalidRequest, NotFound, PieceCorrupt, StoreFull
from dgpt.storage import capability, merkle
from dgpt.storage.capability import Op
from dgpt.storage.piece_store import MAX_PIECE_BYTES, PieceStore, StoreStats

Clock = Callable[[], float]


class PieceService:
    """Every piece operation, each behind a capability check for this donor."""

    def __init__(self, store: PieceStore, donor_id: str, donor_key: bytes, clock: Clock = time.time) -> None:
        self.store = store
        self.donor_id = donor_id
        self._key = donor_key
        self._clock = clock

    def check(self, token: str | None, op: Op, piece_id: str | None = None) -> None:
        """Raises AuthError (401/403) unless ``token`` allows ``op`` on ``piece_id`` here."""
        capability.verify(token, self._key, self.donor_id, op, piece_id, self._clock())

    def put(self, token: str | None, piece_id: str, chunks: Iterable[bytes | memoryview],
            piece_bytes: int, leaf_bytes: int) -> bool:
        self.check(token, Op.PUT, piece_id)
        return self.store.put(piece_id, chunks, piece_bytes, leaf_bytes)

    def get(self, token: str | None, piece_id: str, start: int = 0, end: int | None = None) -> bytes:
        self.check(token, Op.GET, piece_id)
        return self.store.get(piece_id, start, end)

    def leaves(self, token: str | None, piece_id: str) -> tuple[int, int, bytes]:
        self.check(token, Op.GET, piece_id)
        return self.store.leaf_hashes(piece_id)

    def delete(self, token: str | None, piece_id: str) -> bool:
        self.check(token, Op.DELETE, piece_id)
        return self.store.delete(piece_id)

    def audit(self, token: str | None, piece_id: str, leaf_index: int, nonce: str) -> merkle.LeafProof:
        self.check(token, Op.AUDIT, piece_id)
        return self.store.audit(piece_id, leaf_index, nonce)

    def list(self, token: str | None) -> list[tuple[str, int]]:
        self.check(token, Op.LIST)
        return self.store.list()

    def stats(self, token: str | None) -> StoreStats:
        self.check(token, Op.STATS)
        return self.store.stats()


# --------------------------------------------------------------------------- HTTP


def error_status(exc: BaseException) -> int:
    """The HTTP status a piece-server error is answered with."""
    if isinstance(exc, ApiError):
        return exc.status_code
    if isinstance(exc, PieceCorrupt):
        return 422
    if isinstance(exc, StoreFull):
        return 507
    return 500


def build_app(service: PieceService) -> Any:
    """The Starlette app serving ``service``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header[:7].lower() == "bearer " else None

    def fail(exc: BaseException) -> JSONResponse:
        hint = exc.hint if isinstance(exc, DgptError) else None
        message = exc.message if isinstance(exc, DgptError) else f"internal error: {type(exc).__name__}"
        return JSONResponse({"error": message, "hint": hint, "code": type(exc).__name__}, status_code=error_status(exc))

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except (DgptError, ValueError) as exc:
                if isinstance(exc, ValueError):
                    exc = InvalidRequest(str(exc), 400)
                return fail(exc)

        return endpoint

    def int_param(value: str | None, name: str) -> int:
        if value is None:
            raise InvalidRequest(f"{name} is required", 400)
        try:
            return int(value)
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer, got {value[:40]!r}", 400) from None

    async def put_piece(request: Request) -> Response:
        piece_id = request.path_params["piece_id"]
        token = bearer(request)
        # Refuse before reading the body: a stranger's upload costs us nothing.
        service.check(token, Op.PUT, piece_id)
        length = request.headers.get("content-length")
        if length is None:
            raise InvalidRequest("Content-Length is required", 411)
        piece_bytes = int_param(length, "Content-Length")
        if piece_bytes > MAX_PIECE_BYTES:
            raise InvalidRequest(f"piece of {piece_bytes} bytes exceeds {MAX_PIECE_BYTES}", 413)
        leaf_bytes = int_param(request.query_params.get("leaf_bytes"), "leaf_bytes")
        body = await request.body()
        created = await run_in_threadpool(service.put, token, piece_id, [body], piece_bytes, leaf_bytes)
        return JSONResponse({"piece_id": piece_id, "created": created}, status_code=201 if created else 200)

    async def get_piece(request: Request) -> Response:
        piece_id = request.path_params["piece_id"]
        token = bearer(request)
        spec = request.headers.get("range")
        if spec is None:
            data = await run_in_threadpool(service.get, token, piece_id)
            return Response(data, media_type="application/octet-stream")
        start, end = _parse_range(spec)
        data = await run_in_threadpool(service.get, token, piece_id, start, end)
        total = service.store.info(piece_id).piece_bytes
        headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        return Response(data, status_code=206, media_type="application/octet-stream", headers=headers)

    async def get_leaves(request: Request) -> Response:
        piece_bytes, leaf_bytes, hashes = await run_in_threadpool(
            service.leaves, bearer(request), request.path_params["piece_id"]
        )
        headers = {"X-Piece-Bytes": str(piece_bytes), "X-Leaf-Bytes": str(leaf_bytes)}
        return Response(hashes, media_type="application/octet-stream", headers=headers)

    async def delete_piece(request: Request) -> Response:
        piece_id = request.path_params["piece_id"]
        if not await run_in_threadpool(service.delete, bearer(request), piece_id):
            raise NotFound(f"no piece {piece_id[:16]}... on this donor", 404)
        return Response(status_code=204)

    async def audit_piece(request: Request) -> Response:
        try:
            body = await request.json()
            leaf_index = int(body["leaf_index"])
            nonce = str(body["nonce"])
        except (ValueError, KeyError, TypeError):
            raise InvalidRequest('audit body must be {"leaf_index": int, "nonce": str}', 400) from None
        if not 8 <= len(nonce) <= 64:
            raise InvalidRequest(f"nonce must be 8..64 characters, got {len(nonce)}", 400)
        proof = await run_in_threadpool(service.audit, bearer(request), request.path_params["piece_id"], leaf_index, nonce)
        return JSONResponse({
            "piece_id": proof.piece_id,
            "leaf_index": proof.leaf_index,
            "leaf": base64.b64encode(proof.leaf).decode(),
            "path": [h.hex() for h in proof.path],
            "nonce": proof.nonce,
        })

    async def list_pieces(request: Request) -> Response:
        pieces = await run_in_threadpool(service.list, bearer(request))
        return JSONResponse({"pieces": [[p, b] for p, b in pieces]})

    async def stats(request: Request) -> Response:
        s = await run_in_threadpool(service.stats, bearer(request))
        return JSONResponse({"used_bytes": s.used_bytes, "capacity_bytes": s.capacity_bytes, "pieces": s.pieces})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "donor_id": service.donor_id})

    routes = [
        Route("/v1/health", guarded(health), methods=["GET"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
        Route("/v1/pieces", guarded(list_pieces), methods=["GET"]),
        Route("/v1/pieces/{piece_id}", guarded(put_piece), methods=["PUT"]),
        Route("/v1/pieces/{piece_id}", guarded(get_piece), methods=["GET"]),
        Route("/v1/pieces/{piece_id}", guarded(delete_piece), methods=["DELETE"]),
        Route("/v1/pieces/{piece_id}/leaves", guarded(get_leaves), methods=["GET"]),
        Route("/v1/pieces/{piece_id}/audit", guarded(audit_piece), methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _parse_range(spec: str) -> tuple[int, int | None]:
    """``bytes=a-b`` (inclusive b, as HTTP says) -> [a, b + 1); ``bytes=a-`` -> [a, None)."""
    unit, _, value = spec.partition("=")
    first, sep, last = value.partition("-")
    try:
        if unit.strip() != "bytes" or not sep or "," in value:
            raise ValueError
        start = int(first)
        end = int(last) + 1 if last.strip() else None
    except ValueError:
        raise InvalidRequest(f"Range must be 'bytes=START-END', got {spec[:60]!r}", 416) from None
    if start < 0 or (end is not None and end <= start):
        raise InvalidRequest(f"Range {spec[:60]!r} is empty or negative", 416)
    return start, end


@dataclass
class PieceServerHandle:
    """A running piece server: its ``url``, its service, and ``stop()``."""

    url: str
    service: PieceService
    _server: Any
    _thread: threading.Thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def start(store: PieceStore, donor_id: str, donor_key: bytes, host: str = "127.0.0.1", port: int = 0,
          clock: Clock = time.time, advertise_host: str | None = None, timeout_s: float = 15.0) -> PieceServerHandle:
    """Run a piece server for ``store`` in a background thread; returns once it accepts requests.

    Args:
        store: the donor's piece store.
        donor_id, donor_key: whose capabilities it accepts (``K_d`` from the head).
        host, port: where to listen; port 0 lets the OS choose (the handle's url says which).
        advertise_host: the host named in ``url`` (default: ``host``, or 127.0.0.1 for 0.0.0.0).
    Raises:
        DgptError: the port cannot be bound, or the server did not start within ``timeout_s``.
    """
    import uvicorn

    service = PieceService(store, donor_id, donor_key, clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DgptError(f"piece server cannot listen on {host}:{port}: {exc}", hint="choose another port") from exc
    bound = sock.getsockname()[1]
    config = uvicorn.Config(build_app(service), log_level="warning", lifespan="off", access_log=False,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"piece-server-{donor_id}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise DgptError(f"piece server for {donor_id} did not start on {host}:{bound}", hint="see the log above")
        time.sleep(0.01)
    shown = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    return PieceServerHandle(f"http://{shown}:{bound}", service, server, thread)


def main(argv: list[str] | None = None) -> int:
    """Run one piece server as a process until SIGTERM/SIGINT; prints ``{"url": ...}`` when up."""
    parser = argparse.ArgumentParser(prog="python -m dgpt.storage.piece_server")
    parser.add_argument("--root", required=True, type=Path, help="folder for the pieces")
    parser.add_argument("--capacity-bytes", required=True, type=int)
    parser.add_argument("--donor-id", required=True)
    parser.add_argument("--key-file", required=True, type=Path, help="file holding K_d in hex")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync (tests on throwaway disks)")
    args = parser.parse_args(argv)
    key = bytes.fromhex(args.key_file.read_text().strip())
    store = PieceStore(args.root, args.capacity_bytes, fsync=not args.no_fsync)
    handle = start(store, args.donor_id, key, host=args.host, port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"url": handle.url, "donor_id": args.donor_id}), flush=True)
    stop.wait()
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

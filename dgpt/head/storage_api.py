"""The storage tier's REST routes (``/api/v1/storage``), added to the control plane's app.

File bytes are the request and response bodies (``application/octet-stream``), streamed:
the head seals and uploads (or fetches and opens) segment by segment, so a file never sits
whole in the head's memory. A write becomes visible when its body has been read to the end
and every segment is stored; a request cut off half-way leaves no file. Reads honour
``Range: bytes=a-b``. Metadata calls of the fsspec filesystem (clients outside Ray that move
the bytes themselves) go through ``POST /api/v1/storage/meta/{method}``. Everything takes
the API key, except a donor's own leave, which takes its donor secret.

When the head runs no storage tier (``storage=None``), the routes answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect

from dgpt.exceptions import ApiError, InvalidRequest

# The app's own auth dependencies and error documentation (api.py adds these routes in build_app).
from dgpt.head.api import _api_key as api_key_dep
from dgpt.head.api import _donor_secret as donor_secret_dep
from dgpt.head.api import _errors as errors
from dgpt.head.api import _links as links
from dgpt.sdk.models import DONOR_ID_PATTERN, RegisterRequest, RegisterResponse
from dgpt.sdk.storage import StorageEntry, StorageLeaveResponse, StorageStatus
from dgpt.storage.models import check_path
from dgpt.storage.rpc import METHODS

#: Uploads under this prefix stream to donors; the API's body limit does not apply to them.
STORAGE_UPLOADS = "/api/v1/storage/files/"
#: Plaintext the head hands to the segment writer at once (and reads per response chunk).
CHUNK_BYTES = 8 << 20

class _AnyPath(Convertor[str]):
    """Starlette's ``path`` convertor, but across newlines too: a path with a control character
    reaches its route and is refused there with a 422 naming it, not an undocumented 404."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())

StoragePath = Annotated[str, Path(min_length=1, max_length=1024, description="The file's path, e.g. `data/part-0.parquet`.")]
DonorId = Annotated[str, Path(min_length=1, max_length=63, pattern=DONOR_ID_PATTERN)]

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


class StoragePort(Protocol):
    """What the routes need of the head's storage tier (``dgpt.head.storage_tier.HeadStorage``)."""

    def register(self, donor_id: str, req: RegisterRequest) -> str | None: ...

    def write(self, path: str, chunks: Iterator[bytes], overwrite: bool = True) -> StorageEntry: ...

    def reader(self, path: str) -> Any: ...

    def ls(self, path: str) -> list[StorageEntry]: ...

    def info(self, path: str) -> StorageEntry: ...

    def remove(self, path: str, recursive: bool = False) -> list[StorageEntry]: ...

    def status(self) -> StorageStatus: ...

    def leave(self, donor_id: str) -> StorageLeaveResponse: ...

    def call(self, method: str, kwargs: dict[str, Any]) -> Any: ...


def with_storage_key(storage: StoragePort | None, req: RegisterRequest, resp: RegisterResponse) -> RegisterResponse:
    """The registration answer with the donor's storage key, when it joins the storage tier."""
    if storage is None:
        return resp
    key = storage.register(resp.donor_id, req)
    return resp.model_copy(update={"storage_key": key}) if key else resp


def checked_path(path: str, what: str = "path") -> str:
    """A storage path, or a 422 that names it (empty, '.' or '..' components, NUL, too long)."""
    try:
        return check_path(path, what)
    except ValueError as exc:
        raise InvalidRequest(f"{what}: {exc}", 422, hint="paths are '/'-separated names, like 'data/train.parquet'") from None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as [start, end), or None for the whole file.

    Raises:
        ApiError: 416 for a range that is malformed or starts past the end.
    """
    if header is None:
        return None
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        raise ApiError(f"Range {header[:60]!r} must be one 'bytes=START-END'", 416)
    lo_text, sep, hi_text = spec[6:].partition("-")
    try:
        if not sep:
            raise ValueError
        if lo_text == "":
            start, end = max(0, size - int(hi_text)), size
        else:
            start = int(lo_text)
            end = size if hi_text == "" else min(size, int(hi_text) + 1)
    except ValueError:
        raise ApiError(f"Range {header[:60]!r} must be one 'bytes=START-END'", 416) from None
    if start >= size or start < 0 or end <= start:
        raise ApiError(f"Range {header[:60]!r} is outside the file's {size} bytes", 416)
    return start, end


def add_storage_routes(app: FastAPI, storage: StoragePort | None, require_key: Callable[[str | None], None],
                       check_donor: Callable[[str, str | None], None]) -> None:
    """Add the ``/api/v1/storage`` routes (and the donor's storage leave) to ``app``."""

    def tier() -> StoragePort:
        if storage is None:
            raise ApiError("this head runs no storage tier", 503, hint="start the head with the storage tier on")
        return storage

    async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    entry_links = {"get": links("getStorageFile", path="$response.body#/path"),
                   "delete": links("deleteStorageFile", path="$response.body#/path")}

    @app.put("/api/v1/storage/files/{path:anypath}", response_model=StorageEntry, status_code=201, tags=["storage"],
             operation_id="putStorageFile",
             openapi_extra={"requestBody": {"required": True, "content": _BINARY}},
             responses={**errors(401, 409, 503, body=True),
                        201: {"description": "Stored; visible now, replacing any older version.", "links": entry_links}})
    async def put_file(path: StoragePath, request: Request, key: str | None = Depends(api_key_dep),
                       overwrite: bool = Query(True, description="Replace an existing file (else 409).")) -> StorageEntry:
        """Store a file (the body is its bytes); it becomes visible atomically once all of it is stored."""
        require_key(key)
        path = checked_path(path)
        svc = tier()
        writer_q: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=4)
        loop = asyncio.get_running_loop()

        def chunks() -> Iterator[bytes]:
            while True:
                item = asyncio.run_coroutine_threadsafe(writer_q.get(), loop).result()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        task = asyncio.ensure_future(blocking(svc.write, path, chunks(), overwrite))
        buf = bytearray()
        try:
            async for part in request.stream():
                buf += part
                if len(buf) >= CHUNK_BYTES:
                    await _put_or_fail(writer_q, bytes(buf), task)
                    buf.clear()
            if buf:
                await _put_or_fail(writer_q, bytes(buf), task)
            await _put_or_fail(writer_q, None, task)
        except BaseException as exc:
            if not task.done():
                # The body was cut off: the writer aborts, and no file becomes visible.
                await writer_q.put(_CutOff("the request body was cut off"))
                with contextlib.suppress(BaseException):
                    await task
            if isinstance(exc, ClientDisconnect):  # the client went away: nobody to answer, nothing to log
                raise InvalidRequest(f"the body of {path} was cut off; nothing was stored", 400,
                                     hint="send the whole file again") from None
            raise
        entry: StorageEntry = await task
        return entry

    @app.get("/api/v1/storage/files/{path:anypath}", tags=["storage"], operation_id="getStorageFile",
             response_class=Response,
             responses={**errors(401, 404, 416, 503, params=True, plain=True),
                        200: {"content": _BINARY, "description": "The file's bytes, verified."},
                        206: {"content": _BINARY, "description": "The requested range (`Range: bytes=a-b`)."}})
    async def get_file(path: StoragePath, request: Request, key: str | None = Depends(api_key_dep)) -> Response:
        """Read a file (or, with a `Range` header, part of it); every piece is checked against its hash."""
        require_key(key)
        reader = await blocking(tier().reader, checked_path(path))
        span = parse_range(request.headers.get("range"), reader.size)
        lo, hi = span or (0, reader.size)

        def body() -> Iterator[bytes]:
            for off in range(lo, hi, CHUNK_BYTES):
                yield reader.read(off, min(hi, off + CHUNK_BYTES))

        headers = {"Content-Length": str(hi - lo), "Accept-Ranges": "bytes"}
        if span is not None:
            headers["Content-Range"] = f"bytes {lo}-{hi - 1}/{reader.size}"
        if hi - lo <= CHUNK_BYTES:  # small: answer at once, so a failed read is a proper error
            data = await blocking(reader.read, lo, hi) if hi > lo else b""
            return Response(data, status_code=206 if span else 200, headers=headers,
                            media_type="application/octet-stream")
        return StreamingResponse(body(), status_code=206 if span else 200, headers=headers,
                                 media_type="application/octet-stream")

    @app.delete("/api/v1/storage/files/{path:anypath}", response_model=list[StorageEntry], tags=["storage"],
                operation_id="deleteStorageFile", responses=errors(401, 404, 409, 503, params=True))
    async def delete_file(path: StoragePath, key: str | None = Depends(api_key_dep),
                          recursive: bool = Query(False, description="A directory: delete the files under it too.")
                          ) -> list[StorageEntry]:
        """Delete a file, or an empty directory (with `recursive`, any directory); answers what was deleted."""
        require_key(key)
        removed: list[StorageEntry] = await blocking(tier().remove, checked_path(path), recursive)
        return removed

    @app.get("/api/v1/storage/ls", response_model=list[StorageEntry], tags=["storage"], operation_id="listStorage",
             responses=errors(401, 404, 503, params=True))
    async def ls(key: str | None = Depends(api_key_dep),
                 path: str = Query("", max_length=1024, description="A directory ('' is the root) or a file.")
                 ) -> list[StorageEntry]:
        """List a directory of the storage tier."""
        require_key(key)
        entries: list[StorageEntry] = await blocking(tier().ls, checked_path(path))
        return entries

    @app.get("/api/v1/storage/status", response_model=StorageStatus, tags=["storage"], operation_id="getStorageStatus",
             responses=errors(401, 503))
    async def status(key: str | None = Depends(api_key_dep)) -> StorageStatus:
        """Durability of every file, the repair backlog, and the donors of the storage tier."""
        require_key(key)
        result: StorageStatus = await blocking(tier().status)
        return result

    @app.post("/api/v1/storage/meta/{method}", tags=["storage"], operation_id="callStorageMetadata",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"type": "object", "description": "The call's keyword arguments."}}}}},
              responses={**errors(401, 404, 409, 503, body=True),
                         200: {"description": "The call's answer (JSON; bytes as base64).",
                               "content": {"application/json": {"schema": {}}}}})
    async def meta(method: Annotated[str, Path(description="One of: " + ", ".join(METHODS),
                                               json_schema_extra={"enum": list(METHODS)})],
                   request: Request, key: str | None = Depends(api_key_dep)) -> Response:
        """A metadata call of the storage tier's filesystem (for clients that move the bytes to donors themselves)."""
        require_key(key)
        svc = tier()
        try:
            kwargs = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise InvalidRequest(f"body: invalid JSON: {exc}", 400, hint="send the call's arguments as a JSON object") from None
        if not isinstance(kwargs, dict):
            raise InvalidRequest("body: must be a JSON object of the call's arguments", 400)
        from dgpt.storage.rpc import answer_adapter

        result = await blocking(svc.call, method, kwargs)
        return Response(answer_adapter(method).dump_json(result), media_type="application/json")

    @app.post("/api/v1/donors/{donor_id}/storage/leave", response_model=StorageLeaveResponse, tags=["donors"],
              operation_id="leaveStorage", responses=errors(401, 404, 503, params=True))
    async def leave(donor_id: DonorId, secret: str | None = Depends(donor_secret_dep)) -> StorageLeaveResponse:
        """A donor leaving for good: its pieces move to other donors first (the answer comes when they have)."""
        check_donor(donor_id, secret)
        result: StorageLeaveResponse = await blocking(tier().leave, donor_id)
        return result


async def _put_or_fail(q: asyncio.Queue[bytes | BaseException | None], item: bytes | None, task: asyncio.Future[Any]) -> None:
    """Hand a chunk to the writer thread, unless it already failed (then raise its error)."""
    while True:
        if task.done():
            task.result()  # raises the writer's error
            raise ApiError("the write ended before the body did", 500)
        try:
            await asyncio.wait_for(q.put(item), 0.5)
            return
        except asyncio.TimeoutError:
            continue


class _CutOff(Exception):
    """Tells the writer thread that the request body ended early."""

"""The control plane's REST API (FastAPI), served on the head by its own ASGI server.

Routes live under ``/api/v1``; the OpenAPI schema is at ``/api/openapi.json`` and the docs at
``/api/docs``. It runs in the control-plane process next to the registry (no Ray call per
request) and on its own port, apart from Serve's inference proxy, so inference load cannot
starve donors' heartbeats. Three security schemes, all ``Authorization: Bearer``: a join
token (register), a donor secret (heartbeat, leave, the donor's own view and credit), an API
key (everything an app or an operator does); pausing and resuming a donor takes either its
secret or an API key. Every error has one shape (``ErrorBody``): a body that cannot be parsed
gets a 400, a bad field a 422 that names it, and a refused request stores nothing. The pages
operators and donors look at (``dgpt.head.pages``) are served here too, under ``/pages/``.

The schema is a versioned contract (``API_VERSION``; the released one is committed as
``openapi-v1.json`` next to this file, and a unit test refuses breaking changes to it): each
operation declares the security scheme it takes, every status it can answer, and the
links a client follows from one answer to the next (register -> heartbeat -> leave, create
token -> revoke, submit job -> status / logs / stop).

Standby donors long-poll: a heartbeat with ``wait_s`` is held until the autoscaler
activates the donor or the wait ends (at most ``MAX_HELD`` at once).
"""

import asyncio
import json
import logging
import re
from collections.abc import Callable, MutableMapping
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import unquote

from fastapi import Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgpt.contract import DonorState
from dgpt.credit.book import CreditBook
from dgpt.exceptions import (
    ApiError,
    DataUnavailable,
    DgptError,
    NotEnoughDonors,
    StoreFull,
    WriteConflict,
)
from dgpt.head.credit_api import credit_router
from dgpt.head.pages import ServeDetails, pages_router
from dgpt.head.registry import Registry
from dgpt.head.store import read_ledger
from dgpt.sdk.models import (
    DONOR_ID_PATTERN,
    JOB_ID_PATTERN,
    ClusterView,
    DonorView,
    ErrorBody,
    FleetSessionView,
    Heartbeat,
    HeartbeatResponse,
    JobSubmitRequest,
    JobView,
    LeaveRequest,
    LeaveResponse,
    PauseResponse,
    RegisterRequest,
    RegisterResponse,
    SessionImport,
    TokenCreateRequest,
    TokenView,
)
from dgpt.tls import pin_token

log = logging.getLogger("dgpt.api")

#: The contract's version (``info.version``): minor for additions, major for breaking changes.
API_VERSION = "1.6.0"
#: Request bodies larger than this are refused with 413 before they are read.
MAX_BODY_BYTES = 1 << 20
#: Heartbeats held open at once; past it standby donors are answered at once, with their
#: full interval (each held request is a socket and a few KB on the head).
MAX_HELD = 20_000

DonorId = Annotated[str, Path(min_length=1, max_length=63, pattern=DONOR_ID_PATTERN,
                              description="The donor's id (`d-...`, or the name a local-fabric donor joined with).")]
TokenId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$")]
JobId = Annotated[str, Path(min_length=1, max_length=128, pattern=JOB_ID_PATTERN)]


class Recorded(BaseModel):
    status: Literal["recorded"] = "recorded"


class Revoked(BaseModel):
    status: Literal["revoked"] = "revoked"


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class HeadServices(Protocol):
    """What the API needs besides the registry (the control plane provides it; tests fake it)."""

    def autoscaler_status(self) -> dict[str, Any]: ...

    def cluster_resources(self) -> tuple[dict[str, float], dict[str, float]]: ...

    def jobs(self) -> Any: ...

    ray_address: str
    dashboard_url: str
    # The pin of the API's certificate, which join tokens carry; None without TLS.
    tls_fingerprint: str | None


# ---------------------------------------------------------------- errors

_ERR = {"model": ErrorBody}
_DESCRIPTIONS = {
    400: "The body could not be parsed (not UTF-8, not JSON); `detail` names `body`.",
    401: "Missing, wrong or revoked credentials.",
    404: "No such donor, token, job or file.",
    409: "The request clashes with current state (for storage: the path is taken, or the tier has too few "
         "donors of distinct owners with free disk for a new file; for a resume: an operator paused the donor).",
    413: f"The body is larger than {MAX_BODY_BYTES} bytes (file uploads to /api/v1/storage have no limit).",
    416: "The Range header is malformed or lies outside the file.",
    422: "A field is invalid; `detail` names each one.",
    502: "Ray refused the request.",
    503: "Ray's job server or dashboard does not answer (the head is starting or restarting), or fewer than k "
         "pieces of a file's segment are online now; retry.",
}


def _errors(*codes: int, body: bool = False, params: bool = False,
            plain: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of an operation: ``codes`` plus what any request can get.

    Any request may get 413 (the limit is checked before routing); one with a body 400 and
    422; one with parameters 422. ``plain``: the operation answers text/plain on success;
    its errors are JSON all the same (the framework would file them under text/plain).
    """
    every = [413, *([400] if body else []), *([422] if body or params else []), *codes]
    shape: dict[str, Any] = (
        {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}} if plain else _ERR)
    return {code: {**shape, "description": _DESCRIPTIONS[code]} for code in sorted(set(every))}


def _links(operation_id: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link: the operation a client can call next, with values from this exchange."""
    return {"operationId": operation_id, "parameters": parameters}


def _error(status: int, error: str, message: str, hint: str | None = None,
           detail: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "message": message, "hint": hint}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body, headers=headers)


def _dgpt_error_response(exc: DgptError) -> JSONResponse:
    return _error(error_status(exc), type(exc).__name__, exc.message, exc.hint)


def _internal_error(exc: Exception) -> JSONResponse:
    return _error(500, "internal error", f"the control plane failed: {type(exc).__name__}",
                  hint="see the control plane's traceback in the head's logs/control-plane.log")


def _unparsable(problem: str) -> JSONResponse:
    return _error(400, "invalid body", f"body: {problem}", hint="send a UTF-8 JSON object as the body",
                  detail=[{"field": "body", "problem": problem}])


def _ray_jobs_error(exc: Exception) -> ApiError:
    """What a Ray Jobs failure means for the caller (the client raises RuntimeError with Ray's
    HTTP status in its text, ValueError/TypeError for a runtime_env it cannot use, and
    connection errors when the dashboard does not answer)."""
    text = str(exc)
    if isinstance(exc, ConnectionError) or type(exc).__module__.startswith(("requests", "urllib3")):
        return ApiError(f"Ray's job server does not answer: {text}", 503, hint="retry in a few seconds")
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(f"runtime_env: {text}", 422, hint="fix runtime_env (see Ray's runtime environments)")
    if "does not exist" in text or "not found" in text.lower():
        return ApiError(text, 404, hint="list jobs with `dgpt job list`")
    if "already exists" in text:
        return ApiError(text, 409, hint="choose another submission_id, or omit it")
    if "status code 400" in text:
        return ApiError(f"Ray Jobs refused the request: {text}", 422, hint="fix the field Ray names")
    return ApiError(f"Ray Jobs refused the request: {text}", 502)


class EncodedSlashes:
    """ASGI middleware: an encoded ``/`` (``%2F``) stays inside its path segment.

    The server decodes the path before routing, so ``/donors/x%2Fheartbeat`` would reach
    another operation than the one the client addressed. Routed on a path that keeps
    ``%2F`` encoded, it reaches the addressed operation, whose parameter check refuses it
    with a 422 naming the parameter.
    """

    _SLASH = re.compile(r"%2[fF]")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and b"%2" in raw:
            text = raw.split(b"?", 1)[0].decode("latin-1")
            if self._SLASH.search(text):
                scope = {**scope, "path": "%2F".join(unquote(part) for part in self._SLASH.split(text))}
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, before reading them."""

    def __init__(self, app: Any, limit: int, unlimited: str | None = None) -> None:
        self.app, self.limit, self.unlimited = app, limit, unlimited

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        # File uploads stream to the storage tier chunk by chunk: no limit to hold them to.
        if scope["type"] != "http" or (self.unlimited and scope.get("path", "").startswith(self.unlimited)):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _error(413, "payload too large", f"the body has {int(length)} bytes; at most {self.limit} are accepted",
                         hint="send a smaller request")(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _error(413, "payload too large", f"the body has more than {self.limit} bytes",
                         hint="send a smaller request")(scope, receive, send)


class _TooLarge(BaseException):
    # Not an Exception: the framework's body parsing would turn one into a 400.
    pass


# ---------------------------------------------------------------- held heartbeats


class HeldHeartbeats:
    """Standby donors' heartbeats waiting for an activation (long-poll)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._events)

    async def wait(self, donor_id: str, timeout_s: float) -> bool:
        """Hold until :meth:`wake` or ``timeout_s``; True when woken."""
        self._loop = asyncio.get_running_loop()
        event = self._events.setdefault(donor_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if self._events.get(donor_id) is event:
                del self._events[donor_id]

    def wake(self, donor_id: str) -> None:
        """Wake the donor's held heartbeat, if any (thread-safe: the autoscaler calls it)."""
        loop = self._loop
        if loop is None or donor_id not in self._events:
            return
        loop.call_soon_threadsafe(self._set, donor_id)

    def _set(self, donor_id: str) -> None:
        event = self._events.get(donor_id)
        if event is not None:
            event.set()


async def answer_heartbeat(registry: Registry, held: HeldHeartbeats, donor_id: str, secret: str | None,
                           hb: Heartbeat) -> HeartbeatResponse:
    """A heartbeat's answer, held (long-poll) while the registry allows: the route's and the fast path's."""
    resp, hold_s = registry.heartbeat(donor_id, secret, hb, can_hold=len(held) < MAX_HELD)
    if hold_s > 0 and await held.wait(donor_id, hold_s):
        resp, _ = registry.heartbeat(donor_id, secret, hb, can_hold=False)
    return resp


class _ControlPlaneApp(FastAPI):
    """The API's app: FastAPI, with heartbeats answered on :class:`HeartbeatFastPath` first."""

    fast_path: "HeartbeatFastPath | None" = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable) -> None:
        if self.fast_path is not None and scope["type"] == "http":
            await self.fast_path(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)


class HeartbeatFastPath:
    """``POST /api/v1/donors/{donor_id}/heartbeat`` without the framework's machinery.

    The heartbeat is the one request a large fleet sends hundreds of times a second, and the
    framework's routing, dependency solving and response encoding cost several times what the
    registry does for it. This path answers a well-formed heartbeat (the donor id, the
    bearer secret, a JSON body that is a valid ``Heartbeat``) directly, and so the registry's
    errors, as the app would. Any other request, and any heartbeat that is not well formed,
    goes to the app with its body replayed, and is answered (400, 413, 422) as the schema says.
    """

    _PATH = re.compile(r"^/api/v1/donors/([^/]+)/heartbeat$")
    _DONOR_ID = re.compile(DONOR_ID_PATTERN)

    def __init__(self, registry: Registry, held: HeldHeartbeats, route: APIRoute, limit: int = MAX_BODY_BYTES) -> None:
        self.registry, self.held, self.route, self.limit = registry, held, route, limit
        #: Heartbeats this path answered, and those it handed to the app (tests read these).
        self.answered = self.handed_on = 0

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable, app: Callable) -> None:
        # A path with an escape (``%2F`` above all) is the app's: EncodedSlashes routes it as sent.
        raw = scope.get("raw_path") or b""
        m = self._PATH.match(scope["path"]) if scope["method"] == "POST" and b"%" not in raw else None
        if m is None:
            await app(scope, receive, send)
            return
        body, replay = await self._read(receive)
        hb, secret = self._parse(scope, m.group(1), body)
        if hb is None:
            self.handed_on += 1
            await app(scope, replay, send)
            return
        scope["route"] = self.route  # what the app's own routing would leave for the metrics
        self.answered += 1
        donor_id = m.group(1)
        try:
            resp = await answer_heartbeat(self.registry, self.held, donor_id, secret, hb)
        except DgptError as exc:
            await _dgpt_error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            log.error("POST %s failed", scope["path"], exc_info=exc)
            await _internal_error(exc)(scope, receive, send)
            return
        payload = resp.model_dump_json().encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    async def _read(self, receive: Callable) -> tuple[bytes | None, Callable]:
        """The whole body (None: over the limit, or the client left), and a ``receive`` that
        replays what was read, then reads on."""
        messages: list[dict] = []
        size, whole = 0, True
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                whole = False
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                whole = False
                break
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        body = b"".join(m.get("body", b"") for m in messages) if whole else None
        return body, replay

    def _parse(self, scope: MutableMapping[str, Any], donor_id: str, body: bytes | None) -> tuple[Heartbeat | None, str | None]:
        """The heartbeat and secret of a well-formed request; (None, None) for the app to answer."""
        if body is None or len(donor_id) > 63 or not self._DONOR_ID.match(donor_id):
            return None, None
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        # As the framework reads them: a body of a JSON content type, and an
        # `Authorization: Bearer <secret>` header.
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            return None, None
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None, None
        try:
            return Heartbeat.model_validate(json.loads(body)), secret
        except (ValueError, ValidationError):  # the app answers 400 or 422, naming the field
            return None, None


# ---------------------------------------------------------------- auth

_join_scheme = HTTPBearer(scheme_name="joinToken", auto_error=False,
                          description="A join token for donors: `dgpt token create` on the head.")
_donor_scheme = HTTPBearer(scheme_name="donorSecret", auto_error=False,
                           description="The donor secret returned once by registration.")
_api_scheme = HTTPBearer(scheme_name="apiKey", auto_error=False,
                         description="An API key: `$DGPT_HOME/head/api_key`, or `dgpt token create --kind api`.")


async def _join_token(creds: HTTPAuthorizationCredentials | None = Security(_join_scheme)) -> str | None:
    return creds.credentials if creds else None


async def _donor_secret(creds: HTTPAuthorizationCredentials | None = Security(_donor_scheme)) -> str | None:
    return creds.credentials if creds else None


async def _api_key(creds: HTTPAuthorizationCredentials | None = Security(_api_scheme)) -> str | None:
    return creds.credentials if creds else None


def _job_view(info: Any) -> JobView:
    def secs(ms: int | None) -> float | None:
        return ms / 1000.0 if ms else None

    return JobView(
        job_id=info.submission_id or info.job_id,
        status=str(getattr(info.status, "value", info.status)),
        entrypoint=info.entrypoint,
        message=info.message,
        start_time=secs(info.start_time),
        end_time=secs(info.end_time),
        metadata=info.metadata or {},
    )


# ---------------------------------------------------------------- the app


def error_status(exc: DgptError) -> int:
    """The HTTP status of an error: an API error's own, a storage error's by its kind, else 500."""
    if isinstance(exc, ApiError):
        return exc.status_code
    return next((code for cls, code in _STORAGE_STATUS if isinstance(exc, cls)), 500)


# Too few donors is the fleet's state, which the client can change (more donors): 409, not a server error.
_STORAGE_STATUS = ((WriteConflict, 409), (NotEnoughDonors, 409), (DataUnavailable, 503), (StoreFull, 507))


def build_app(registry: Registry, services: HeadServices, held: HeldHeartbeats | None = None,
              credit: CreditBook | None = None, storage: Any = None,
              serve_details: ServeDetails | None = None) -> FastAPI:
    """The control plane's ASGI app over ``registry``; ``held`` receives long-polls; ``credit``:
    the credit ledger (default: one over the registry's SQLite file); ``storage`` is the head's
    storage tier (``dgpt.head.storage_tier.HeadStorage``; None: its routes answer 503);
    ``serve_details``: Serve's applications and replicas (default: from the head's Ray dashboard)."""
    from dgpt.head.storage_api import STORAGE_UPLOADS, add_storage_routes, with_storage_key

    held = held if held is not None else HeldHeartbeats()  # not `or`: an empty one is falsy (__len__)
    credit = credit if credit is not None else CreditBook(registry.store, lambda: read_ledger(registry.store.path), registry.clock)
    registry.on_wake = held.wake
    app = _ControlPlaneApp(
        title="dgpt control plane",
        version=API_VERSION,
        description="Donors, jobs, tokens, cluster status, credit, the storage tier, and the operator's and "
                    "donors' pages of a dgpt fabric.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.add_middleware(EncodedSlashes)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, unlimited=STORAGE_UPLOADS)
    app.state.held = held
    app.state.credit = credit

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # its loc is the byte offset, not a field
                return _unparsable(f"invalid JSON: {err.get('ctx', {}).get('error', '')}")
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append({"field": loc, "problem": str(err.get("msg", "invalid"))})
        message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        return _error(422, "invalid request", message, hint="fix the named field(s)", detail=problems)

    @app.exception_handler(DgptError)
    async def _dgpt_error(_: Request, exc: DgptError) -> JSONResponse:
        return _dgpt_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # the framework's only 400: a body it could not decode
            return _unparsable(f"{exc.detail} (not UTF-8 JSON)")
        if exc.status_code == 405:
            # The framework's Allow names one route's methods; the path may have several routes.
            allowed = sorted({m for r in app.routes if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                              for m in r.methods or ()})
            return _error(405, "method not allowed", f"{request.method} is not allowed here; use {', '.join(allowed)}",
                          headers={"Allow": ", ".join(allowed)})
        names = {404: "not found"}
        return _error(exc.status_code, names.get(exc.status_code, "error"), str(exc.detail),
                      headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's fault: the traceback goes to the log, the one error shape to the caller.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _internal_error(exc)

    def require_key(key: str | None) -> None:
        registry.check_api_key(key)

    async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def jobs_call(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await blocking(lambda: getattr(services.jobs(), name)(*args, **kwargs))
        except Exception as exc:
            raise _ray_jobs_error(exc) from None

    # ------------------------------------------------------------ health

    @app.get("/api/v1/health", response_model=Health, tags=["head"], operation_id="health",
             responses=_errors(), openapi_extra={"security": []})
    async def health() -> Health:
        """The control plane answers (no credentials needed)."""
        return Health()

    # ------------------------------------------------------------ donors

    donor_links = {name: _links(op, donor_id="$response.body#/donor_id")
                   for name, op in (("heartbeat", "heartbeatDonor"), ("leave", "leaveDonor"), ("get", "getDonor"))}

    @app.post("/api/v1/donors", response_model=RegisterResponse, status_code=201, tags=["donors"],
              operation_id="registerDonor",
              responses={**_errors(401, 409, body=True),
                         201: {"description": "Registered; the secret is in this answer only.", "links": donor_links}})
    async def register(req: RegisterRequest, token: str | None = Depends(_join_token)) -> RegisterResponse:
        """Register a donor with a join token; answers its id and secret (kept across rejoins)."""
        return with_storage_key(storage, req, registry.register(req, token))

    @app.post("/api/v1/donors/{donor_id}/heartbeat", response_model=HeartbeatResponse, tags=["donors"],
              operation_id="heartbeatDonor",
              responses={**_errors(401, body=True),
                         200: {"description": "What the donor does next.",
                               "links": {"heartbeat": _links("heartbeatDonor", donor_id="$request.path.donor_id"),
                                         "leave": _links("leaveDonor", donor_id="$request.path.donor_id")}}})
    async def heartbeat(donor_id: DonorId, hb: Heartbeat, secret: str | None = Depends(_donor_secret)) -> HeartbeatResponse:
        """Report the agent's state; the answer says what to do next (standby, activate, drain).

        A standby donor may ask the head to hold the request up to ``wait_s`` seconds: it is
        answered as soon as the autoscaler activates it.
        """
        return await answer_heartbeat(registry, held, donor_id, secret, hb)

    @app.post("/api/v1/donors/{donor_id}/leave", response_model=LeaveResponse, tags=["donors"],
              operation_id="leaveDonor", responses=_errors(401, body=True))
    async def leave(donor_id: DonorId, req: LeaveRequest, secret: str | None = Depends(_donor_secret)) -> LeaveResponse:
        """The donor leaves: its node drains through Ray's DrainNode with a deadline."""
        return await blocking(registry.leave, donor_id, secret, req)

    @app.get("/api/v1/donors", response_model=list[DonorView], tags=["donors"], operation_id="listDonors", responses={
        **_errors(401, params=True),
        200: {"description": "A page of donors in registration order.", "headers": {
            "X-Next-Cursor": {"description": "Pass as `after` for the next page; absent on the last.",
                              "schema": {"type": "string"}},
            "X-Total-Count": {"description": "How many donors match (when cheap to know).",
                              "schema": {"type": "integer"}}}}})
    async def list_donors(
        response: Response,
        key: str | None = Depends(_api_key),
        state: DonorState | None = Query(None, description="Only donors in this state."),
        owner: str | None = Query(None, min_length=1, max_length=63, description="Only this owner's donors."),
        device_class: str | None = Query(None, min_length=1, max_length=63, description="Only this device class."),
        after: str | None = Query(None, min_length=1, max_length=63, description="The previous page's X-Next-Cursor."),
        limit: int = Query(500, ge=1, le=5000, description="Donors per page."),
    ) -> list[DonorView]:
        """List donors, paginated and filtered."""
        require_key(key)
        page, cursor, total = registry.list_donors(state=state, owner=owner, device_class=device_class,
                                                   after=after, limit=limit)
        if cursor:
            response.headers["X-Next-Cursor"] = cursor
        if total is not None:
            response.headers["X-Total-Count"] = str(total)
        return page

    @app.get("/api/v1/donors/{donor_id}", response_model=DonorView, tags=["donors"], operation_id="getDonor",
             responses=_errors(401, 404, params=True))
    async def get_donor(donor_id: DonorId, key: str | None = Depends(_api_key)) -> DonorView:
        """One donor: profile, caps, state, labels, sessions, reliability."""
        require_key(key)
        return registry.donor_view(donor_id)

    @app.get("/api/v1/donors/{donor_id}/own", response_model=DonorView, tags=["donors"], operation_id="getOwnDonor",
             responses=_errors(401, params=True))
    async def get_own_donor(donor_id: DonorId, secret: str | None = Depends(_donor_secret)) -> DonorView:
        """The donor's own view, with its donor secret (what the donor page shows)."""
        registry.check_donor_secret(donor_id, secret)
        return registry.donor_view(donor_id)

    # Pause and resume take the donor's secret or an API key. Both schemes read the same
    # header; declaring both documents that either is accepted.

    @app.post("/api/v1/donors/{donor_id}/pause", response_model=PauseResponse, tags=["donors"],
              operation_id="pauseDonor", responses=_errors(401, 404, params=True))
    async def pause_donor(donor_id: DonorId, secret: str | None = Depends(_donor_secret),
                          key: str | None = Depends(_api_key)) -> PauseResponse:
        """Pause a donor on the head: it drains now (its session ends `drained`, reason `paused`)
        and is never activated until resumed, across restarts of its agent and of the head.

        Its owner pauses it with the donor secret, an operator with an API key (404 for an
        unknown donor then). Pausing a paused donor changes nothing.
        """
        by = registry.pauser(donor_id, secret or key)
        return await blocking(registry.pause, donor_id, by)

    @app.post("/api/v1/donors/{donor_id}/resume", response_model=PauseResponse, tags=["donors"],
              operation_id="resumeDonor", responses=_errors(401, 404, 409, params=True))
    async def resume_donor(donor_id: DonorId, secret: str | None = Depends(_donor_secret),
                           key: str | None = Depends(_api_key)) -> PauseResponse:
        """Resume a paused donor: the autoscaler may activate it again. Its secret lifts its
        owner's pause; an API key lifts any (an operator's pause answers 409 to the donor)."""
        return registry.resume(donor_id, registry.pauser(donor_id, secret or key))

    @app.get("/api/v1/sessions", response_model=list[FleetSessionView], tags=["donors"],
             operation_id="listEndedSessions", responses=_errors(401, params=True))
    async def ended_sessions(key: str | None = Depends(_api_key),
                             limit: int = Query(50, ge=1, le=200, description="Sessions at most.")) -> list[FleetSessionView]:
        """The fleet's latest ended sessions, newest first: its drains and losses."""
        require_key(key)
        return registry.ended_sessions(limit)

    @app.post("/api/v1/donors/{donor_id}/drain", response_model=LeaveResponse, tags=["donors"],
              operation_id="drainDonor", responses=_errors(401, 404, body=True))
    async def drain_donor(donor_id: DonorId, req: LeaveRequest, key: str | None = Depends(_api_key)) -> LeaveResponse:
        """An operator drains a donor (DrainNode with a deadline)."""
        require_key(key)
        return await blocking(registry.drain_donor, donor_id, req.reason,
                              req.deadline_s or registry.settings.drain_deadline_s)

    @app.post("/api/v1/donors/{donor_id}/sessions", response_model=Recorded, status_code=201, tags=["donors"],
              operation_id="importDonorSession", responses=_errors(401, 404, body=True))
    async def import_session(donor_id: DonorId, session: SessionImport, key: str | None = Depends(_api_key)) -> Recorded:
        """Import a finished session (history from elsewhere); it seeds the donor's reliability."""
        require_key(key)
        registry.record_session(donor_id, session.started_at, session.ended_at, session.ended_as)
        return Recorded()

    # ------------------------------------------------------------ tokens

    @app.post("/api/v1/tokens", response_model=TokenView, status_code=201, tags=["tokens"], operation_id="createToken",
              responses={**_errors(401, body=True),
                         201: {"description": "Created; the secret (`token`) is in this answer only.",
                               "links": {"revoke": _links("revokeToken", token_id="$response.body#/token_id")}}})
    async def create_token(req: TokenCreateRequest, key: str | None = Depends(_api_key)) -> TokenView:
        """Create a join token (donors) or an API key (apps); the secret is in this answer only.

        Over HTTPS a join token carries the API certificate's fingerprint after ``@``
        (``dgpt_join_...@sha256:<hex>``): donors pin it and send only the part before."""
        require_key(key)
        made = registry.create_token(req.kind, req.label)
        if req.kind == "join" and made.token and services.tls_fingerprint:
            made = made.model_copy(update={"token": pin_token(made.token, services.tls_fingerprint)})
        return made

    @app.get("/api/v1/tokens", response_model=list[TokenView], tags=["tokens"], operation_id="listTokens",
             responses=_errors(401))
    async def list_tokens(key: str | None = Depends(_api_key)) -> list[TokenView]:
        """Every token, never its secret."""
        require_key(key)
        return registry.list_tokens()

    @app.delete("/api/v1/tokens/{token_id}", response_model=Revoked, tags=["tokens"], operation_id="revokeToken",
                responses=_errors(401, 404, params=True))
    async def revoke_token(token_id: TokenId, key: str | None = Depends(_api_key)) -> Revoked:
        """Revoke a token: it is refused from now on."""
        require_key(key)
        registry.revoke_token(token_id)
        return Revoked()

    # ------------------------------------------------------------ cluster

    @app.get("/api/v1/cluster", response_model=ClusterView, tags=["head"], operation_id="getCluster",
             responses=_errors(401))
    async def cluster(key: str | None = Depends(_api_key)) -> ClusterView:
        """Donors by state, Ray's resources, the autoscaler's last decisions."""
        require_key(key)
        counts = registry.counts()
        total, avail = await blocking(services.cluster_resources)
        autoscaler = await blocking(services.autoscaler_status)
        autoscaler["donor_changes"] = [{"at": t, "donor_id": d, "what": w} for t, d, w in registry.recent_changes()]
        autoscaler["standby_heartbeat_interval_s"] = round(registry.standby_interval_s(), 1)
        autoscaler["held_heartbeats"] = len(held)
        return ClusterView(
            donors_by_state=counts,
            active_donors=counts.get(DonorState.ACTIVE.value, 0),
            standby_donors=counts.get(DonorState.STANDBY.value, 0),
            resources_total=total,
            resources_available=avail,
            autoscaler=autoscaler,
            ray_address=services.ray_address,
            dashboard_url=services.dashboard_url,
            rogue_nodes=registry.rogue_nodes(),
        )

    # ------------------------------------------------------------ jobs

    job_links = {name: _links(op, job_id="$response.body#/job_id")
                 for name, op in (("status", "getJob"), ("logs", "getJobLogs"), ("stop", "stopJob"))}

    @app.post("/api/v1/jobs", response_model=JobView, status_code=201, tags=["jobs"], operation_id="submitJob",
              responses={**_errors(401, 409, 502, 503, body=True),
                         201: {"description": "Submitted to Ray Jobs.", "links": job_links}})
    async def submit_job(req: JobSubmitRequest, key: str | None = Depends(_api_key)) -> JobView:
        """Submit a Ray job (entrypoint and runtime_env)."""
        require_key(key)
        kwargs: dict[str, Any] = {"entrypoint": req.entrypoint, "runtime_env": req.runtime_env, "metadata": req.metadata}
        if req.submission_id:
            kwargs["submission_id"] = req.submission_id
        if req.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = req.entrypoint_num_cpus
        if req.entrypoint_num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = req.entrypoint_num_gpus
        job_id = await jobs_call("submit_job", **kwargs)
        return _job_view(await jobs_call("get_job_info", job_id))

    @app.get("/api/v1/jobs", response_model=list[JobView], tags=["jobs"], operation_id="listJobs",
             responses=_errors(401, 502, 503))
    async def list_jobs(key: str | None = Depends(_api_key)) -> list[JobView]:
        """Jobs submitted through Ray's Jobs API."""
        require_key(key)
        return [_job_view(j) for j in await jobs_call("list_jobs") if j.submission_id]

    @app.get("/api/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], operation_id="getJob",
             responses=_errors(401, 404, 502, 503, params=True))
    async def job_status(job_id: JobId, key: str | None = Depends(_api_key)) -> JobView:
        """One job's status."""
        require_key(key)
        return _job_view(await jobs_call("get_job_info", job_id))

    @app.get("/api/v1/jobs/{job_id}/logs", response_class=PlainTextResponse, tags=["jobs"], operation_id="getJobLogs",
             responses={**_errors(401, 404, 502, 503, params=True, plain=True),
                        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "The job's driver log."}})
    async def job_logs(job_id: JobId, key: str | None = Depends(_api_key)) -> str:
        """A job's driver log."""
        require_key(key)
        return str(await jobs_call("get_job_logs", job_id))

    @app.delete("/api/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], operation_id="stopJob",
                responses=_errors(401, 404, 502, 503, params=True))
    async def stop_job(job_id: JobId, key: str | None = Depends(_api_key)) -> JobView:
        """Stop a job (a finished one is left as it is)."""
        require_key(key)
        await jobs_call("stop_job", job_id)
        return _job_view(await jobs_call("get_job_info", job_id))

    app.include_router(credit_router(registry, credit, DonorId, _errors, _api_key, _donor_secret))
    app.include_router(pages_router(registry, credit, serve_details, _errors, _api_key))
    add_storage_routes(app, storage, require_key, registry.check_donor_secret)
    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.operation_id == "heartbeatDonor")
    app.fast_path = HeartbeatFastPath(registry, held, route)
    return app

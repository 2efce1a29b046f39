"""The control plane's REST API (FastAPI), served on the head by its own ASGI server.

Routes live under ``/api/v1``; the OpenAPI schema is at ``/api/openapi.json`` and the docs at
``/api/docs``. It runs in the control-plane process next to the registry (no Ray call per
request) and on its own port, apart from Serve's inference proxy, so inference load cannot
starve donors' heartbeats. Three security schemes, all ``Authorization: Bearer``: a join
token (register), a donor secret (heartbeat, leave), an API key (everything an app or an
operator does). Every error has one shape (``ErrorBody``): a bad field gets a 422 that
names it, and a refused request stores nothing.

Standby donors long-poll: a heartbeat with ``wait_s`` is held until the autoscaler
activates the donor or the wait ends (at most ``MAX_HELD`` at once).
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgpt.contract import DonorState
from dgpt.exceptions import ApiError, DgptError
from dgpt.head.registry import Registry
from dgpt.sdk.models import (
    ClusterView,
    DonorView,
    ErrorBody,
    Heartbeat,
    HeartbeatResponse,
    JobSubmitRequest,
    JobView,
    LeaveRequest,
    LeaveResponse,
    RegisterRequest,
    RegisterResponse,
    SessionImport,
    TokenCreateRequest,
    TokenView,
)

log = logging.getLogger("dgpt.api")

API_VERSION = "1.1.0"
#: Request bodies larger than this are refused with 413 before they are read.
MAX_BODY_BYTES = 1 << 20
#: Heartbeats held open at once; past it standby donors are answered at once, with their
#: full interval (each held request is a socket and a few KB on the head).
MAX_HELD = 20_000

DonorId = Annotated[str, Path(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
                              description="The donor's id (`d-...`, or the name a local-fabric donor joined with).")]
TokenId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$")]
JobId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[-A-Za-z0-9_.:]+$")]


class Recorded(BaseModel):
    status: str = "recorded"


class Revoked(BaseModel):
    status: str = "revoked"


class Health(BaseModel):
    status: str = "ok"


class HeadServices(Protocol):
    """What the API needs besides the registry (the control plane provides it; tests fake it)."""

    def autoscaler_status(self) -> dict[str, Any]: ...

    def cluster_resources(self) -> tuple[dict[str, float], dict[str, float]]: ...

    def jobs(self) -> Any: ...

    ray_address: str
    dashboard_url: str


# ---------------------------------------------------------------- errors

_ERR = {"model": ErrorBody}
_DESCRIPTIONS = {
    400: "The body could not be parsed.",
    401: "Missing, wrong or revoked credentials.",
    404: "No such donor, token or job.",
    409: "The request clashes with current state.",
    413: f"The body is larger than {MAX_BODY_BYTES} bytes.",
    422: "A field is invalid; `detail` names each one.",
    502: "Ray refused the request.",
    503: "The control plane is starting or restarting; retry.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {**_ERR, "description": _DESCRIPTIONS[code]} for code in (400, 413, 422, *codes)}


def _error(status: int, error: str, message: str, hint: str | None = None,
           detail: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "message": message, "hint": hint}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(status_code=status, content=body)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, before reading them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
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


# ---------------------------------------------------------------- auth

_join_scheme = HTTPBearer(scheme_name="joinToken", auto_error=False,
                          description="A join token for donors: `dgpt token create` on the head.")
_donor_scheme = HTTPBearer(scheme_name="donorSecret", auto_error=False,
                           description="The donor secret returned once by registration.")
_api_scheme = HTTPBearer(scheme_name="apiKey", auto_error=False,
                         description="An API key: `$DGPT_HOME/head/api_key`, or `dgpt token create --kind api`.")


def _join_token(creds: HTTPAuthorizationCredentials | None = Security(_join_scheme)) -> str | None:
    return creds.credentials if creds else None


def _donor_secret(creds: HTTPAuthorizationCredentials | None = Security(_donor_scheme)) -> str | None:
    return creds.credentials if creds else None


def _api_key(creds: HTTPAuthorizationCredentials | None = Security(_api_scheme)) -> str | None:
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


def build_app(registry: Registry, services: HeadServices, held: HeldHeartbeats | None = None) -> FastAPI:
    """The control plane's ASGI app over ``registry``; ``held`` receives long-polls."""
    held = held or HeldHeartbeats()
    registry.on_wake = held.wake
    app = FastAPI(
        title="dgpt control plane",
        version=API_VERSION,
        description="Donors, jobs, tokens and cluster status of a dgpt fabric.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.state.held = held

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # its loc is the byte offset, not a field
                problems.append({"field": "body", "problem": f"invalid JSON: {err.get('ctx', {}).get('error', '')}"})
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append({"field": loc, "problem": str(err.get("msg", "invalid"))})
        message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        return _error(422, "invalid request", message, hint="fix the named field(s)", detail=problems)

    @app.exception_handler(DgptError)
    async def _dgpt_error(_: Request, exc: DgptError) -> JSONResponse:
        status = exc.status_code if isinstance(exc, ApiError) else 500
        return _error(status, type(exc).__name__, exc.message, exc.hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {400: "bad request", 404: "not found", 405: "method not allowed"}
        return _error(exc.status_code, names.get(exc.status_code, "error"), str(exc.detail))

    def require_key(key: str | None) -> None:
        registry.check_api_key(key)

    async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def jobs_call(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await blocking(getattr(services.jobs(), name), *args, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if "does not exist" in text or "not found" in text.lower():
                raise ApiError(text, 404, hint="list jobs with `dgpt job list`") from None
            raise ApiError(f"Ray Jobs refused the request: {text}", 502) from None

    # ------------------------------------------------------------ health

    @app.get("/api/v1/health", response_model=Health, tags=["head"], responses={503: {**_ERR, "description": _DESCRIPTIONS[503]}})
    async def health() -> Health:
        return Health()

    # ------------------------------------------------------------ donors

    @app.post("/api/v1/donors", response_model=RegisterResponse, status_code=201, tags=["donors"],
              responses=_errors(401, 409))
    async def register(req: RegisterRequest, token: str | None = Depends(_join_token)) -> RegisterResponse:
        """Register a donor with a join token; answers its id and secret (kept across rejoins)."""
        return registry.register(req, token)

    @app.post("/api/v1/donors/{donor_id}/heartbeat", response_model=HeartbeatResponse, tags=["donors"],
              responses=_errors(401))
    async def heartbeat(donor_id: DonorId, hb: Heartbeat, secret: str | None = Depends(_donor_secret)) -> HeartbeatResponse:
        """Report the agent's state; the answer says what to do next (standby, activate, drain).

        A standby donor may ask the head to hold the request up to ``wait_s`` seconds: it is
        answered as soon as the autoscaler activates it.
        """
        resp, hold_s = registry.heartbeat(donor_id, secret, hb, can_hold=len(held) < MAX_HELD)
        if hold_s > 0 and await held.wait(donor_id, hold_s):
            resp, _ = registry.heartbeat(donor_id, secret, hb, can_hold=False)
        return resp

    @app.post("/api/v1/donors/{donor_id}/leave", response_model=LeaveResponse, tags=["donors"],
              responses=_errors(401))
    async def leave(donor_id: DonorId, req: LeaveRequest, secret: str | None = Depends(_donor_secret)) -> LeaveResponse:
        """The donor leaves: its node drains through Ray's DrainNode with a deadline."""
        return await blocking(registry.leave, donor_id, secret, req)

    @app.get("/api/v1/donors", response_model=list[DonorView], tags=["donors"], responses={
        **_errors(401),
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

    @app.get("/api/v1/donors/{donor_id}", response_model=DonorView, tags=["donors"], responses=_errors(401, 404))
    async def get_donor(donor_id: DonorId, key: str | None = Depends(_api_key)) -> DonorView:
        """One donor: profile, caps, state, labels, sessions, reliability."""
        require_key(key)
        return registry.donor_view(donor_id)

    @app.post("/api/v1/donors/{donor_id}/drain", response_model=LeaveResponse, tags=["donors"],
              responses=_errors(401, 404))
    async def drain_donor(donor_id: DonorId, req: LeaveRequest, key: str | None = Depends(_api_key)) -> LeaveResponse:
        """An operator drains a donor (DrainNode with a deadline)."""
        require_key(key)
        return await blocking(registry.drain_donor, donor_id, req.reason,
                              req.deadline_s or registry.settings.drain_deadline_s)

    @app.post("/api/v1/donors/{donor_id}/sessions", response_model=Recorded, status_code=201, tags=["donors"],
              responses=_errors(401, 404))
    async def import_session(donor_id: DonorId, session: SessionImport, key: str | None = Depends(_api_key)) -> Recorded:
        """Import a finished session (history from elsewhere); it seeds the donor's reliability."""
        require_key(key)
        registry.record_session(donor_id, session.started_at, session.ended_at, session.ended_as)
        return Recorded()

    # ------------------------------------------------------------ tokens

    @app.post("/api/v1/tokens", response_model=TokenView, status_code=201, tags=["tokens"], responses=_errors(401))
    async def create_token(req: TokenCreateRequest, key: str | None = Depends(_api_key)) -> TokenView:
        """Create a join token (donors) or an API key (apps); the secret is in this answer only."""
        require_key(key)
        return registry.create_token(req.kind, req.label)

    @app.get("/api/v1/tokens", response_model=list[TokenView], tags=["tokens"], responses=_errors(401))
    async def list_tokens(key: str | None = Depends(_api_key)) -> list[TokenView]:
        """Every token, never its secret."""
        require_key(key)
        return registry.list_tokens()

    @app.delete("/api/v1/tokens/{token_id}", response_model=Revoked, tags=["tokens"], responses=_errors(401, 404))
    async def revoke_token(token_id: TokenId, key: str | None = Depends(_api_key)) -> Revoked:
        """Revoke a token: it is refused from now on."""
        require_key(key)
        registry.revoke_token(token_id)
        return Revoked()

    # ------------------------------------------------------------ cluster

    @app.get("/api/v1/cluster", response_model=ClusterView, tags=["head"], responses=_errors(401))
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
        )

    # ------------------------------------------------------------ jobs

    @app.post("/api/v1/jobs", response_model=JobView, status_code=201, tags=["jobs"], responses=_errors(401, 404, 502))
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

    @app.get("/api/v1/jobs", response_model=list[JobView], tags=["jobs"], responses=_errors(401, 502))
    async def list_jobs(key: str | None = Depends(_api_key)) -> list[JobView]:
        """Jobs submitted through Ray's Jobs API."""
        require_key(key)
        return [_job_view(j) for j in await jobs_call("list_jobs") if j.submission_id]

    @app.get("/api/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=_errors(401, 404, 502))
    async def job_status(job_id: JobId, key: str | None = Depends(_api_key)) -> JobView:
        """One job's status."""
        require_key(key)
        return _job_view(await jobs_call("get_job_info", job_id))

    @app.get("/api/v1/jobs/{job_id}/logs", response_class=PlainTextResponse, tags=["jobs"],
             responses={**_errors(401, 404, 502), 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                        "description": "The job's driver log."}})
    async def job_logs(job_id: JobId, key: str | None = Depends(_api_key)) -> str:
        """A job's driver log."""
        require_key(key)
        return str(await jobs_call("get_job_logs", job_id))

    @app.delete("/api/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=_errors(401, 404, 502))
    async def stop_job(job_id: JobId, key: str | None = Depends(_api_key)) -> JobView:
        """Stop a job."""
        require_key(key)
        await jobs_call("stop_job", job_id)
        return _job_view(await jobs_call("get_job_info", job_id))

    return app

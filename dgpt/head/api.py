"""The control plane: dgpt's REST API (FastAPI), served by Ray Serve on the head under /api.

Routes live under ``/api/v1``; the OpenAPI schema is at ``/api/openapi.json`` and the docs at
``/api/docs``. Donors authenticate with their join token (register) and then their donor
secret; apps and the CLI with an API key. Every body is validated by the models in
``dgpt.sdk.models``: a bad field gets a 422 that names it, and nothing is stored.
"""


import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from dgpt.config import Settings
from dgpt.exceptions import ApiError, DgptError
from dgpt.head.registry import HEAD_RESOURCE, NAMESPACE, REGISTRY_NAME
from dgpt.sdk.models import (
    ClusterView,
    DonorView,
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

app = FastAPI(
    title="dgpt control plane",
    version="1",
    description="Donors, jobs and cluster status of a dgpt fabric.",
    # Serve mounts this app under /api: the schema's paths are relative to it.
    servers=[{"url": "/api"}],
)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append({"field": loc, "problem": err.get("msg", "invalid")})
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return JSONResponse(status_code=422, content={"error": "invalid request", "message": message, "detail": problems})


def _error_response(exc: DgptError) -> JSONResponse:
    status = exc.status_code if isinstance(exc, ApiError) else 500
    return JSONResponse(status_code=status, content={"error": type(exc).__name__, "message": exc.message, "hint": exc.hint})


@app.exception_handler(DgptError)
async def _dgpt_error(_: Request, exc: DgptError) -> JSONResponse:
    return _error_response(exc)


# Defined before the deployment class: Serve snapshots the class (and what it can see) when
# it is decorated, so helpers defined after it are missing in the replica.
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


@serve.deployment(
    name="control-plane",
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}},
    health_check_period_s=5,
)
@serve.ingress(app)
class ControlPlane:
    """One replica on the head; all state lives in the registry actor's SQLite file."""

    def __init__(self, settings_json: str) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        self._registry: Any = None
        self._jobs: Any = None

    # ---------------------------------------------------------------- helpers

    def _get_registry(self) -> Any:
        import ray

        if self._registry is None:
            self._registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        return self._registry

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the registry; unwrap our own errors so FastAPI maps them to statuses."""
        import ray

        try:
            return await getattr(self._get_registry(), method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, DgptError):
                raise cause from None
            raise
        except ray.exceptions.RayActorError:
            # The registry restarts by itself (max_restarts=-1); ask the caller to retry.
            self._registry = None
            raise ApiError("the registry is restarting", 503, hint="retry in a few seconds") from None

    async def _autoscaler_status(self) -> dict[str, Any]:
        """The autoscaler's bounds, last tick and recent decisions; an error note while it restarts."""
        import ray

        from autoscaler.loop import AUTOSCALER_NAME

        try:
            actor = ray.get_actor(AUTOSCALER_NAME, namespace=NAMESPACE)
            return dict(await asyncio.wait_for(actor.status.remote(), timeout=10))
        except Exception as exc:
            return {"error": f"autoscaler unavailable: {type(exc).__name__}: {str(exc)[:200]}"}

    async def _require_key(self, authorization: str | None) -> None:
        await self._call("check_api_key", _bearer(authorization))

    def _job_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        if self._jobs is None:
            self._jobs = JobSubmissionClient(f"http://127.0.0.1:{self.settings.dashboard_port}")
        return self._jobs

    async def _jobs_call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(getattr(self._job_client(), fn), *args, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if "does not exist" in text or "not found" in text.lower():
                raise ApiError(text, 404, hint="list jobs with `dgpt job list`") from None
            raise ApiError(f"Ray Jobs refused the request: {text}", 502) from None

    # ---------------------------------------------------------------- health

    @app.get("/v1/health")
    async def health(self) -> dict[str, str]:
        await self._call("ping")
        return {"status": "ok"}

    # ---------------------------------------------------------------- donors

    @app.post("/v1/donors", response_model=RegisterResponse, status_code=201)
    async def register(self, req: RegisterRequest, authorization: str | None = Header(None)) -> RegisterResponse:
        return await self._call("register", req, _bearer(authorization))

    @app.post("/v1/donors/{donor_id}/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(self, donor_id: str, hb: Heartbeat, authorization: str | None = Header(None)) -> HeartbeatResponse:
        return await self._call("heartbeat", donor_id, _bearer(authorization), hb)

    @app.post("/v1/donors/{donor_id}/leave", response_model=LeaveResponse)
    async def leave(
        self,
        donor_id: str,
        req: LeaveRequest,
        authorization: str | None = Header(None),
        x_dgpt_api_key: str | None = Header(None),
    ) -> LeaveResponse:
        return await self._call("leave", donor_id, _bearer(authorization), x_dgpt_api_key, req)

    @app.get("/v1/donors", response_model=list[DonorView])
    async def list_donors(self, authorization: str | None = Header(None)) -> list[DonorView]:
        await self._require_key(authorization)
        return await self._call("list_donors")

    @app.get("/v1/donors/{donor_id}", response_model=DonorView)
    async def get_donor(self, donor_id: str, authorization: str | None = Header(None)) -> DonorView:
        await self._require_key(authorization)
        return await self._call("get_donor", donor_id)

    @app.post("/v1/donors/{donor_id}/drain", response_model=LeaveResponse)
    async def drain_donor(self, donor_id: str, req: LeaveRequest, authorization: str | None = Header(None)) -> LeaveResponse:
        await self._require_key(authorization)
        return await self._call("drain_donor", donor_id, req.reason, req.deadline_s or self.settings.drain_deadline_s)

    @app.post("/v1/donors/{donor_id}/sessions", status_code=201)
    async def import_session(self, donor_id: str, session: SessionImport,
                             authorization: str | None = Header(None)) -> dict[str, str]:
        """Import a finished session (history from elsewhere); seeds reliability."""
        await self._require_key(authorization)
        await self._call("record_session", donor_id, session.started_at, session.ended_at, session.ended_as)
        return {"status": "recorded"}

    # ---------------------------------------------------------------- tokens

    @app.post("/v1/tokens", response_model=TokenView, status_code=201)
    async def create_token(self, req: TokenCreateRequest, authorization: str | None = Header(None)) -> TokenView:
        await self._require_key(authorization)
        return await self._call("create_token", req.kind, req.label)

    @app.get("/v1/tokens", response_model=list[TokenView])
    async def list_tokens(self, authorization: str | None = Header(None)) -> list[TokenView]:
        await self._require_key(authorization)
        return await self._call("list_tokens")

    @app.delete("/v1/tokens/{token_id}")
    async def revoke_token(self, token_id: str, authorization: str | None = Header(None)) -> dict[str, str]:
        await self._require_key(authorization)
        await self._call("revoke_token", token_id)
        return {"status": "revoked"}

    # ---------------------------------------------------------------- cluster

    @app.get("/v1/cluster", response_model=ClusterView)
    async def cluster(self, authorization: str | None = Header(None)) -> ClusterView:
        await self._require_key(authorization)
        import ray

        counts = await self._call("counts")
        total = await asyncio.to_thread(ray.cluster_resources)
        avail = await asyncio.to_thread(ray.available_resources)
        changes = await self._call("recent_changes")
        autoscaler = await self._autoscaler_status()
        autoscaler["donor_changes"] = [{"at": t, "donor_id": d, "what": w} for t, d, w in changes[-20:]]
        return ClusterView(
            donors_by_state=counts,
            active_donors=counts.get("active", 0),
            standby_donors=counts.get("standby", 0),
            resources_total=total,
            resources_available=avail,
            autoscaler=autoscaler,
            ray_address=ray.get_runtime_context().gcs_address,
            dashboard_url=f"http://{self.settings.node_ip or '127.0.0.1'}:{self.settings.dashboard_port}",
        )

    # ---------------------------------------------------------------- jobs

    @app.post("/v1/jobs", response_model=JobView, status_code=201)
    async def submit_job(self, req: JobSubmitRequest, authorization: str | None = Header(None)) -> JobView:
        await self._require_key(authorization)
        kwargs: dict[str, Any] = {"entrypoint": req.entrypoint, "runtime_env": req.runtime_env, "metadata": req.metadata}
        if req.submission_id:
            kwargs["submission_id"] = req.submission_id
        if req.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = req.entrypoint_num_cpus
        if req.entrypoint_num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = req.entrypoint_num_gpus
        job_id = await self._jobs_call("submit_job", **kwargs)
        return await self.job_status(job_id, authorization)

    @app.get("/v1/jobs", response_model=list[JobView])
    async def list_jobs(self, authorization: str | None = Header(None)) -> list[JobView]:
        await self._require_key(authorization)
        jobs = await self._jobs_call("list_jobs")
        return [_job_view(j) for j in jobs if j.submission_id]

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    async def job_status(self, job_id: str, authorization: str | None = Header(None)) -> JobView:
        await self._require_key(authorization)
        return _job_view(await self._jobs_call("get_job_info", job_id))

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
    async def job_logs(self, job_id: str, authorization: str | None = Header(None)) -> str:
        await self._require_key(authorization)
        return await self._jobs_call("get_job_logs", job_id)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView)
    async def stop_job(self, job_id: str, authorization: str | None = Header(None)) -> JobView:
        await self._require_key(authorization)
        await self._jobs_call("stop_job", job_id)
        return await self.job_status(job_id, authorization)


def build(settings: Settings) -> Any:
    """The Serve application of the control plane."""
    return ControlPlane.bind(settings.model_dump_json())  # type: ignore[attr-defined]

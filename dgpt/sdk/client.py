"""dgpt.Client (apps and the CLI) and DonorClient (donor agents) over the REST API.

Errors come back typed (``dgpt.exceptions``): AuthError, NotFound, InvalidRequest, Conflict,
ApiError, and HeadUnreachable when nothing answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from dgpt.contract import DonorState
from dgpt.exceptions import ApiError, AuthError, Conflict, HeadUnreachable, InvalidRequest, NotFound
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


@dataclass(frozen=True)
class DonorPage:
    """One page of ``GET /donors``: the donors, the cursor of the next page, the total."""

    items: list[DonorView]
    next_cursor: str | None
    total: int | None


_ERRORS: dict[int, type[ApiError]] = {400: InvalidRequest, 401: AuthError, 403: AuthError, 404: NotFound,
                                      409: Conflict, 413: InvalidRequest, 422: InvalidRequest}


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"head URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/api/v1") else f"{url}/api/v1"


_H = TypeVar("_H", bound="_Http")


class _Http:
    def __init__(self, url: str, timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base = _api_base(url)
        self._http = httpx.Client(base_url=self.base, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, token: str | None = None, body: Any = None,
                 headers: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> httpx.Response:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        content = body.model_dump_json(exclude_none=True) if hasattr(body, "model_dump_json") else None
        if content is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            resp = self._http.request(method, path, content=content, headers=hdrs, params=params)
        except httpx.TransportError as exc:
            raise HeadUnreachable(
                f"cannot reach the dgpt head at {self.base}: {exc}",
                hint="check the URL and that the head runs (`dgpt status`, or `dgpt up` locally)",
            ) from None
        if resp.status_code >= 400:
            try:
                data = resp.json()
            except ValueError:
                data = {"message": resp.text[:500]}
            message = data.get("message") or data.get("detail") or resp.reason_phrase
            cls = _ERRORS.get(resp.status_code, ApiError)
            raise cls(f"{method} {path}: {resp.status_code} {message}", resp.status_code, hint=data.get("hint"))
        return resp


class Client(_Http):
    """The dgpt REST API for apps: donors, jobs, tokens, cluster status.

    Args:
        url: the head's HTTP address, e.g. ``http://HEAD:8000``.
        api_key: an API key (``dgpt token create --kind api``).
    """

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, timeout_s, transport)
        self.api_key = api_key

    def _get(self, path: str) -> Any:
        return self._request("GET", path, self.api_key).json()

    def health(self) -> bool:
        return self._request("GET", "/health").json().get("status") == "ok"

    def donors_page(self, *, state: DonorState | str | None = None, owner: str | None = None,
                    device_class: str | None = None, after: str | None = None, limit: int = 500) -> DonorPage:
        """One page of donors in registration order, filtered by state, owner and device class."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("state", DonorState(state).value if state else None), ("owner", owner),
                           ("device_class", device_class), ("after", after)):
            if value is not None:
                params[key] = value
        resp = self._request("GET", "/donors", self.api_key, params=params)
        total = resp.headers.get("X-Total-Count")
        return DonorPage([DonorView.model_validate(d) for d in resp.json()], resp.headers.get("X-Next-Cursor"),
                         int(total) if total is not None else None)

    def iter_donors(self, **filters: Any) -> Iterator[DonorView]:
        """Every donor matching ``filters`` (as for :meth:`donors_page`), page by page."""
        after = None
        while True:
            page = self.donors_page(after=after, **filters)
            yield from page.items
            if not page.next_cursor:
                return
            after = page.next_cursor

    def donors(self, **filters: Any) -> list[DonorView]:
        """Every donor matching ``filters`` (all pages)."""
        return list(self.iter_donors(**filters))

    def donor(self, donor_id: str) -> DonorView:
        return DonorView.model_validate(self._get(f"/donors/{donor_id}"))

    def drain_donor(self, donor_id: str, reason: str = "leave", deadline_s: float | None = None) -> LeaveResponse:
        body = LeaveRequest(reason=reason, deadline_s=deadline_s)  # type: ignore[arg-type]
        return LeaveResponse.model_validate(self._request("POST", f"/donors/{donor_id}/drain", self.api_key, body).json())

    def import_session(self, donor_id: str, started_at: float, ended_at: float, ended_as: str) -> None:
        body = SessionImport(started_at=started_at, ended_at=ended_at, ended_as=ended_as)  # type: ignore[arg-type]
        self._request("POST", f"/donors/{donor_id}/sessions", self.api_key, body)

    def cluster(self) -> ClusterView:
        return ClusterView.model_validate(self._get("/cluster"))

    def create_token(self, kind: str = "join", label: str = "") -> TokenView:
        body = TokenCreateRequest(kind=kind, label=label)  # type: ignore[arg-type]
        return TokenView.model_validate(self._request("POST", "/tokens", self.api_key, body).json())

    def tokens(self) -> list[TokenView]:
        return [TokenView.model_validate(t) for t in self._get("/tokens")]

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/tokens/{token_id}", self.api_key)

    def submit_job(self, entrypoint: str, runtime_env: dict[str, Any] | None = None, **kwargs: Any) -> JobView:
        body = JobSubmitRequest(entrypoint=entrypoint, runtime_env=runtime_env, **kwargs)
        return JobView.model_validate(self._request("POST", "/jobs", self.api_key, body).json())

    def jobs(self) -> list[JobView]:
        return [JobView.model_validate(j) for j in self._get("/jobs")]

    def job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._get(f"/jobs/{job_id}"))

    def job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/logs", self.api_key).text

    def stop_job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._request("DELETE", f"/jobs/{job_id}", self.api_key).json())


class DonorClient(_Http):
    """The donor side of the API: register with a join token, then heartbeat and leave."""

    def register(self, req: RegisterRequest, join_token: str) -> RegisterResponse:
        return RegisterResponse.model_validate(self._request("POST", "/donors", join_token, req).json())

    def heartbeat(self, donor_id: str, secret: str, hb: Heartbeat) -> HeartbeatResponse:
        resp = self._request("POST", f"/donors/{donor_id}/heartbeat", secret, hb)
        return HeartbeatResponse.model_validate(resp.json())

    def leave(self, donor_id: str, secret: str, req: LeaveRequest) -> LeaveResponse:
        return LeaveResponse.model_validate(self._request("POST", f"/donors/{donor_id}/leave", secret, req).json())

"""dgpt.Client (apps and the CLI) and DonorClient (donor agents) over the REST API.

Errors come back typed (``dgpt.exceptions``): AuthError, NotFound, InvalidRequest, Conflict,
ApiError, and HeadUnreachable when nothing answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import httpx

from dgpt.contract import DonorState
from dgpt.exceptions import ApiError, AuthError, Conflict, HeadUnreachable, InvalidRequest, NotFound
from dgpt.sdk.models import (
    ClusterView,
    CreditHistory,
    CreditSummary,
    CreditVoidRequest,
    CreditVoidResponse,
    DonorCredit,
    DonorView,
    EndpointView,
    FleetHistory,
    FleetSessionView,
    Heartbeat,
    HeartbeatResponse,
    JobSubmitRequest,
    JobView,
    LeaveRequest,
    LeaveResponse,
    LedgerCheck,
    PauseResponse,
    RegisterRequest,
    RegisterResponse,
    SessionImport,
    TokenCreateRequest,
    TokenView,
)
from dgpt.sdk.storage import StorageEntry, StorageLeaveResponse, StorageStatus
from dgpt.tls import HeadTrust


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


def _quoted(path: str) -> str:
    """A storage path in a URL: each '/'-separated name percent-encoded."""
    return "/".join(quote(part, safe="") for part in path.strip("/").split("/"))


_H = TypeVar("_H", bound="_Http")


class _Http:
    """One HTTP(S) connection pool to the head. With HTTPS, ``trust`` says which certificate
    to accept (a pinned one, see :class:`dgpt.tls.HeadTrust`); the pool is opened on the first
    request, so a pin that must be fetched is fetched then (and a head that is down is an
    ordinary :class:`HeadUnreachable`)."""

    def __init__(self, url: str, timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None,
                 trust: HeadTrust | None = None) -> None:
        self.base = _api_base(url)
        self.trust = trust or HeadTrust(url)
        self._timeout_s = timeout_s
        self._transport = transport
        self._client: httpx.Client | None = None

    @property
    def _http(self) -> httpx.Client:
        if self._client is None:
            verify = self.trust.verify() if self._transport is None else False
            self._client = httpx.Client(base_url=self.base, timeout=self._timeout_s, transport=self._transport,
                                        verify=verify)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, token: str | None = None, body: Any = None,
                 headers: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 content: Any = None, timeout_s: float | None = None) -> httpx.Response:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if hasattr(body, "model_dump_json"):
            content = body.model_dump_json(exclude_none=True)
            hdrs["Content-Type"] = "application/json"
        elif content is not None:
            hdrs.setdefault("Content-Type", "application/octet-stream")
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            resp = self._http.request(method, path, content=content, headers=hdrs, params=params, **extra)
        except httpx.TransportError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise HeadUnreachable(
                    f"the dgpt head at {self.base} presented a certificate this client does not trust: {exc}",
                    hint="pin the head's certificate: DGPT_HEAD_FINGERPRINT=sha256:... (`dgpt status` on the head "
                         "prints api_fingerprint), or a join token that carries it",
                ) from None
            raise HeadUnreachable(
                f"cannot reach the dgpt head at {self.base}: {exc}",
                hint="check the URL and that the head runs (`dgpt status`, or `dgpt up` locally)",
            ) from None
        if resp.status_code >= 400:
            self._raise(resp, method, path)
        return resp

    @staticmethod
    def _raise(resp: httpx.Response, method: str, path: str) -> None:
        try:
            data = resp.json()
        except ValueError:
            data = {"message": resp.text[:500]}
        message = data.get("message") or data.get("detail") or resp.reason_phrase
        cls = _ERRORS.get(resp.status_code, ApiError)
        raise cls(f"{method} {path}: {resp.status_code} {message}", resp.status_code, hint=data.get("hint"))


class Client(_Http):
    """The dgpt REST API for apps: donors, jobs, tokens, cluster status.

    Args:
        url: the head's address, e.g. ``https://HEAD:8080``.
        api_key: an API key (``dgpt token create --kind api``).
        fingerprint: the head's certificate pin (``sha256:...``, ``api_fingerprint`` in
            ``dgpt status``); without one an HTTPS head's certificate must chain to a system CA.
        trust: what to trust instead (on the head's machine: ``dgpt.head.process.head_trust``).
    """

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None, fingerprint: str | None = None,
                 trust: HeadTrust | None = None) -> None:
        super().__init__(url, timeout_s, transport, trust or HeadTrust(url, pin=fingerprint))
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

    def pause_donor(self, donor_id: str) -> PauseResponse:
        """Pause a donor on the head (as an operator): it drains now and stays out until resumed."""
        return PauseResponse.model_validate(self._request("POST", f"/donors/{donor_id}/pause", self.api_key).json())

    def resume_donor(self, donor_id: str) -> PauseResponse:
        """Resume a paused donor (any pause, its owner's too): the autoscaler may activate it again."""
        return PauseResponse.model_validate(self._request("POST", f"/donors/{donor_id}/resume", self.api_key).json())

    def ended_sessions(self, limit: int = 50) -> list[FleetSessionView]:
        """The fleet's latest ended sessions (drains and losses), newest first."""
        resp = self._request("GET", "/sessions", self.api_key, params={"limit": limit})
        return [FleetSessionView.model_validate(s) for s in resp.json()]

    def cluster(self) -> ClusterView:
        return ClusterView.model_validate(self._get("/cluster"))

    def fleet_history(self, since: float | None = None) -> FleetHistory:
        """Fleet size over time: donors by state whenever they changed (after ``since``), the last sample now."""
        params = {"since": since} if since is not None else None
        return FleetHistory.model_validate(self._request("GET", "/cluster/history", self.api_key, params=params).json())

    def credit_history(self, window_s: float = 86400.0, points: int = 96) -> CreditHistory:
        """The fleet's credit over the last ``window_s`` seconds, in ``points`` intervals."""
        resp = self._request("GET", "/credit/history", self.api_key, params={"window_s": window_s, "points": points})
        return CreditHistory.model_validate(resp.json())

    def endpoints(self) -> list[EndpointView]:
        """Inference endpoints (Serve applications) with their running replicas per donor."""
        return [EndpointView.model_validate(e) for e in self._get("/endpoints")]

    def credit(self, donor_id: str, entries: int = 50) -> DonorCredit:
        """A donor's credit: totals, recent average credit (per day), per session, the latest ledger rows."""
        resp = self._request("GET", f"/donors/{donor_id}/credit", self.api_key, params={"entries": entries})
        return DonorCredit.model_validate(resp.json())

    def credits(self) -> list[CreditSummary]:
        """Every donor's credit and recent average credit."""
        return [CreditSummary.model_validate(c) for c in self._get("/credit")]

    def void_credit(self, donor_id: str, start_at: float, end_at: float, reason: str) -> CreditVoidResponse:
        """Take back the credit of a donor's work in ``[start_at, end_at]``: its results failed verification."""
        body = CreditVoidRequest(start_at=start_at, end_at=end_at, reason=reason)
        return CreditVoidResponse.model_validate(
            self._request("POST", f"/donors/{donor_id}/credit/void", self.api_key, body).json())

    def verify_credit(self, anchor_seq: int | None = None, anchor_hash: str | None = None) -> LedgerCheck:
        """Check the credit ledger's hash chain (optionally against a tip kept earlier)."""
        params = {"anchor_seq": anchor_seq, "anchor_hash": anchor_hash} if anchor_seq is not None else None
        return LedgerCheck.model_validate(self._request("GET", "/credit/verify", self.api_key, params=params).json())

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

    # ------------------------------------------------------------ storage tier

    def storage_put(self, path: str, data: bytes | Iterable[bytes], overwrite: bool = True,
                    timeout_s: float = 3600.0) -> StorageEntry:
        """Store ``data`` (bytes, or chunks streamed as they come) at ``path``; visible once all is stored."""
        resp = self._request("PUT", f"/storage/files/{_quoted(path)}", self.api_key, content=data,
                             params={"overwrite": str(overwrite).lower()}, timeout_s=timeout_s)
        return StorageEntry.model_validate(resp.json())

    def storage_get(self, path: str, start: int | None = None, end: int | None = None,
                    timeout_s: float = 3600.0) -> bytes:
        """The bytes of ``path`` (``[start, end)`` when given), every piece verified by the head."""
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        return self._request("GET", f"/storage/files/{_quoted(path)}", self.api_key, headers=headers,
                             timeout_s=timeout_s).content

    def storage_download(self, path: str, out: BinaryIO, chunk_bytes: int = 8 << 20) -> int:
        """Stream ``path`` into ``out``; returns the bytes written."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with self._http.stream("GET", f"/storage/files/{_quoted(path)}", headers=headers, timeout=3600.0) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise(resp, "GET", f"/storage/files/{path}")
                n = 0
                for chunk in resp.iter_bytes(chunk_bytes):
                    out.write(chunk)
                    n += len(chunk)
                return n
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"cannot reach the dgpt head at {self.base}: {exc}",
                                  hint="check the URL and that the head runs (`dgpt status`)") from None

    def storage_ls(self, path: str = "") -> list[StorageEntry]:
        resp = self._request("GET", "/storage/ls", self.api_key, params={"path": path})
        return [StorageEntry.model_validate(e) for e in resp.json()]

    def storage_rm(self, path: str, recursive: bool = False) -> list[StorageEntry]:
        resp = self._request("DELETE", f"/storage/files/{_quoted(path)}", self.api_key,
                             params={"recursive": str(recursive).lower()})
        return [StorageEntry.model_validate(e) for e in resp.json()]

    def storage_status(self) -> StorageStatus:
        return StorageStatus.model_validate(self._get("/storage/status"))


class DonorClient(_Http):
    """The donor side of the API: register with a join token, then heartbeat and leave."""

    def register(self, req: RegisterRequest, join_token: str) -> RegisterResponse:
        return RegisterResponse.model_validate(self._request("POST", "/donors", join_token, req).json())

    def heartbeat(self, donor_id: str, secret: str, hb: Heartbeat) -> HeartbeatResponse:
        resp = self._request("POST", f"/donors/{donor_id}/heartbeat", secret, hb)
        return HeartbeatResponse.model_validate(resp.json())

    def leave(self, donor_id: str, secret: str, req: LeaveRequest) -> LeaveResponse:
        return LeaveResponse.model_validate(self._request("POST", f"/donors/{donor_id}/leave", secret, req).json())

    def donor(self, donor_id: str, secret: str) -> DonorView:
        """The donor's own view (state, sessions, uptime, reliability, pause), with its donor secret."""
        return DonorView.model_validate(self._request("GET", f"/donors/{donor_id}/own", secret).json())

    def pause(self, donor_id: str, secret: str) -> PauseResponse:
        """Pause this donor on the head: it drains now and is not activated until :meth:`resume`."""
        return PauseResponse.model_validate(self._request("POST", f"/donors/{donor_id}/pause", secret).json())

    def resume(self, donor_id: str, secret: str) -> PauseResponse:
        """Resume this donor after :meth:`pause` (an operator's pause only an operator lifts)."""
        return PauseResponse.model_validate(self._request("POST", f"/donors/{donor_id}/resume", secret).json())

    def credit(self, donor_id: str, secret: str, entries: int = 50) -> DonorCredit:
        """The donor's own credit, with its donor secret."""
        resp = self._request("GET", f"/donors/{donor_id}/credit/own", secret, params={"entries": entries})
        return DonorCredit.model_validate(resp.json())

    def storage_leave(self, donor_id: str, secret: str, timeout_s: float = 600.0) -> StorageLeaveResponse:
        """Leaving for good: the head moves this donor's pieces, and answers once it has."""
        resp = self._request("POST", f"/donors/{donor_id}/storage/leave", secret, timeout_s=timeout_s)
        return StorageLeaveResponse.model_validate(resp.json())

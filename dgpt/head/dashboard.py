"""The Ray dashboard's Serve REST API with the fabric's token: read and replace Serve's config.

``GET``/``PUT /api/serve/applications/`` is the public API behind ``serve deploy|status``.
`dgpt serve` uses it from the CLI; the head uses it to record what is deployed and to
re-apply it after a head restart. A ``PUT`` replaces every config-deployed application.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import httpx

from dgpt.config import Settings
from dgpt.exceptions import ServeError
from dgpt.head.paths import head_paths

_APPS_PATH = "/api/serve/applications/"
# The dashboard answers in milliseconds; a PUT waits for the controller to accept the config.
_HTTP_TIMEOUT_S = 60.0
_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One keep-alive client for the process: the head asks every few seconds, and a client
    per request builds a TLS context and a connection each time."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=_HTTP_TIMEOUT_S)
        return _client


@dataclass(frozen=True)
class Dashboard:
    """One fabric's dashboard: its URL and the Ray token it takes."""

    url: str
    token: str
    token_path: str = ""

    @classmethod
    def of(cls, settings: Settings) -> Dashboard:
        path = head_paths(settings.home)["ray_token"]
        host = settings.node_ip or "127.0.0.1"
        return cls(f"http://{host}:{settings.dashboard_port}", path.read_text().strip(), str(path))

    def _request(self, method: str, body: Any = None) -> httpx.Response:
        try:
            resp = _http().request(method, self.url + _APPS_PATH, json=body,
                                   headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as exc:
            raise ServeError(f"the Ray dashboard at {self.url} did not answer: {exc}",
                             hint="is the head up? see `dgpt status` and the head's log") from None
        if resp.status_code in (401, 403):
            raise ServeError(f"the Ray dashboard refused the auth token ({resp.status_code})",
                             hint=f"the token file {self.token_path or 'given'} must be the head's")
        if resp.status_code >= 400:
            raise ServeError(f"Serve refused the request ({resp.status_code}): {resp.text.strip()[-1500:]}",
                             hint="fix the config, then `dgpt serve deploy` again")
        return resp

    def serve_details(self) -> dict[str, Any]:
        """Serve's applications, deployments and replicas (``serve status`` in JSON)."""
        return dict(self._request("GET").json())

    def put_serve(self, body: dict[str, Any]) -> None:
        """Replace every config-deployed application with those in ``body``."""
        self._request("PUT", body)


def serve_body(settings: Settings, apps: list[dict[str, Any]], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config for ``apps`` with the head's proxy address (Serve only warns about another)."""
    body: dict[str, Any] = {k: v for k, v in (base or {}).items() if k != "applications"}
    body["http_options"] = {"host": settings.http_host, "port": settings.http_port}
    body["proxy_location"] = "HeadOnly"
    body["applications"] = apps
    return body


def deployed_apps(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The config-deployed applications' configs in ``details`` (by name, so the order is stable)."""
    apps = details.get("applications") or {}
    return [apps[name]["deployed_app_config"] for name in sorted(apps) if apps[name].get("deployed_app_config")]

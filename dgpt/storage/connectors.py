"""Where a ``DonorFileSystem`` finds the fabric's metadata service: the head's actor or its REST API.

- ``fabric://`` (the default): inside Ray (a task, an actor, a driver connected to the
  fabric) through the control-plane actor, found by its name; outside Ray through the
  head's REST API at ``head_url`` / ``api_key`` from the settings (``DGPT_HEAD_URL``,
  ``DGPT_API_KEY``). Nothing else to pass: the same ``DonorFileSystem()`` pickles into every
  Ray task and connects there.
- ``http://HEAD:PORT`` / ``https://...``: that head's REST API, with ``api_key`` from the settings.

Either way the bytes go straight between the client and the donors' piece servers, with the
capabilities the head grants; the head sees only metadata.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from dgpt import contract
from dgpt.config import load_settings
from dgpt.exceptions import ConfigError, HeadUnreachable, StorageError
from dgpt.storage import rpc
from dgpt.storage.service import MetadataClient
from dgpt.storage.transport import HttpTransport, PieceTransport
from dgpt.tls import HeadTrust, tls_files

#: The control-plane actor's method that serves metadata calls.
ACTOR_METHOD = "storage_call"


class RestMetadata:
    """:class:`MetadataClient` over ``POST {head}/api/v1/storage/meta/{method}`` with an API key."""

    def __init__(self, head_url: str, api_key: str | None, timeout_s: float = 60.0,
                 trust: HeadTrust | None = None) -> None:
        import httpx

        base = head_url.rstrip("/")
        self.base = base if base.endswith("/api/v1") else f"{base}/api/v1"
        self._httpx = httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify = (trust or HeadTrust(head_url)).verify()
        self._http = httpx.Client(base_url=self.base, timeout=timeout_s, headers=headers, verify=verify)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("RestMetadata holds open connections; connect in each process")

    def _call(self, method: str, kwargs: dict[str, Any]) -> Any:
        body = rpc.args_model(method)(**kwargs).model_dump_json()
        try:
            resp = self._http.post(f"/storage/meta/{method}", content=body, headers={"Content-Type": "application/json"})
        except self._httpx.TransportError as exc:
            raise HeadUnreachable(f"cannot reach the dgpt head at {self.base}: {exc}",
                                  hint="check DGPT_HEAD_URL and that the head runs (`dgpt status`)") from None
        if resp.status_code >= 400:
            try:
                data = resp.json()
            except ValueError:
                data = {"message": resp.text[:300]}
            raise rpc.error_from(str(data.get("error", "")), str(data.get("message", "")), resp.status_code,
                                 data.get("hint"))
        return rpc.answer_adapter(method).validate_json(resp.content)

    def __getattr__(self, method: str) -> Any:
        if method not in rpc.METHODS:
            raise AttributeError(method)
        return rpc.RemoteMetadata(lambda m, kw: ("ok", self._call(m, kw))).__getattr__(method)


def _in_ray() -> bool:
    # A process that never imported Ray is not connected to it (and importing it costs seconds).
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def actor_metadata() -> MetadataClient:
    """The metadata service through the control-plane actor (this process is connected to Ray)."""
    import ray

    try:
        actor = ray.get_actor(contract.REGISTRY_ACTOR, namespace=contract.NAMESPACE)
    except ValueError:
        raise StorageError("this Ray cluster has no dgpt control plane to find the storage tier through",
                           hint="connect to a dgpt fabric (`eval \"$(dgpt env)\"`), or pass the head's URL: "
                                "DonorFileSystem('http://HEAD:8080')") from None
    call = getattr(actor, ACTOR_METHOD)
    return cast(MetadataClient, rpc.RemoteMetadata(lambda m, kw: ray.get(call.remote(m, kw))))


def rest_metadata(head_url: str | None = None) -> MetadataClient:
    """The metadata service over the REST API of ``head_url`` (default: the settings' head).

    Raises:
        ConfigError: no head URL is known.
    """
    settings = load_settings()
    url = head_url or settings.local_head_url
    if not url:
        raise ConfigError("no head to reach the storage tier at", hint="set DGPT_HEAD_URL (and DGPT_API_KEY)")
    files = tls_files(settings)
    trust = HeadTrust(url, pin=settings.head_fingerprint, ca_file=files[0] if files else None)
    return cast(MetadataClient, RestMetadata(url, settings.api_key, trust=trust))


def fabric_connector(url: str) -> tuple[MetadataClient, PieceTransport]:
    """``fabric://``: the control-plane actor inside Ray, the REST API outside it."""
    meta = actor_metadata() if _in_ray() else rest_metadata()
    return meta, HttpTransport()


def http_connector(url: str) -> tuple[MetadataClient, PieceTransport]:
    """``http(s)://HEAD:PORT``: that head's REST API."""
    return rest_metadata(url), HttpTransport()

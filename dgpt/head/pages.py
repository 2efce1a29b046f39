"""The pages people look at, served by the head, and the views they plot that no other route gives.

- ``/pages/operator``: the fleet by state, active donors with reliability and load, recent
  drains and losses, endpoints with replicas per donor, jobs, the autoscaler's last
  decisions, and plots of fleet size and credit over time. Signed in with an API key.
- ``/pages/donor``: one donor's uptime, sessions, credit (and a plot of it), its
  verification record when the donor view carries one, and the pause/resume switch. Signed
  in with the donor id and secret.
- ``GET /api/v1/cluster/history``: fleet size over time (the registry's samples).
- ``GET /api/v1/credit/history``: the fleet's credit over time (the ledger, per interval).
- ``GET /api/v1/endpoints``: Serve applications with their replicas per donor.

The pages are static files shipped in the package (``dgpt/head/pages/``): HTML, CSS and
plain JavaScript that draw their plots as inline SVG and load nothing from another host (a
head may have no internet). They read everything from ``/api/v1`` with the credential the
person typed, kept in the browser's sessionStorage and sent as ``Authorization: Bearer``,
and refresh themselves every few seconds. The page routes need no credential: they hold no
data. Built as a router that ``dgpt.head.api.build_app`` mounts, like the credit routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response

from dgpt.credit.book import CreditBook
from dgpt.exceptions import ApiError, DgptError, NotFound
from dgpt.head.registry import FLEET_SAMPLE_S, Registry
from dgpt.sdk.models import (
    MAX_TIMESTAMP_S,
    CreditHistory,
    CreditPoint,
    EndpointView,
    FleetHistory,
    FleetSample,
)

#: The folder of the pages' files (package data).
PAGES_DIR = Path(__file__).with_name("pages")
#: The pages by name, and the assets they load (nothing else under the folder is served).
PAGES = {"": "index.html", "operator": "operator.html", "donor": "donor.html"}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
#: The pages load only what the head serves; no inline script or style, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: Credit history: the longest window (90 days) and the most intervals in one answer.
MAX_WINDOW_S = 90 * 86400.0
MAX_POINTS = 1000
#: Replicas counted per donor: Serve's replica states that serve requests.
SERVING = frozenset({"RUNNING"})

ServeDetails = Callable[[], dict[str, Any]]


def _asset_names() -> dict[str, str]:
    return {p.name: ASSET_TYPES[p.suffix] for p in sorted(PAGES_DIR.iterdir())
            if p.is_file() and p.suffix in ASSET_TYPES}


def endpoint_views(details: Mapping[str, Any], donor_of_node: Mapping[str, str]) -> list[EndpointView]:
    """Serve's applications (``details``: the dashboard's ``GET /api/serve/applications/``) with
    their serving replicas per donor id; a replica on the head's node counts as ``head``, one
    on a node no donor runs as the node id's first 8 characters."""
    head_node = (details.get("controller_info") or {}).get("node_id")
    out = []
    for name, app in sorted((details.get("applications") or {}).items()):
        per_donor: dict[str, int] = {}
        for deployment in (app.get("deployments") or {}).values():
            for replica in deployment.get("replicas") or []:
                if replica.get("state") not in SERVING:
                    continue
                node = str(replica.get("node_id") or "")
                where = donor_of_node.get(node) or ("head" if node and node == head_node else node[:8] or "-")
                per_donor[where] = per_donor.get(where, 0) + 1
        out.append(EndpointView(app=name, route_prefix=app.get("route_prefix"), status=str(app.get("status", "")),
                                message=str(app.get("message") or ""), replicas=dict(sorted(per_donor.items())),
                                replicas_total=sum(per_donor.values())))
    return out


def credit_points(by_bucket: Mapping[int, float], total_now: float, since: float, step_s: float,
                  n: int) -> list[CreditPoint]:
    """``n`` intervals of ``step_s`` from ``since``, with the credit of each (``by_bucket``: the
    ledger's sums per interval index) and the fleet's total at its end (``total_now`` less what
    later intervals added; rows ending after the last interval count as later)."""
    later = sum(credit for bucket, credit in by_bucket.items() if bucket >= n)
    points = []
    for i in reversed(range(n)):
        credit = by_bucket.get(i, 0.0)
        points.append(CreditPoint(start_at=since + i * step_s, end_at=since + (i + 1) * step_s,
                                  credit=round(credit, 6), total_credit=round(total_now - later, 6)))
        later += credit
    return points[::-1]


def _default_serve_details(registry: Registry) -> ServeDetails:
    def details() -> dict[str, Any]:
        from dgpt.head.dashboard import Dashboard

        return Dashboard.of(registry.settings).serve_details()

    return details


def pages_router(registry: Registry, book: CreditBook, serve_details: ServeDetails | None,
                 errors: Callable[..., dict], api_key: Callable[..., Awaitable[str | None]]) -> APIRouter:
    """The pages and their views (see the module docstring)."""
    router = APIRouter()
    assets = _asset_names()
    read_serve = serve_details or _default_serve_details(registry)
    html: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "The page."}}

    def page(name: str) -> Response:
        return HTMLResponse((PAGES_DIR / PAGES[name]).read_text(), headers=SECURITY_HEADERS)

    @router.get("/pages/", response_class=HTMLResponse, tags=["pages"], operation_id="pagesIndex",
                responses={**errors(plain=True), **html}, openapi_extra={"security": []})
    async def index() -> Response:
        """Links to the operator's and the donor's pages."""
        return page("")

    @router.get("/pages/operator", response_class=HTMLResponse, tags=["pages"], operation_id="operatorPage",
                responses={**errors(plain=True), **html}, openapi_extra={"security": []})
    async def operator() -> Response:
        """The operator's page: sign in with an API key."""
        return page("operator")

    @router.get("/pages/donor", response_class=HTMLResponse, tags=["pages"], operation_id="donorPage",
                responses={**errors(plain=True), **html}, openapi_extra={"security": []})
    async def donor() -> Response:
        """The donor's page: sign in with the donor id and secret."""
        return page("donor")

    @router.get("/pages/assets/{name}", tags=["pages"], operation_id="pageAsset",
                responses={**errors(404, params=True),
                           200: {"content": {t.split(";")[0]: {"schema": {"type": "string"}} for t in ASSET_TYPES.values()},
                                 "description": "A script or style sheet of the pages."}},
                openapi_extra={"security": []})
    async def asset(name: str = PathParam(..., min_length=1, max_length=64, pattern=r"^[a-z0-9-]+\.(js|css)$")) -> Response:
        """A script or style sheet the pages load."""
        if name not in assets:
            raise NotFound(f"no page asset {name!r}", 404, hint=f"the pages' assets are {', '.join(assets)}")
        return Response((PAGES_DIR / name).read_bytes(), media_type=assets[name], headers=SECURITY_HEADERS)

    @router.get("/api/v1/cluster/history", response_model=FleetHistory, tags=["head"], operation_id="getFleetHistory",
                responses=errors(401, params=True))
    async def fleet_history(key: str | None = Depends(api_key),
                            since: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S,
                                                        description="Only samples after this (Unix seconds).")
                            ) -> FleetHistory:
        """Fleet size over time: donors by state whenever they changed, the last sample now."""
        registry.check_api_key(key)
        return FleetHistory(step_s=FLEET_SAMPLE_S, points=[FleetSample(at=at, donors_by_state=counts)
                                                           for at, counts in registry.fleet_history(since)])

    @router.get("/api/v1/credit/history", response_model=CreditHistory, tags=["credit"],
                operation_id="getCreditHistory", responses=errors(401, params=True))
    async def credit_history(
        key: str | None = Depends(api_key),
        window_s: float = Query(86400.0, ge=60, le=MAX_WINDOW_S, description="How far back, in seconds."),
        points: int = Query(96, ge=1, le=MAX_POINTS, description="Intervals the window is cut into."),
    ) -> CreditHistory:
        """The fleet's credit over time: what each interval of the window earned, and the total at its end."""
        registry.check_api_key(key)
        now = book.clock()
        step_s = window_s / points
        since = now - window_s
        by_bucket = await asyncio.to_thread(registry.store.credit_by_bucket, since, step_s)
        total = book.total_issued()
        return CreditHistory(step_s=step_s, points=credit_points(by_bucket, total, since, step_s, points),
                             total_credit=round(total, 6))

    @router.get("/api/v1/endpoints", response_model=list[EndpointView], tags=["head"], operation_id="listEndpoints",
                responses=errors(401, 503))
    async def endpoints(key: str | None = Depends(api_key)) -> list[EndpointView]:
        """Inference endpoints (Serve applications) with their running replicas per donor."""
        registry.check_api_key(key)
        try:
            details = await asyncio.to_thread(read_serve)
        except (DgptError, OSError) as exc:
            message = exc.message if isinstance(exc, DgptError) else str(exc)
            raise ApiError(f"Serve's applications could not be read: {message}", 503,
                           hint="the head's Ray dashboard may be starting; retry in a few seconds") from None
        donor_of_node = {node: state["donor_id"] for node, state in registry.node_states().items()}
        return endpoint_views(details, donor_of_node)

    return router

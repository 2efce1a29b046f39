"""The credit routes of the REST API: a donor's credit (operators, and the donor itself), the
fleet's credit, voids of failed results, and the ledger's chain check.

Built as a router over the registry and the credit book; ``dgpt.head.api.build_app`` mounts
it and hands in its security dependencies and error documentation, so every operation keeps
the API's contract (one security scheme, every error answer documented).
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query

from dgpt.credit.book import CreditBook
from dgpt.credit.chain import Tip
from dgpt.credit.unit import weights_for
from dgpt.exceptions import InvalidRequest
from dgpt.head.registry import Registry
from dgpt.sdk.models import (
    CreditSummary,
    CreditVoidRequest,
    CreditVoidResponse,
    DonorCredit,
    LedgerCheck,
)

#: Ledger rows a credit answer includes at most.
MAX_ENTRIES = 1000


def credit_router(registry: Registry, book: CreditBook, donor_id_type: Any, errors: Callable[..., dict],
                  api_key: Callable[..., Awaitable[str | None]], donor_secret: Callable[..., Awaitable[str | None]]) -> APIRouter:
    """The credit operations (see the module docstring)."""
    router = APIRouter(tags=["credit"])
    entries_query = Query(50, ge=0, le=MAX_ENTRIES, description="How many of the latest ledger rows to include.")

    def donor_credit(donor_id: str, entries: int) -> DonorCredit:
        profile = registry.donor_view(donor_id, max_sessions=0).profile  # NotFound for an unknown donor
        return book.donor(donor_id, weights_for(profile), entries=entries, known=True)

    @router.get("/api/v1/credit", response_model=list[CreditSummary], operation_id="listCredit",
                responses=errors(401))
    async def list_credit(key: str | None = Depends(api_key)) -> list[CreditSummary]:
        """Every donor's credit and recent average credit (donors with no metered work are absent)."""
        registry.check_api_key(key)
        return book.summaries()

    @router.get("/api/v1/credit/verify", response_model=LedgerCheck, operation_id="verifyCredit",
                responses=errors(401, params=True))
    async def verify_credit(
        key: str | None = Depends(api_key),
        anchor_seq: int | None = Query(None, ge=1, description="A tip kept earlier: its row number."),
        anchor_hash: str | None = Query(None, min_length=64, max_length=64, pattern="^[0-9a-f]{64}$",
                                        description="A tip kept earlier: its hash."),
    ) -> LedgerCheck:
        """Check the ledger's hash chain as the head's SQLite file holds it; names the first edited or removed row."""
        registry.check_api_key(key)
        if (anchor_seq is None) != (anchor_hash is None):
            raise InvalidRequest("anchor_seq and anchor_hash go together: pass both or neither", 422,
                                 hint="pass the tip (seq and hash) of an earlier credit answer")
        anchor = Tip(anchor_seq, anchor_hash) if anchor_seq is not None and anchor_hash is not None else None
        return await asyncio.to_thread(book.verify, anchor)

    @router.get("/api/v1/donors/{donor_id}/credit", response_model=DonorCredit, operation_id="getDonorCredit",
                responses=errors(401, 404, params=True))
    async def get_donor_credit(donor_id: donor_id_type, key: str | None = Depends(api_key),
                               entries: int = entries_query) -> DonorCredit:
        """A donor's credit: totals, recent average credit, per session, the latest ledger rows."""
        registry.check_api_key(key)
        return donor_credit(donor_id, entries)

    @router.get("/api/v1/donors/{donor_id}/credit/own", response_model=DonorCredit, operation_id="getOwnCredit",
                responses=errors(401, params=True))
    async def get_own_credit(donor_id: donor_id_type, secret: str | None = Depends(donor_secret),
                             entries: int = entries_query) -> DonorCredit:
        """The donor's own credit, with its donor secret (what `dgpt donor credit` shows)."""
        registry.check_donor_secret(donor_id, secret)
        return donor_credit(donor_id, entries)

    @router.post("/api/v1/donors/{donor_id}/credit/void", response_model=CreditVoidResponse,
                 operation_id="voidDonorCredit", responses=errors(401, 404, body=True))
    async def void_donor_credit(donor_id: donor_id_type, req: CreditVoidRequest,
                                key: str | None = Depends(api_key)) -> CreditVoidResponse:
        """Take back the credit of the donor's work in a span: its results failed verification."""
        registry.check_api_key(key)
        registry.donor_view(donor_id, max_sessions=0)  # NotFound for an unknown donor
        return book.void(donor_id, req.start_at, req.end_at, req.reason)

    return router

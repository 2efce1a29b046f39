"""Capabilities: short-lived, MACed grants that a piece server demands before doing anything.

The head (metadata service) issues a capability for one donor, a set of operations, the
pieces they may touch, and an expiry; it is MACed (HMAC-SHA256) with that donor's own key
``K_d`` (:func:`dgpt.storage.crypto.donor_storage_key`). A piece server trusts nothing else:

- no token, a malformed one, a bad MAC (forged, altered, or made for another donor, whose
  key differs), or an expired one: **401**;
- a genuine token that does not allow this operation or this piece: **403**.

Wire form: ``dgptcap1.<base64url(json claims)>.<base64url(mac)>``, sent as
``Authorization: Bearer <token>``. A capability lives at most :data:`MAX_TTL_S`; servers
accept :data:`CLOCK_SKEW_S` of clock difference with the head.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from dgpt.exceptions import AuthError
from dgpt.storage.merkle import is_piece_id

PREFIX = "dgptcap1"
#: Long enough for a slow donor to move a 64 MiB segment's piece over a home uplink; short
#: enough that a leaked token is soon worthless.
DEFAULT_TTL_S = 900.0
#: Servers refuse tokens issued for longer than this, whatever the head says.
MAX_TTL_S = 86_400.0
CLOCK_SKEW_S = 60.0
#: Pieces one capability may name; keeps the Authorization header under 16 KiB.
MAX_PIECES = 128


class Op(str, Enum):
    """What a capability allows on a piece server."""

    PUT = "put"
    GET = "get"
    DELETE = "delete"
    AUDIT = "audit"
    LIST = "list"
    STATS = "stats"


#: Operations that act on named pieces (the others act on the store as a whole).
PIECE_OPS = frozenset({Op.PUT, Op.GET, Op.DELETE, Op.AUDIT})


@dataclass(frozen=True, slots=True)
class Capability:
    """The claims of one capability."""

    donor_id: str
    ops: frozenset[Op]
    pieces: frozenset[str]
    issued_at: float
    expires_at: float

    def allows(self, op: Op, piece_id: str | None) -> bool:
        if op not in self.ops:
            return False
        return op not in PIECE_OPS or (piece_id is not None and piece_id in self.pieces)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(donor_key: bytes, donor_id: str, ops: Iterable[Op], pieces: Iterable[str], now: float,
          ttl_s: float = DEFAULT_TTL_S) -> str:
    """A capability token for ``donor_id``, MACed with its key ``K_d``.

    Raises:
        ValueError: unknown piece id format, too many pieces, piece ops without pieces, or a
            ttl outside (0, MAX_TTL_S].
    """
    ops_set = frozenset(Op(o) for o in ops)
    piece_list = sorted(set(pieces))
    if not ops_set:
        raise ValueError("a capability needs at least one operation")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:g}], got {ttl_s}")
    if len(piece_list) > MAX_PIECES:
        raise ValueError(f"a capability names at most {MAX_PIECES} pieces, got {len(piece_list)}")
    if ops_set & PIECE_OPS and not piece_list:
        raise ValueError(f"operations {sorted(o.value for o in ops_set & PIECE_OPS)} need piece ids")
    bad = [p for p in piece_list if not is_piece_id(p)]
    if bad:
        raise ValueError(f"not piece ids: {bad[:3]}")
    claims = {
        "d": donor_id,
        "o": sorted(o.value for o in ops_set),
        "p": piece_list,
        "i": round(now, 3),
        "e": round(now + ttl_s, 3),
    }
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(donor_key, f"{PREFIX}.{body}".encode(), hashlib.sha256).digest()
    return f"{PREFIX}.{body}.{_b64(mac)}"


def _deny(message: str, status: int) -> AuthError:
    return AuthError(message, status, hint="ask the head for a fresh capability (the storage client does this itself)")


def verify(token: str | None, donor_key: bytes, donor_id: str, op: Op, piece_id: str | None, now: float) -> Capability:
    """Check a capability presented to ``donor_id``'s piece server for ``op`` on ``piece_id``.

    Raises:
        AuthError: 401 when the token is missing, malformed, forged, for another donor, or
            expired; 403 when it is genuine but does not allow ``op`` on ``piece_id``.
    """
    if not token:
        raise _deny("a storage capability is required (Authorization: Bearer dgptcap1...)", 401)
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise _deny("malformed storage capability", 401)
    try:
        mac = _unb64(parts[2])
    except ValueError:
        raise _deny("malformed storage capability", 401) from None
    expected = hmac.new(donor_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise _deny(f"capability is not valid for donor {donor_id!r} (bad MAC)", 401)
    try:
        claims = json.loads(_unb64(parts[1]))
        cap = Capability(
            donor_id=str(claims["d"]),
            ops=frozenset(Op(o) for o in claims["o"]),
            pieces=frozenset(str(p) for p in claims["p"]),
            issued_at=float(claims["i"]),
            expires_at=float(claims["e"]),
        )
    except (ValueError, KeyError, TypeError):
        raise _deny("malformed storage capability claims", 401) from None
    if cap.donor_id != donor_id:
        raise _deny(f"capability is for donor {cap.donor_id!r}, this is {donor_id!r}", 401)
    if cap.expires_at - cap.issued_at > MAX_TTL_S:
        raise _deny(f"capability lives longer than {MAX_TTL_S:g}s", 401)
    if now > cap.expires_at + CLOCK_SKEW_S:
        raise _deny(f"capability expired {now - cap.expires_at:.0f}s ago", 401)
    if now < cap.issued_at - CLOCK_SKEW_S:
        raise _deny("capability issued in the future (clock skew with the head?)", 401)
    if not cap.allows(op, piece_id):
        what = f"{op.value} on piece {piece_id}" if piece_id else op.value
        raise _deny(f"capability does not allow {what}", 403)
    return cap

"""Placement of a segment's pieces on donors: a pure function over a frozen candidate list.

Rules, in order:

1. **At most one piece per donor and per owner in each segment.** An owner is a failure
   domain (one person's machines leave together), so a segment survives any ``n - k`` owners
   leaving. Donors and owners that already hold a piece of the segment are passed in as
   ``taken_donors`` / ``taken_owners`` (repair and migration add pieces to a segment).
2. **Room**: a donor takes a piece only if its free bytes hold it.
3. **Preference**: weighted rendezvous hashing. Each candidate draws
   ``u = H(seed, donor_id)`` in (0, 1) and gets the key ``-ln(u) / w`` with
   ``w = reliability ** 2 * free_bytes``; the smallest keys win. That is a weighted sample
   without replacement: a donor twice as likely to stay gets about four times the pieces,
   one with twice the free space about twice, so reliable donors carry more and disks fill
   evenly. The draw depends only on the seed (file id and segment) and the donor, so a
   placement is reproducible, and a donor joining or leaving moves few other choices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from dgpt.exceptions import NotEnoughDonors

#: How strongly reliability outweighs free space (see the module docstring).
RELIABILITY_EXPONENT = 2.0
#: Reliability below this counts as this: a brand-new donor still gets an occasional piece.
MIN_RELIABILITY = 0.01
#: Audits a donor is trusted for before any has run (the prior of :func:`audit_trust`).
AUDIT_PRIOR = 9.0


def audit_trust(passed: int, failed: int) -> float:
    """How far a donor's audits let the tier trust it with pieces, in (0, 1].

    The mean of a Beta(passed + 9, failed + 1) pass rate: 0.9 with no audits yet, about
    0.82 after one failure, 0.5 after eight failures with none passed; many passes
    outweigh an occasional failure (a disk error), steady failures do not. The tier's
    placement reliability is the donor's own (:mod:`dgpt.reliability`) times this.
    """
    if passed < 0 or failed < 0:
        raise ValueError(f"audit counts must be >= 0, got passed={passed} failed={failed}")
    return (passed + AUDIT_PRIOR) / (passed + failed + AUDIT_PRIOR + 1.0)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A donor that may take pieces: who it is, its failure domain, room, reliability, address."""

    donor_id: str
    owner: str
    free_bytes: int
    reliability: float
    url: str


def _uniform(seed: str, donor_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{donor_id}".encode(), digest_size=8).digest()
    # 53 random bits in (0, 1): never exactly 0, so the log is finite.
    return (int.from_bytes(digest, "big") >> 11 | 1) / float(1 << 53)


def rank(candidates: Sequence[Candidate], seed: str, piece_bytes: int) -> list[Candidate]:
    """Candidates with room for ``piece_bytes``, most preferred first."""
    keyed = []
    for c in candidates:
        if c.free_bytes < piece_bytes or c.free_bytes <= 0:
            continue
        weight = max(c.reliability, MIN_RELIABILITY) ** RELIABILITY_EXPONENT * c.free_bytes
        keyed.append((-math.log(_uniform(seed, c.donor_id)) / weight, c.donor_id, c))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [c for _, _, c in keyed]


def place_pieces(
    candidates: Sequence[Candidate],
    count: int,
    piece_bytes: int,
    seed: str,
    taken_donors: Collection[str] = (),
    taken_owners: Collection[str] = (),
    minimum: int | None = None,
) -> list[Candidate]:
    """Choose donors for ``count`` pieces of one segment.

    Args:
        candidates: donors that may take pieces now (online, not leaving).
        count: pieces to place.
        piece_bytes: stored size of each piece.
        seed: what the draw depends on, e.g. ``f"{file_id}/{segment}"``.
        taken_donors, taken_owners: already hold a piece of this segment.
        minimum: fewest acceptable (default ``count``); fewer raises.
    Returns:
        Up to ``count`` candidates, distinct donors and owners, most preferred first.
    Raises:
        NotEnoughDonors: fewer than ``minimum`` candidates satisfy the rules.
    """
    need = count if minimum is None else minimum
    used_donors = set(taken_donors)
    used_owners = set(taken_owners)
    chosen: list[Candidate] = []
    for c in rank(candidates, seed, piece_bytes):
        if len(chosen) == count:
            break
        if c.donor_id in used_donors or c.owner in used_owners:
            continue
        chosen.append(c)
        used_donors.add(c.donor_id)
        used_owners.add(c.owner)
    if len(chosen) < need:
        owners = {c.owner for c in candidates if c.free_bytes >= piece_bytes} - set(taken_owners)
        raise NotEnoughDonors(
            f"cannot place {need} piece(s) of {piece_bytes} bytes: only {len(chosen)} donors of distinct owners "
            f"have room ({len(owners)} owners with room, {len(set(taken_owners))} already hold this segment)",
            hint="offer disk on more donors of other owners (`dgpt donor join --disk-gb N`)",
        )
    return chosen


def eligible_owners(candidates: Sequence[Candidate], piece_bytes: int = 1) -> int:
    """How many distinct owners have a donor with room: what picks the profile."""
    return len({c.owner for c in candidates if c.free_bytes >= piece_bytes and c.free_bytes > 0})

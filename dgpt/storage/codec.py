"""Erasure coding (pyeclib's ``isa_l_rs_cauchy``) and the storage profiles chosen by fleet size.

A profile ``k``-of-``n`` cuts each stripe into ``k`` data fragments and ``n - k`` parity
fragments; any ``k`` of the ``n`` rebuild the stripe (the code is MDS). The code is
systematic: fragments ``0..k-1`` hold the stripe itself, so a read that gets all of them
joins their payloads and skips decoding.

Why Cauchy and not Vandermonde: ISA-L's Vandermonde matrix (``isa_l_rs_vand``) is not MDS
once ``n - k >= 5``: e.g. 5-of-11 cannot be rebuilt from fragments (1, 2, 5, 7, 10). The
Cauchy matrix has every square submatrix invertible, so every choice of ``k`` fragments works;
``tests/unit/test_storage_codec.py`` checks this over random erasure patterns for every
default profile and shows the Vandermonde counterexample.

Profiles (:data:`DEFAULT_PROFILES`) are picked by the number of *eligible* donors: distinct
donors of distinct owners with room, since a segment never puts two pieces on one donor or
one owner. All but the tiniest keep 3x overhead and spend it on width: with donors that
live about a month and are online 70% of the time, 3x replication keeps ~1.5 nines a year
while 16-of-48 at the same 3x keeps about eight (``benchmarks/durability.py``).
"""

from __future__ import annotations

import functools
import struct
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dgpt.exceptions import NotEnoughDonors, StorageError

#: The only backend dgpt uses: MDS for every profile (see the module docstring).
EC_TYPE = "isa_l_rs_cauchy"
#: liberasurecode puts this header before every fragment's payload.
FRAGMENT_HEADER_BYTES = 80
# Header fields dgpt reads (liberasurecode's fragment_header_t, little endian):
# index u32, payload size u32, backend metadata size u32, original stripe size u64.
_HEADER = struct.Struct("<IIIQ")
#: liberasurecode's ceiling on k + m for ISA-L (EC_MAX_FRAGMENTS is 255 minus reserved).
MAX_FRAGMENTS = 200


@dataclass(frozen=True, slots=True)
class Profile:
    """An erasure-coding profile: ``k`` of ``n`` pieces rebuild a segment; repair at ``repair_at``.

    ``repair_at`` is the number of durable pieces at (or below) which the repairer rebuilds the
    missing ones: ``k <= repair_at < n``. The gap ``repair_at - k`` is the loss margin kept in
    reserve while repair runs.
    """

    k: int
    n: int
    repair_at: int

    def __post_init__(self) -> None:
        if not 1 <= self.k < self.n:
            raise ValueError(f"profile needs 1 <= k < n, got k={self.k}, n={self.n}")
        if self.n > MAX_FRAGMENTS:
            raise ValueError(f"profile n={self.n} exceeds the codec's {MAX_FRAGMENTS} fragments")
        if not self.k <= self.repair_at < self.n:
            raise ValueError(f"profile needs k <= repair_at < n, got k={self.k}, repair_at={self.repair_at}, n={self.n}")

    @property
    def m(self) -> int:
        """Parity pieces: how many pieces may be lost at once."""
        return self.n - self.k

    @property
    def overhead(self) -> float:
        """Stored bytes per user byte (n / k)."""
        return self.n / self.k

    @property
    def name(self) -> str:
        return f"rs-{self.k}-of-{self.n}"

    @property
    def warning(self) -> str | None:
        """A durability warning for small profiles, or ``None``."""
        if self.m >= 4:
            return None
        return (
            f"profile {self.name} survives only {self.m} lost donor(s) per segment: fine for a local "
            "test fabric, not durable against real churn. Add donors of distinct owners "
            "(>= 8 gives rs-2-of-6, >= 60 gives rs-16-of-48)"
        )


#: (minimum eligible donors, profile), widest first. Each tier needs some donors beyond n
#: (about a quarter) so a lost piece can be rebuilt on a donor and owner that hold none of
#: its segment yet. ``repair_at`` is about 2k: a read needs k pieces *online*, and with donors
#: online 70% of the time, 2k durable pieces keep P(k online) near 99.9% (fewer make reads
#: fail while the segment waits for repair); it also leaves k pieces of loss margin for the
#: repair window. ``python -m benchmarks.durability`` gives each tier's nines, availability
#: and repair traffic, from the calculator and from a simulation.
DEFAULT_PROFILES: tuple[tuple[int, Profile], ...] = (
    (60, Profile(16, 48, 32)),
    (30, Profile(8, 24, 16)),
    (15, Profile(4, 12, 8)),
    (8, Profile(2, 6, 4)),
    (4, Profile(2, 4, 3)),
    (3, Profile(2, 3, 2)),
)


def choose_profile(eligible_donors: int, tiers: Sequence[tuple[int, Profile]] = DEFAULT_PROFILES) -> Profile:
    """The widest profile the fleet supports; warns (``UserWarning``) for small ones.

    Args:
        eligible_donors: donors that may take a piece, counted once per owner.
        tiers: (minimum eligible donors, profile) pairs, widest first.
    Raises:
        NotEnoughDonors: fewer eligible donors than the smallest tier needs.
    """
    for minimum, profile in tiers:
        if eligible_donors >= minimum:
            if profile.warning:
                warnings.warn(profile.warning, UserWarning, stacklevel=2)
            return profile
    need = min(minimum for minimum, _ in tiers)
    raise NotEnoughDonors(
        f"the storage tier needs at least {need} donors of distinct owners with free disk; "
        f"{eligible_donors} are eligible",
        hint="offer disk on more donors (`dgpt donor join --disk-gb 10`, or `dgpt up --donors 3`)",
    )


class Codec:
    """One ``k``-of-``n`` Reed-Solomon (Cauchy) coder over pyeclib; safe to share across threads."""

    def __init__(self, k: int, n: int) -> None:
        from pyeclib.ec_iface import ECDriver

        if not 1 <= k < n <= MAX_FRAGMENTS:
            raise ValueError(f"codec needs 1 <= k < n <= {MAX_FRAGMENTS}, got k={k}, n={n}")
        self.k = k
        self.n = n
        self._driver = ECDriver(k=k, m=n - k, ec_type=EC_TYPE)
        # liberasurecode keeps per-instance scratch state; one call at a time per driver.
        self._lock = threading.Lock()

    def fragment_bytes(self, stripe_bytes: int) -> int:
        """Size of each of the n fragments (header included) of a stripe of ``stripe_bytes``."""
        return _fragment_bytes(self.k, self.n, stripe_bytes)

    def encode(self, stripe: bytes | memoryview) -> list[bytes]:
        """The n fragments of one stripe, in index order."""
        if len(stripe) == 0:
            raise ValueError("cannot encode an empty stripe")
        with self._lock:
            return list(self._driver.encode(bytes(stripe) if isinstance(stripe, memoryview) else stripe))

    def decode(self, fragments: Mapping[int, bytes | memoryview]) -> bytes:
        """Rebuild a stripe from at least k fragments (index -> fragment).

        When fragments ``0..k-1`` are all present their payloads are joined directly.

        Raises:
            StorageError: fewer than k fragments, or the codec refuses them.
        """
        if len(fragments) < self.k:
            raise StorageError(f"need {self.k} fragments to decode, got {len(fragments)}")
        if all(i in fragments for i in range(self.k)):
            return join_data_fragments([fragments[i] for i in range(self.k)])
        chosen = [bytes(fragments[i]) for i in sorted(fragments)[: self.k]]
        try:
            with self._lock:
                return bytes(self._driver.decode(chosen))
        except Exception as exc:  # pyeclib raises its own ECDriverError family
            raise StorageError(f"erasure decode failed: {exc}") from exc

    def reconstruct(self, fragments: Mapping[int, bytes | memoryview], missing: Sequence[int]) -> dict[int, bytes]:
        """Rebuild the fragments at ``missing`` indexes from at least k others."""
        if len(fragments) < self.k:
            raise StorageError(f"need {self.k} fragments to rebuild, got {len(fragments)}")
        if not missing:
            return {}
        chosen = [bytes(fragments[i]) for i in sorted(fragments)[: self.k]]
        try:
            with self._lock:
                rebuilt = self._driver.reconstruct(chosen, list(missing))
        except Exception as exc:
            raise StorageError(f"erasure reconstruct failed: {exc}") from exc
        return {int(_HEADER.unpack_from(f)[0]): bytes(f) for f in rebuilt}


def join_data_fragments(data_fragments: Sequence[bytes | memoryview]) -> bytes:
    """The stripe held by fragments ``0..k-1`` (the systematic part), without decoding."""
    first = _HEADER.unpack_from(data_fragments[0])
    original = first[3]
    parts = []
    for i, frag in enumerate(data_fragments):
        index, size, _, _ = _HEADER.unpack_from(frag)
        if index != i:
            raise StorageError(f"fragment in data position {i} carries index {index}")
        parts.append(memoryview(frag)[FRAGMENT_HEADER_BYTES : FRAGMENT_HEADER_BYTES + size])
    out = b"".join(parts)
    return out[:original] if len(out) != original else out


def fragment_index(fragment: bytes | memoryview) -> int:
    """The index liberasurecode wrote into a fragment's header."""
    return int(_HEADER.unpack_from(fragment)[0])


@functools.lru_cache(maxsize=64)
def codec_for(k: int, n: int) -> Codec:
    """The process-wide codec of a ``k``-of-``n`` profile."""
    return Codec(k, n)


@functools.lru_cache(maxsize=4096)
def _fragment_bytes(k: int, n: int, stripe_bytes: int) -> int:
    if stripe_bytes <= 0:
        raise ValueError(f"stripe_bytes must be positive, got {stripe_bytes}")
    info = codec_for(k, n)._driver.get_segment_info(stripe_bytes, stripe_bytes)
    return int(info["fragment_size"])

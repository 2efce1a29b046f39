"""Pure policy of result verification: comparing results, quorums, adaptive replication, trust.

No Ray, no storage: the runner (``dgpt.verify.runner``), Serve's shadow comparison
(``dgpt.serve.shadow``) and the trust store (``dgpt.verify.trust``) call these functions
with plain data, and the unit tests drive the very same functions.

The policy, in BOINC's terms:

1. **Comparing.** Two results agree when their canonical digests (:func:`digest`) are equal:
   a SHA-256 over a tagged, length-prefixed encoding of bytes, strings, numbers, ``None``,
   lists, tuples, dicts, sets, numpy arrays and torch tensors, so equal values digest alike
   in every process and on every machine. With a :class:`Tolerance`, floats and float
   arrays agree when they are close (``|a - b| <= atol + rtol * |b|``) instead: results of
   different hardware (another BLAS, a GPU) differ in their last bits.
2. **Quorum.** ``k`` donors of different owners run the task; the largest group of agreeing
   results is accepted when it has at least ``quorum`` members (default: a strict majority,
   ``k // 2 + 1``). Anything else, and any dissent, goes to a trusted node, whose result
   decides who was wrong (:func:`judge_by_reference`).
3. **Adaptive replication.** A donor is checked on every task until it has
   ``trusted_after`` valid results in a row; from then on with probability
   ``max(floor, trusted_after / consecutive_valid)`` (:func:`check_probability`): one in two
   at twice the threshold, one in ten at ten times, never less than ``floor``. Any invalid
   result, error or inconclusive comparison resets the run, so a donor with a recent failure
   is always checked, and so is one whose trust is below ``TrustParams.low``.
4. **Trust.** Each donor has a score in 0..1 (:func:`advance`): it starts at ``initial``, a
   valid result closes ``gain`` of the distance to 1 (slowly), an invalid one multiplies it
   by ``keep_on_invalid`` (sharply), an inconclusive comparison by ``keep_on_inconclusive``;
   errors leave it as it is. Below ``low`` the router sends the donor no traffic while
   others can take it, and verified tasks pick it only when no trusted owner is left.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "DEFAULT_REPLICATION",
    "DEFAULT_TRUST",
    "Candidate",
    "Outcome",
    "ReplicationParams",
    "Tolerance",
    "TrustParams",
    "TrustState",
    "Votes",
    "advance",
    "check_probability",
    "choose_replicas",
    "count_votes",
    "default_quorum",
    "digest",
    "judge_among",
    "judge_by_majority",
    "judge_by_reference",
    "same",
    "should_check",
]

#: Deeper nesting than this is refused: a result that deep is almost surely a cycle.
MAX_DEPTH = 100


class Outcome(str, enum.Enum):
    """What one donor's result turned out to be."""

    VALID = "valid"  # it agreed with the accepted result
    INVALID = "invalid"  # it differed from the accepted result
    ERROR = "error"  # it gave no result (raised, crashed, timed out) while the task itself works
    INCONCLUSIVE = "inconclusive"  # it disagreed with another donor and nothing settled who was right


# ---------------------------------------------------------------- comparing


def _number(h: Any, tag: bytes, text: str) -> None:
    data = text.encode()
    h.update(tag + struct.pack(">I", len(data)) + data)


def _float_text(x: float) -> str:
    if math.isnan(x):
        return "nan"  # one NaN, whatever its payload bits
    return (x + 0.0).hex()  # -0.0 + 0.0 is 0.0: the two zeros are one value


def _feed_array(h: Any, tag: bytes, dtype: str, shape: tuple[int, ...], data: bytes) -> None:
    head = f"{dtype}|{','.join(str(n) for n in shape)}".encode()
    h.update(tag + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(data)))
    h.update(data)


def _canonical_numpy(np: Any, arr: Any) -> Any:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.kind in "fc":
        arr = arr + arr.dtype.type(0)  # -0.0 -> 0.0
        if arr.dtype.kind == "f":
            arr = np.where(np.isnan(arr), arr.dtype.type("nan"), arr)
    return arr


def _feed(h: Any, value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"result nests deeper than {MAX_DEPTH} levels (a cycle?); "
                         "return a flatter structure, or pass canonical= to turn it into one")
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        _number(h, b"I", str(int(value)))
    elif isinstance(value, float):
        _number(h, b"F", _float_text(float(value)))
    elif isinstance(value, complex):
        _number(h, b"C", f"{_float_text(value.real)},{_float_text(value.imag)}")
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack(">Q", len(data)) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"Y" + struct.pack(">Q", len(data)) + data)
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"T") + struct.pack(">Q", len(value)))
        for item in value:
            _feed(h, item, depth + 1)
    elif isinstance(value, dict):
        # Keys in the order of their own digests: insertion order is not part of the value.
        items = sorted(((digest(k), k, v) for k, v in value.items()), key=lambda t: t[0])
        h.update(b"D" + struct.pack(">Q", len(items)))
        for _, k, v in items:
            _feed(h, k, depth + 1)
            _feed(h, v, depth + 1)
    elif isinstance(value, (set, frozenset)):
        members = sorted(digest(v) for v in value)
        h.update(b"E" + struct.pack(">Q", len(members)))
        for m in members:
            h.update(bytes.fromhex(m))
    elif not _feed_tensor(h, value, depth):
        raise TypeError(
            f"cannot compare results of type {type(value).__module__}.{type(value).__qualname__}; "
            "return bytes, str, numbers, None, lists, tuples, dicts, sets, numpy arrays or torch tensors, "
            "or pass canonical= to turn the result into one of those"
        )


def _feed_tensor(h: Any, value: object, depth: int) -> bool:
    """numpy arrays and scalars, torch tensors; False for anything else.

    Neither library is imported here: a value of theirs can only exist once it is loaded.
    """
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.kind == "O":  # objects: compare the Python values inside
            h.update(b"O" + struct.pack(">Q", arr.ndim) + b"".join(struct.pack(">Q", n) for n in arr.shape))
            for item in arr.reshape(-1).tolist():
                _feed(h, item, depth + 1)
            return True
        arr = _canonical_numpy(np, arr)
        _feed_array(h, b"A", arr.dtype.str, tuple(arr.shape), arr.tobytes())
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        dtype = str(t.dtype)
        if t.dtype == torch.bfloat16:
            t = t.float()  # widening is exact; numpy has no bfloat16
        arr = _canonical_numpy(np, t.numpy()) if np is not None else t.numpy()
        _feed_array(h, b"P", dtype, tuple(t.shape), arr.tobytes())
        return True
    return False


def digest(value: object) -> str:
    """The canonical SHA-256 (hex) of a result: equal values digest alike in every process.

    ``1`` and ``1.0``, a list and a tuple, ``float32`` and ``float64`` arrays are different
    values; a dict's key order, a set's iteration order, a NaN's payload and the sign of a
    zero are not part of the value.

    Raises:
        TypeError: the result holds a type with no canonical form (see the message).
        ValueError: the result nests deeper than ``MAX_DEPTH``.
    """
    h = hashlib.sha256()
    _feed(h, value, 0)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How close two float results must be to agree: ``|a - b| <= atol + rtol * |b|``.

    Only floats, complex numbers and float arrays (numpy, torch) are compared this way;
    everything else must be equal.
    """

    rtol: float = 1e-5
    atol: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Tolerance.{name} must be a finite number >= 0, got {value!r}")


def _as_float_array(value: object) -> Any | None:
    """A numpy float/complex array of ``value`` (numpy or torch), else None."""
    np = sys.modules.get("numpy")
    if np is None:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if not (value.dtype.is_floating_point or value.dtype.is_complex):
            return None
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "fc":
        return np.asarray(value)
    return None


def _close(a: object, b: object, tol: Tolerance, depth: int) -> bool:
    if depth > MAX_DEPTH:
        raise ValueError(f"result nests deeper than {MAX_DEPTH} levels (a cycle?)")
    if type(a) is not type(b):
        return digest(a) == digest(b)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol.atol + tol.rtol * abs(b)
    if isinstance(a, complex) and isinstance(b, complex):
        return abs(a - b) <= tol.atol + tol.rtol * abs(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol, depth + 1) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        ka = {digest(k): k for k in a}
        kb = {digest(k): k for k in b}
        return ka.keys() == kb.keys() and all(_close(a[ka[d]], b[kb[d]], tol, depth + 1) for d in ka)
    fa, fb = _as_float_array(a), _as_float_array(b)
    if fa is not None and fb is not None:
        np = sys.modules["numpy"]
        return bool(fa.dtype == fb.dtype and fa.shape == fb.shape and
                    np.allclose(fa, fb, rtol=tol.rtol, atol=tol.atol, equal_nan=True))
    return digest(a) == digest(b)


def same(a: object, b: object, tolerance: Tolerance | None = None) -> bool:
    """True when results ``a`` and ``b`` agree: equal digests, or close floats under ``tolerance``.

    Raises:
        TypeError, ValueError: as :func:`digest`.
    """
    if tolerance is None:
        return digest(a) == digest(b)
    return _close(a, b, tolerance, 0)


# ---------------------------------------------------------------- quorum


def default_quorum(k: int) -> int:
    """A strict majority of ``k``: two results of two, two of three, three of four or five."""
    return k // 2 + 1


@dataclass(frozen=True, slots=True)
class Votes:
    """Results grouped by agreement: ``groups`` holds indices, largest group first.

    ``majority`` is the group of at least ``quorum`` members, if there is one (a strict
    majority can only be one group).
    """

    groups: tuple[tuple[int, ...], ...]
    majority: tuple[int, ...] | None

    @property
    def unanimous(self) -> bool:
        """Every result agrees, and they make a quorum."""
        return self.majority is not None and len(self.groups) == 1


def count_votes(values: Sequence[object], quorum: int, tolerance: Tolerance | None = None) -> Votes:
    """Group ``values`` by agreement and find the group that makes ``quorum``.

    Without a tolerance the groups are digest classes. With one, a result joins the first
    group whose first member it is close to (closeness is not transitive; the first member
    stands for its group).

    Raises:
        ValueError: ``quorum`` is not at least 1.
        TypeError: as :func:`digest`.
    """
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum!r}")
    groups: list[list[int]] = []
    if tolerance is None:
        by_digest: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            by_digest.setdefault(digest(v), []).append(i)
        groups = list(by_digest.values())
    else:
        for i, v in enumerate(values):
            for g in groups:
                if same(values[g[0]], v, tolerance):
                    g.append(i)
                    break
            else:
                groups.append([i])
    ordered = tuple(tuple(g) for g in sorted(groups, key=lambda g: (-len(g), g[0])))
    top = ordered[0] if ordered and len(ordered[0]) >= quorum else None
    if top is not None and len(ordered) > 1 and len(ordered[1]) >= quorum:
        top = None  # a quorum below a strict majority can tie: no group wins then
    return Votes(groups=ordered, majority=top)


def judge_by_majority(n: int, votes: Votes) -> list[Outcome]:
    """Outcome of each of ``n`` results when the majority is accepted: its members are valid,
    every other result invalid.

    Raises:
        ValueError: ``votes`` has no majority.
    """
    if votes.majority is None:
        raise ValueError("no group made the quorum: there is no majority to judge by")
    members = set(votes.majority)
    return [Outcome.VALID if i in members else Outcome.INVALID for i in range(n)]


def judge_among(values: Sequence[object], tolerance: Tolerance | None = None) -> list[Outcome]:
    """Outcome of each result when no trusted node can settle it (Serve's shadow copies).

    A strict majority of at least two wins, its members valid and the others invalid; all
    agreeing is all valid; anything else (two that differ, three that all differ) is
    inconclusive for everyone: nothing tells who was wrong.
    """
    if len(values) < 2:
        raise ValueError(f"judging needs at least two results, got {len(values)}")
    votes = count_votes(values, max(2, default_quorum(len(values))), tolerance)
    if votes.majority is None:
        return [Outcome.INCONCLUSIVE] * len(values)
    return judge_by_majority(len(values), votes)


def judge_by_reference(values: Sequence[object], reference: object,
                       tolerance: Tolerance | None = None) -> list[Outcome]:
    """Outcome of each result against the trusted node's ``reference``: valid if it agrees."""
    return [Outcome.VALID if same(v, reference, tolerance) else Outcome.INVALID for v in values]


# ---------------------------------------------------------------- trust


@dataclass(frozen=True, slots=True)
class TrustParams:
    """How a donor's trust score moves; the defaults are what the fabric uses.

    Attributes:
        initial: a donor nothing is known about: a coin flip, as the router's default
            reliability.
        gain: share of the distance to 1 one valid result closes. 0.05: about 14 valid
            results in a row halve the distance, a new donor reaches 0.8 after 18.
        keep_on_invalid: factor one invalid result leaves. 0.2: a new donor drops to 0.1,
            one at 0.95 to 0.19; both below ``low`` at once.
        keep_on_inconclusive: factor a disagreement that nothing settled leaves (either side
            may have been wrong): 0.9, a nudge, not a verdict.
        low: below this the router avoids the donor and verified tasks pick it last. 0.25:
            one invalid result puts any donor below it, and climbing back takes two to four
            valid results in a row, every one of them checked.
    """

    initial: float = 0.5
    gain: float = 0.05
    keep_on_invalid: float = 0.2
    keep_on_inconclusive: float = 0.9
    low: float = 0.25

    def __post_init__(self) -> None:
        for name in ("initial", "keep_on_invalid", "keep_on_inconclusive", "low"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TrustParams.{name} must be within 0..1, got {value!r}")
        if not 0.0 < self.gain <= 1.0:
            raise ValueError(f"TrustParams.gain must be within (0, 1], got {self.gain!r}")


DEFAULT_TRUST = TrustParams()


@dataclass(frozen=True, slots=True)
class TrustState:
    """A donor's verification record as counts and its trust score."""

    valid: int = 0
    invalid: int = 0
    errors: int = 0
    inconclusive: int = 0
    consecutive_valid: int = 0
    trust: float = DEFAULT_TRUST.initial

    @classmethod
    def new(cls, params: TrustParams = DEFAULT_TRUST) -> TrustState:
        return cls(trust=params.initial)


def advance(state: TrustState | None, outcome: Outcome, params: TrustParams = DEFAULT_TRUST) -> TrustState:
    """``state`` after one more ``outcome`` (``None``: a donor with no record yet)."""
    s = state if state is not None else TrustState.new(params)
    if outcome is Outcome.VALID:
        return replace(s, valid=s.valid + 1, consecutive_valid=s.consecutive_valid + 1,
                       trust=s.trust + params.gain * (1.0 - s.trust))
    if outcome is Outcome.INVALID:
        return replace(s, invalid=s.invalid + 1, consecutive_valid=0, trust=s.trust * params.keep_on_invalid)
    if outcome is Outcome.INCONCLUSIVE:
        return replace(s, inconclusive=s.inconclusive + 1, consecutive_valid=0,
                       trust=s.trust * params.keep_on_inconclusive)
    return replace(s, errors=s.errors + 1, consecutive_valid=0)


# ---------------------------------------------------------------- adaptive replication


@dataclass(frozen=True, slots=True)
class ReplicationParams:
    """When a task is replicated at all (BOINC's adaptive replication).

    Attributes:
        trusted_after: valid results in a row before a donor is checked on a sample only.
            10: a donor that returns wrong results one time in ten is almost never trusted
            (0.9 ** 10 = 0.35 chance to get there, and it is checked again soon after).
        floor: the least share of a trusted donor's tasks still checked. 0.05: a donor that
            turns bad after a long honest record is caught within about 20 tasks.
    """

    trusted_after: int = 10
    floor: float = 0.05

    def __post_init__(self) -> None:
        if self.trusted_after < 1:
            raise ValueError(f"ReplicationParams.trusted_after must be >= 1, got {self.trusted_after!r}")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"ReplicationParams.floor must be within (0, 1], got {self.floor!r}")


DEFAULT_REPLICATION = ReplicationParams()


def check_probability(state: TrustState | None, replication: ReplicationParams = DEFAULT_REPLICATION,
                      trust: TrustParams = DEFAULT_TRUST) -> float:
    """Probability that a task given to a donor with ``state`` is replicated and checked.

    1 for a new donor, one whose run of valid results is shorter than ``trusted_after``
    (a recent failure resets it) and one whose trust is below ``trust.low``; else
    ``max(floor, trusted_after / consecutive_valid)``.
    """
    if state is None or state.consecutive_valid < replication.trusted_after or state.trust < trust.low:
        return 1.0
    return max(replication.floor, replication.trusted_after / state.consecutive_valid)


def should_check(state: TrustState | None, rng: random.Random,
                 replication: ReplicationParams = DEFAULT_REPLICATION, trust: TrustParams = DEFAULT_TRUST) -> bool:
    """Draw whether this task is checked (see :func:`check_probability`)."""
    p = check_probability(state, replication, trust)
    return p >= 1.0 or rng.random() < p


# ---------------------------------------------------------------- choosing donors


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live donor node that could run one replica: who, whose, where, and its trust."""

    donor_id: str
    owner: str
    node_id: str
    trust: float | None = None


def choose_replicas(candidates: Iterable[Candidate], k: int, rng: random.Random, *,
                    include: Sequence[str] = (), low_trust: float = DEFAULT_TRUST.low) -> list[Candidate]:
    """Up to ``k`` candidates of distinct owners, in the order they should be used.

    The donors named in ``include`` come first (a spot check of a suspect donor), then one
    random donor of each other owner, owners whose donors are all below ``low_trust`` last.
    The first is the primary: its record decides whether the task is checked at all.
    Fewer than ``k`` are returned when fewer owners are live.

    Raises:
        ValueError: a donor in ``include`` is not a candidate, or two of them share an owner.
    """
    pool = list(candidates)
    by_id = {c.donor_id: c for c in pool}
    chosen: list[Candidate] = []
    for donor_id in include:
        c = by_id.get(donor_id)
        if c is None:
            raise ValueError(f"donor {donor_id!r} in include is not a live donor with room for the task")
        if any(x.owner == c.owner for x in chosen):
            raise ValueError(f"donors in include share owner {c.owner!r}: replicas must run on different owners")
        chosen.append(c)
    taken = {c.owner for c in chosen}
    owners: dict[str, list[Candidate]] = {}
    for c in pool:
        if c.owner not in taken:
            owners.setdefault(c.owner, []).append(c)

    def trusted(c: Candidate) -> bool:
        return c.trust is None or c.trust >= low_trust

    picks = []
    for donors in owners.values():
        good = [c for c in donors if trusted(c)]
        picks.append(rng.choice(good or donors))
    rng.shuffle(picks)
    picks.sort(key=lambda c: not trusted(c))  # stable: random within each tier
    return (chosen + picks)[:max(k, len(chosen))]

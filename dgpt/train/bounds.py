"""Elastic scaling bounds: how few and how many workers a run may have on the donors it can use.

Ray Train's ``ScalingConfig(num_workers=(min, max))`` starts as soon as ``min`` workers fit
and resizes (a restart from the latest checkpoint) toward ``max`` as donors come and go.
Rules:

- a single number ``n`` means "up to n": ``(1, n)``. On donors, one worker making progress
  beats every worker waiting for capacity that may return in hours; a run that needs more
  (a model that only fits sharded) says so with an explicit minimum;
- ``max`` is capped at the worker slots of the donors the run may use (more would only be
  requested, never granted); a capped bound says so in ``note``;
- ``min`` above the usable slots is an error that names the numbers, not a run that waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgpt.exceptions import TrainError

# Most workers one run may ask for; Ray's tested envelope is a few thousand nodes.
MAX_WORKERS = 4096


@dataclass(frozen=True)
class ElasticBounds:
    """``min_workers``..``max_workers``; ``note`` says when dgpt changed the request."""

    min_workers: int
    max_workers: int
    note: str = ""

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def as_ray(self) -> int | tuple[int, int]:
        """The value of ``ScalingConfig(num_workers=...)``."""
        return (self.min_workers, self.max_workers) if self.elastic else self.max_workers


def parse_workers(workers: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(min, max)`` from ``n`` (meaning ``(1, n)``) or a pair.

    Raises:
        TrainError: not a positive int or an ordered pair of positive ints (names ``workers``).
    """
    if isinstance(workers, bool):
        raise TrainError(f"workers must be an int or a (min, max) pair, got {workers!r}")
    if isinstance(workers, int):
        pair = (1, workers)
    elif isinstance(workers, tuple | list) and len(workers) == 2 and all(
            isinstance(w, int) and not isinstance(w, bool) for w in workers):
        pair = (int(workers[0]), int(workers[1]))
    else:
        raise TrainError(f"workers must be an int or a (min, max) pair of ints, got {workers!r}",
                         hint="e.g. workers=4 (1 to 4 workers) or workers=(2, 8)")
    lo, hi = pair
    if not 1 <= lo <= hi <= MAX_WORKERS:
        raise TrainError(f"workers={workers!r}: need 1 <= min <= max <= {MAX_WORKERS}",
                         hint="e.g. workers=(1, 4)")
    return pair


def elastic_bounds(workers: int | tuple[int, int] | list[int], usable_slots: int | None) -> ElasticBounds:
    """The bounds for a request, given how many workers the usable donors can host.

    Args:
        workers: ``n`` or ``(min, max)``.
        usable_slots: worker slots on donors the run may use (active and standby); None
            when unknown (no fleet view): the request is kept as it is.

    Raises:
        TrainError: a malformed request, or ``min`` above ``usable_slots``.
    """
    lo, hi = parse_workers(workers)
    if usable_slots is None or hi <= usable_slots:
        return ElasticBounds(lo, hi)
    if lo > usable_slots:
        raise TrainError(
            f"workers={workers!r} needs at least {lo} workers, but the donors this run may use have "
            f"room for {usable_slots}",
            hint="lower the minimum, ask for less per worker, or wait for more donors to join (`dgpt status`)",
        )
    return ElasticBounds(lo, max(lo, usable_slots),
                         note=f"max_workers {hi} capped to {usable_slots}: the usable donors' worker slots")

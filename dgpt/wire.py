"""Pickling the fleet's small frozen types fast: they cross processes by the thousand.

A placement view of 2,000 active donors holds thousands of ``FleetDonor``, ``Resources``
and ``WeibullParams`` values, and it is pickled by the control plane, unpickled and
pickled again by Ray, and unpickled by the driver. Python pickles a frozen dataclass with
slots through ``dataclasses._dataclass_getstate``, which walks ``fields()`` for every
object; :func:`positional_pickle` makes it a call of the class with its fields in order,
which is several times faster both ways and checks every field again on arrival (the
class's ``__post_init__`` runs).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, TypeVar

T = TypeVar("T")


def positional_pickle(cls: type[T]) -> type[T]:
    """Class decorator, applied above ``@dataclass``: pickle ``cls`` as ``cls(*fields)``."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if any(not f.init for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__}: every field must be an __init__ argument to pickle positionally")
    get = operator.attrgetter(*names)
    if len(names) == 1:
        def reduce(self: Any) -> tuple[Any, tuple[Any, ...]]:
            return cls, (get(self),)
    else:
        def reduce(self: Any) -> tuple[Any, tuple[Any, ...]]:
            return cls, get(self)
    cls.__reduce__ = reduce  # type: ignore[assignment,method-assign]
    return cls

"""The node-label naming contract (DESIGN.md) and matching of Ray-style label selectors.

Selectors follow Ray 2.60's syntax: ``"value"`` (equals), ``"!value"`` (differs),
``"in(a, b)"`` (one of) and ``"!in(a, b)"`` (none of).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DONOR_ID = "dgpt.io/donor-id"
DEVICE_CLASS = "dgpt.io/device-class"
ROLE = "dgpt.io/role"
OWNER = "dgpt.io/owner"
GPU = "dgpt.io/gpu"

ROLE_DONOR = "donor"
ROLE_HEAD = "head"
NO_GPU = "none"

# Ray's label value syntax (ray/_private/label_utils.py LABEL_REGEX): what can go in a selector.
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")


def is_valid_label_value(value: str) -> bool:
    """True if Ray accepts ``value`` as a node label value (and so in a selector)."""
    return bool(_LABEL_VALUE.fullmatch(value))


def _one_of(expr: str) -> frozenset[str]:
    return frozenset(part.strip() for part in expr[3:-1].split(","))


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True if node ``labels`` satisfy every condition of a Ray-style label ``selector``."""
    for key, expr in selector.items():
        have = labels.get(key)
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            hit = have is not None and have in _one_of(body)
        else:
            hit = have == body
        if hit == negate:
            return False
    return True

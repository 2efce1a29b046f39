"""The fault-injection drill switch: a donor that answers wrong on purpose.

Start a donor agent with ``DGPT_FAULT_INJECT=wrong-results`` and every verified task
(``dgpt.verify``) and every shadowed Serve request (``dgpt.serve.shadow``) that runs on it
returns a perturbed result: a drill that the fabric catches the donor, reruns its work on
a trusted node and charges its trust. The agent's environment reaches its raylet and Ray's
workers (the sandbox adds variables, it clears none), and only the verify wrappers read the
switch: plain Ray tasks on that donor are unaffected. The head's own processes never carry
it (their environment drops every ``DGPT_*`` variable).

The switch is read in the worker, per result, from its environment, since that is the one
thing the donor's agent passes to the work. The agent validates it at start as the setting
``fault_inject``; a head refuses to start with it (its results settle disputes).
"""

from __future__ import annotations

import cmath
import enum
import os
import sys
from collections.abc import Mapping

from dgpt.exceptions import ConfigError

__all__ = ["FAULT_INJECT_ENV", "FaultMode", "apply", "fault_mode", "perturb"]

FAULT_INJECT_ENV = "DGPT_FAULT_INJECT"


class FaultMode(str, enum.Enum):
    """What a donor with the drill switch on does to its results."""

    WRONG_RESULTS = "wrong-results"


def fault_mode(env: Mapping[str, str] | None = None) -> FaultMode | None:
    """The drill switch in ``env`` (this process's environment when omitted); None when off.

    Raises:
        ConfigError: the variable holds a value other than the known modes (or empty).
    """
    env = os.environ if env is None else env
    raw = env.get(FAULT_INJECT_ENV, "").strip()
    if not raw:
        return None
    try:
        return FaultMode(raw)
    except ValueError:
        known = ", ".join(m.value for m in FaultMode)
        raise ConfigError(f"{FAULT_INJECT_ENV}={raw!r} is not a fault-injection mode",
                          hint=f"set {FAULT_INJECT_ENV} to one of: {known}, or unset it") from None


def perturb(value: object) -> object:
    """A result that differs from ``value`` under any comparison dgpt makes.

    Numbers move by one plus twice their magnitude (outside any sane tolerance), strings
    and bytes grow a character, containers have their first element perturbed (or gain
    one), arrays and tensors move every element.
    """
    if value is None:
        return "perturbed"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, (float, complex)):
        # NaN and infinities become a number: inf + 1 would still be inf.
        return value + 1.0 + 2.0 * abs(value) if cmath.isfinite(value) else 0.0
    if isinstance(value, str):
        return value + "~"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) + b"\x00"
    if isinstance(value, list):
        return [perturb(value[0]), *value[1:]] if value else [None]
    if isinstance(value, tuple):
        return (perturb(value[0]), *value[1:]) if value else (None,)
    if isinstance(value, dict):
        if not value:
            return {"perturbed": True}
        first = next(iter(value))
        return {**value, first: perturb(value[first])}
    if isinstance(value, (set, frozenset)):
        return type(value)([*value, "perturbed"])
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.kind == "b":
            return ~arr
        if arr.dtype.kind in "fc":
            return np.where(np.isfinite(arr), arr + 1 + 2 * np.abs(arr), 0)
        if arr.dtype.kind in "iu":
            return arr + 1
        return np.append(arr.reshape(-1), arr.reshape(-1)[:1])
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return ~value
        if value.is_floating_point():
            return torch.where(value.isfinite(), value + 1 + 2 * value.abs(), torch.zeros_like(value))
        return value + 1
    return ("perturbed", value)


def apply(value: object, env: Mapping[str, str] | None = None) -> object:
    """``value`` as this donor returns it: perturbed when the drill switch is on.

    Raises:
        ConfigError: the switch holds an unknown mode (the task fails and says so).
    """
    if fault_mode(env) is FaultMode.WRONG_RESULTS:
        return perturb(value)
    return value

"""The names every part of dgpt shares: node labels, actors, Ray resources, lifecycle enums.

A label key, an actor name or a state is spelled here once and imported everywhere else,
so the head, donors, placement, the autoscaler and Serve's router cannot drift apart.
Pure data: no dgpt imports, no Ray.

Node labels (DESIGN.md's naming contract, set at ``ray start --labels``) and label
selectors follow Ray 2.60's syntax: ``"value"`` (equals), ``"!value"`` (differs),
``"in(a, b)"`` (one of) and ``"!in(a, b)"`` (none of).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping

# ---------------------------------------------------------------- node labels

LABEL_DONOR_ID = "dgpt.io/donor-id"
LABEL_DEVICE_CLASS = "dgpt.io/device-class"
LABEL_ROLE = "dgpt.io/role"
LABEL_OWNER = "dgpt.io/owner"
LABEL_GPU = "dgpt.io/gpu"
#: Labels only dgpt sets; a donor's own ``--labels`` may not use this prefix.
RESERVED_LABEL_PREFIX = "dgpt.io/"

ROLE_DONOR = "donor"
ROLE_HEAD = "head"
NO_GPU = "none"

# ---------------------------------------------------------------- Ray names

#: Ray namespace of dgpt's head actors.
NAMESPACE = "dgpt"
#: The control plane's door actor on the head (dgpt.head.control_link): registry, fleet view, autoscaler.
REGISTRY_ACTOR = "registry"
#: Ray custom resource every donor node offers once (DESIGN: ``donor``).
DONOR_RESOURCE = "donor"

# ---------------------------------------------------------------- lifecycle


class DonorState(str, enum.Enum):
    """Where a donor is in its lifecycle, as the head records it (DESIGN.md).

    ``registered -> standby -> activating -> active -> draining -> standby | gone``
    """

    REGISTERED = "registered"  # registered, not heard from since
    STANDBY = "standby"  # idle and reachable, not in the Ray cluster
    ACTIVATING = "activating"  # told to join Ray; its node is not seen yet
    ACTIVE = "active"  # its Ray node is alive; a session is open
    DRAINING = "draining"  # leaving: its work finishes or moves before the deadline
    GONE = "gone"  # silent past the heartbeat timeout

    @property
    def running(self) -> bool:
        """True when the donor is expected to run a raylet."""
        return self in _RUNNING


_RUNNING = frozenset({DonorState.ACTIVATING, DonorState.ACTIVE, DonorState.DRAINING})


class AgentState(str, enum.Enum):
    """What a donor agent reports about its raylet in each heartbeat."""

    STANDBY = "standby"  # no raylet
    STARTING = "starting"  # `ray start` launched, not up yet
    ACTIVE = "active"  # the raylet runs
    DRAINING = "draining"  # the agent is draining its node


class Target(str, enum.Enum):
    """The autoscaler's choice for a donor: in the Ray cluster or out of it."""

    ACTIVE = "active"
    STANDBY = "standby"


class HeartbeatAction(str, enum.Enum):
    """The head's answer to a heartbeat: what the agent does next."""

    STANDBY = "standby"  # stay out of Ray (stop nothing that is draining)
    ACTIVATE = "activate"  # run a raylet; join arguments come with it when none runs
    DRAIN = "drain"  # drain the node now, before the deadline


class SessionEnd(str, enum.Enum):
    """How a session (one stay of a donor in the Ray cluster) ended."""

    DRAINED = "drained"  # it left through DrainNode
    LOST = "lost"  # it vanished: missed heartbeats, or Ray's node death


class LeaveReason(str, enum.Enum):
    """Why a donor drains; the reason is recorded as its session's end reason."""

    LEAVE = "leave"  # `dgpt donor leave`, Ctrl-C
    PAUSED = "paused"  # `dgpt donor pause`
    OWNER_ACTIVE = "owner-active"  # the load detector saw the owner come back
    OUTSIDE_HOURS = "outside-hours"  # the allowed-hours window closed
    SIGTERM = "sigterm"  # the system stops the agent
    AUTOSCALER = "autoscaler"  # scale-down
    SHUTDOWN = "shutdown"  # the whole fabric stops
    OPERATOR = "operator"  # an operator drained it through the API


class PausedBy(str, enum.Enum):
    """Who paused a donor on the head (``POST /donors/{id}/pause``): it stays out of Ray until resumed."""

    DONOR = "donor"  # its owner, with the donor secret (the donor page)
    OPERATOR = "operator"  # an operator, with an API key


#: End reasons that are dgpt's own choice, not the donor leaving: reliability counts such
#: sessions as censored (the donor lasted at least that long), not as departures.
NOT_DEPARTURES = frozenset({LeaveReason.AUTOSCALER.value, LeaveReason.SHUTDOWN.value})

# ---------------------------------------------------------------- label selectors

# Ray's label value syntax (ray/_private/label_utils.py LABEL_REGEX): what a selector can name.
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")


def is_valid_label_value(value: str) -> bool:
    """True if Ray accepts ``value`` as a node label value (and so in a selector)."""
    return bool(_LABEL_VALUE.fullmatch(value))


def label_safe(text: str) -> str:
    """``text`` turned into a valid label value (a GPU model name, say)."""
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-_.")
    return out[:63] or "unknown"


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

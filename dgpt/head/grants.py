"""What a Ray node may claim, against the donor session the head granted it.

Any raylet holding the cluster's Ray token can join and say what it likes about itself:
labels (``dgpt.io/role=head``), resources (more CPU than its caps, the head's own
``node:__internal_head__``), a donor id that is not its own. :func:`grant_problem` is the
registry's check of one node: ``None`` when the node is the head or matches a grant, else
what is wrong, in words an operator can act on. Pure: the registry applies the verdict
(flag, drain, keep out of placement).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dgpt import contract
from dgpt.contract import DonorState

#: Resources Ray gives every node by itself: not part of any grant, never a claim.
_RAY_OWN_PREFIXES = ("node:", "accelerator_type:")
_RAY_OWN = frozenset({"object_store_memory"})
#: Resources only the head has; a donor claiming one poses as the head.
_HEAD_ONLY = frozenset({"node:__internal_head__"})
#: Float dust in Ray's resource figures (memory is rounded to whole bytes).
_SLACK = 1e-6


def claims_problem(resources: Mapping[str, float], labels: Mapping[str, str],
                   granted_resources: Mapping[str, float], granted_labels: Mapping[str, str]) -> str | None:
    """What a node claims beyond its grant (resources, ``dgpt.io/*`` labels), or None."""
    for key in sorted(resources):
        value = float(resources[key])
        if key in _HEAD_ONLY:
            return f"claims the head's resource {key}"
        if key in granted_resources:
            if value > float(granted_resources[key]) * (1 + _SLACK) + _SLACK:
                return f"claims {key}={value:g}, granted {float(granted_resources[key]):g}"
        elif key not in _RAY_OWN and not key.startswith(_RAY_OWN_PREFIXES) and value > 0:
            return f"claims resource {key}={value:g}, not granted"
    for key in sorted(labels):
        if key.startswith("dgpt.io/") and granted_labels.get(key) != labels[key]:
            granted = granted_labels.get(key)
            return f"claims label {key}={labels[key]}" + (f", granted {granted}" if granted is not None else ", not granted")
    return None


@dataclass(frozen=True)
class GrantProblem:
    """Why a node is not as granted. ``lingering``: only that its donor has no session open
    now, which a drained raylet that is still stopping shows for a moment (the registry
    gives it a grace); anything else is a claim no legitimate donor makes."""

    reason: str
    lingering: bool = False


def grant_problem(*, is_head: bool, donor_id: str | None, known: bool, state: DonorState | None,
                  resources: Mapping[str, float], labels: Mapping[str, str],
                  granted_resources: Mapping[str, float], granted_labels: Mapping[str, str]) -> GrantProblem | None:
    """Why a live Ray node is not what the head granted, or None.

    Args:
        is_head: the GCS says it is the head node (the head's own raylet).
        donor_id: its ``dgpt.io/donor-id`` label (None: it has none).
        known: the registry knows that donor id.
        state: the donor's lifecycle state (None when unknown).
        granted_*: what the head hands that donor at activation (its caps' resources, its labels).
    """
    if is_head:
        return None
    if donor_id is None:
        role = labels.get(contract.LABEL_ROLE)
        return GrantProblem("joined without a donor session (no dgpt.io/donor-id label"
                            + (f", role {role})" if role else ")"))
    if not known:
        return GrantProblem(f"joined without a donor session (unknown donor id {donor_id})")
    problem = claims_problem(resources, labels, granted_resources, granted_labels)
    if problem is not None:
        return GrantProblem(problem)
    # Running states are those the head handed the donor its Ray join arguments in.
    if state is not None and not state.running and state is not DonorState.GONE:
        # GONE: a lost donor's raylet may still be listed until Ray's health check fails.
        return GrantProblem(f"donor {donor_id} was granted no session ({state.value})", lingering=True)
    return None

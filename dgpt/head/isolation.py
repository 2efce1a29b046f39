"""The head's secrets kept from Ray work on the head: the head's Ray runs in a sandbox.

Ray lets any token holder (every active donor, every job) place work on any node: a task that
asks for no CPU, pinned to the head by node id, runs on the head, and so does a job's driver.
Everything Ray runs on the head descends from one ``ray start --head``; it runs in the
bubblewrap sandbox donors use for their owners (``dgpt.donor.sandbox``), where:

- ``$DGPT_HOME`` (the API key, the registry's SQLite file, the TLS key, the storage tier's
  secret, the overlay key), the user's home, ``/root``, ``/home`` and ``/tmp`` are hidden;
  shown again are the Python that runs Ray, the Ray token (every donor holds it anyway), and
  writable: the head's Ray temp folder, the head checkpoint store and ``sandbox_shared``;
- a head started as root runs Ray as ``sandbox_user`` (``nobody`` by default);
- its own PID namespace: no Ray work can see, signal or trace the head's other processes.

The control plane, which holds the secrets, runs outside (``dgpt.head.control_plane``), a
process of the head's own user that joins Ray as a driver; Ray work reaches it only through
the door actor (``dgpt.head.control_link``).

``head_sandbox``: ``auto`` uses the sandbox where this machine can build it, else warns;
``on`` refuses to start the head without it; ``off`` runs Ray unconfined (Ray work can then
read the head's secrets: a head for trusted donors only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dgpt.config import Settings
from dgpt.donor import sandbox as sb
from dgpt.exceptions import FabricError, ProtectionUnavailable
from dgpt.head.paths import head_paths, ray_temp_dir
from dgpt.train.storage import store_root


def head_spec(settings: Settings, user: tuple[int, int] | None) -> sb.SandboxSpec:
    """The sandbox of the head's Ray for these settings; Ray work runs as ``user`` (None: this one)."""
    home = settings.home.resolve()
    hidden = tuple(dict.fromkeys(p.resolve() for p in (*sb.DEFAULT_HIDDEN, Path.home(), home) if p.exists()))
    return sb.SandboxSpec(
        scratch=home / "head-work",
        writable=(ray_temp_dir(settings.home), store_root(settings).resolve(), *settings.sandbox_shared_folders),
        readable=sb.readable_under(hidden, sb.python_paths()),
        files=(head_paths(settings.home)["ray_token"].resolve(),),
        hidden=hidden,
        uid=user[0] if user else None,
        gid=user[1] if user else None,
    )


@dataclass(frozen=True)
class HeadIsolation:
    """How the head's Ray runs: in ``spec`` with ``bwrap``, or unconfined for ``reason``."""

    spec: sb.SandboxSpec | None = None
    bwrap: str | None = None
    reason: str | None = None

    @property
    def owner(self) -> tuple[int, int] | None:
        """The user Ray work on the head runs as, when not this process's."""
        if self.spec is None or self.spec.uid is None:
            return None
        return self.spec.uid, self.spec.gid if self.spec.gid is not None else self.spec.uid

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it runs: in the sandbox, or as it is."""
        if self.spec is None or self.bwrap is None:
            return list(argv)
        return sb.bwrap_argv(self.spec, argv, self.bwrap)

    def describe(self) -> str:
        if self.spec is None:
            return f"unconfined ({self.reason}): Ray work on the head can read $DGPT_HOME/head"
        user = f"uid {self.spec.uid}" if self.spec.uid is not None else "this user"
        return f"sandboxed (bubblewrap, as {user}): Ray work on the head cannot read $DGPT_HOME"


def setup(settings: Settings) -> HeadIsolation:
    """Build (and try once) the head's sandbox per ``head_sandbox``, and hand its folders to
    the work's user.

    Raises:
        FabricError: ``head_sandbox=on`` and the sandbox cannot be built here (says why).
    """
    if settings.head_sandbox == "off":
        return HeadIsolation(reason="head_sandbox=off")
    try:
        bwrap = sb.find_bwrap()
        spec = head_spec(settings, sb.work_user(settings.sandbox_user))
        sb.prepare(spec)
        sb.check(spec, bwrap)
    except ProtectionUnavailable as exc:
        if settings.head_sandbox == "on":
            raise FabricError(f"head_sandbox=on, but {exc.message}", hint=exc.hint or "set DGPT_HEAD_SANDBOX=auto") from None
        return HeadIsolation(reason=exc.message)
    return HeadIsolation(spec, bwrap)

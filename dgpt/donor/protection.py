"""What protects a donor's owner from the work: enforced caps (cgroup) and a sandbox, set up
once per agent and applied to every `ray start` it spawns (the warm one too).

Each protection has a mode: ``auto`` (on where this machine allows it, otherwise off with a
logged warning naming what is not enforced and why), ``on`` (the agent refuses to start
without it) or ``off``. The agent calls three things: :meth:`Protection.wrap` on the argv,
:meth:`Protection.preexec` as the child's ``preexec_fn`` (the cgroup is joined there,
before exec, so nothing escapes it), and :meth:`Protection.close` when it exits.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dgpt.donor import sandbox as sb
from dgpt.donor.cgroups import Usage, WorkCgroup, cgroup_name
from dgpt.exceptions import ProtectionUnavailable
from dgpt.sdk.models import DonorCaps

log = logging.getLogger("dgpt.donor")


class Mode(str, enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class ProtectionConfig:
    """How the agent protects its owner (AgentConfig.protection; settings ``enforce_caps``,
    ``sandbox``, ``sandbox_user``).

    Attributes:
        caps: enforce the CPU and memory caps with a cgroup.
        sandbox: run the work in a bubblewrap sandbox.
        scratch_dir: the work's writable folder (default: ``<state_dir>/scratch``).
        sandbox_user: who the work runs as when the agent is root (default ``nobody``).
        hidden: folders the work must not see (default: homes, /tmp, /run/user, ...).
        shared: folders the work may write besides its scratch (setting ``sandbox_shared``),
            such as a shared mount for Ray Train's storage; each must exist when the agent starts.
    """

    caps: Mode = Mode.AUTO
    sandbox: Mode = Mode.AUTO
    scratch_dir: Path | None = None
    sandbox_user: str | None = None
    hidden: tuple[Path, ...] | None = None
    shared: tuple[Path, ...] = ()


class Protection:
    """The cgroup and sandbox of one agent (either may be absent; ``notes`` say why)."""

    def __init__(self, cgroup: WorkCgroup | None, spec: sb.SandboxSpec | None, bwrap: str | None,
                 notes: Sequence[str] = ()) -> None:
        self.cgroup = cgroup
        self.spec = spec
        self.bwrap = bwrap
        self.notes = list(notes)

    @classmethod
    def setup(cls, config: ProtectionConfig, *, name: str, state_dir: Path, caps: DonorCaps,
              token_file: Path, ray_temp_dir: Path | None = None) -> Protection:
        """Create the donor's cgroup and sandbox as far as ``config`` asks and the machine allows.

        Args:
            name: the donor's name (part of the cgroup's name).
            state_dir: the agent's state folder (hidden from the work; names the cgroup).
            caps: the limits the cgroup enforces.
            token_file: the Ray auth token file the raylet reads (shown to the work read-only;
                created empty here so the sandbox can bind it before the agent writes it).
            ray_temp_dir: the raylet's Ray temp folder, if the agent gives it one.

        Raises:
            ProtectionUnavailable: a protection in mode ``on`` cannot be had here.
        """
        notes: list[str] = []
        cgroup = None
        if config.caps is not Mode.OFF:
            try:
                cgroup = WorkCgroup.create(cgroup_name(name, state_dir), caps.cpus, caps.memory_bytes)
            except ProtectionUnavailable as exc:
                if config.caps is Mode.ON:
                    raise
                notes.append(f"caps not enforced (CPU quota, memory limit): {exc}")
        spec = bwrap = None
        if config.sandbox is not Mode.OFF:
            try:
                bwrap = sb.find_bwrap()
                spec = _spec(config, state_dir, caps, token_file, ray_temp_dir, cgroup)
                sb.prepare(spec)
                sb.check(spec, bwrap)
            except ProtectionUnavailable as exc:
                if config.sandbox is Mode.ON:
                    if cgroup is not None:
                        cgroup.remove()
                    raise
                notes.append(f"work not sandboxed (it can read the owner's files): {exc}")
                spec = bwrap = None
        protection = cls(cgroup, spec, bwrap, notes)
        for note in notes:
            log.warning("%s", note)
        log.info("protection: %s", protection.describe())
        return protection

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as it runs on this donor: inside the sandbox when there is one."""
        if self.spec is None or self.bwrap is None:
            return list(argv)
        return sb.bwrap_argv(self.spec, argv, self.bwrap)

    def preexec(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        """A ``preexec_fn`` that joins the cgroup, then runs ``then`` (in the forked child)."""
        cgroup = self.cgroup

        def child() -> None:
            if cgroup is not None:
                cgroup.join_self()
            if then is not None:
                then()

        return child

    def usage(self) -> Usage | None:
        """What the work used by the cgroup's accounting; None without a cgroup."""
        return self.cgroup.usage() if self.cgroup is not None else None

    def describe(self) -> str:
        parts = [self.cgroup.describe() if self.cgroup else "caps not enforced"]
        if self.spec is not None:
            who = f"uid {self.spec.uid}" if self.spec.uid is not None else "the agent's user"
            writable = ", ".join(str(p) for p in (self.spec.scratch, *self.spec.writable))
            parts.append(f"sandboxed by bubblewrap as {who}, writable: {writable}")
        else:
            parts.append("not sandboxed")
        return "; ".join(parts)

    def close(self) -> None:
        """Remove the cgroup (killing anything of the work still in it)."""
        if self.cgroup is not None and not self.cgroup.remove():
            log.warning("could not remove cgroup %s (still busy)", self.cgroup.name)


def _spec(config: ProtectionConfig, state_dir: Path, caps: DonorCaps, token_file: Path,
          ray_temp_dir: Path | None, cgroup: WorkCgroup | None) -> sb.SandboxSpec:
    # The state folder holds the donor's secret: hidden wherever it lies (the scratch folder
    # and the token inside it are bound back).
    hidden = (*(config.hidden if config.hidden is not None else (*sb.DEFAULT_HIDDEN, Path.home())), state_dir)
    # A tmpfs needs a mount point: what does not exist cannot leak anyway.
    hidden = tuple(dict.fromkeys(p.resolve() for p in hidden if p.exists()))
    scratch = (config.scratch_dir or state_dir / "scratch").resolve()
    if any(scratch == k or k in scratch.parents for k in (Path("/proc"), Path("/dev"), Path("/sys"))):
        raise ProtectionUnavailable(f"scratch folder {scratch} lies in a kernel filesystem",
                                    hint="pick another folder for scratch_dir")
    missing = [p for p in config.shared if not p.is_dir()]
    if missing:
        raise ProtectionUnavailable(f"sandbox_shared folder {missing[0]} does not exist on this donor",
                                    hint="create it (writable by the sandbox's user) or drop it from DGPT_SANDBOX_SHARED")
    shared = tuple(p.resolve() for p in config.shared)
    state = state_dir.resolve()
    if any(state == p or p in state.parents or state in p.parents for p in shared):
        raise ProtectionUnavailable(f"sandbox_shared overlaps the agent's state folder {state_dir}",
                                    hint="share a folder outside the donor's state folder (it holds the donor's secret)")
    user = sb.work_user(config.sandbox_user)
    if not token_file.exists():
        # Bound into the sandbox now (the warm `ray start` waits in it before any join);
        # the agent later writes the token into this same file (same inode, same owner).
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    return sb.SandboxSpec(
        scratch=scratch,
        writable=((ray_temp_dir.resolve(),) if ray_temp_dir is not None else ()) + shared,
        readable=sb.readable_under(hidden, sb.python_paths()),
        files=(token_file.resolve(),),
        hidden=hidden,
        views=tuple(cgroup.views()) if cgroup is not None else (),
        devices=sb.gpu_devices() if caps.gpus else (),
        uid=user[0] if user else None,
        gid=user[1] if user else None,
    )

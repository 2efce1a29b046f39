"""The donor's caps enforced by the kernel: its raylet and every worker in one cgroup.

Ray treats ``--num-cpus`` and ``--memory`` as bookkeeping: a task that spins ten threads or
allocates past its share still gets them. A cgroup makes the caps real. Its CPU quota is
``cpus`` cores per scheduling period, so a donor capped at 1 CPU gets one core's worth of
time however many threads its work runs; its memory limit is ``memory_bytes``, so an overrun
makes the kernel's OOM killer pick a process *inside* the cgroup (Ray's workers carry
``oom_score_adj`` 1000 and are picked first), never one of the owner's.

Both cgroup versions are supported, detected from ``/proc/self/mountinfo``:

- **v1**: one hierarchy per controller (``cpu``, ``cpuacct`` and ``memory``, possibly
  co-mounted as ``cpu,cpuacct``). The cgroup is created in each, below the agent's own
  cgroup there (so whatever limits the agent already lives under bound its work too).
  Limits: ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, ``memory.limit_in_bytes`` and, where
  swap is accounted, ``memory.memsw.limit_in_bytes`` (the cap counts swap too).
- **v2**: one unified hierarchy. ``cpu`` and ``memory`` must be enabled in the parent's
  ``cgroup.subtree_control``; a non-root cgroup that holds processes cannot enable them (the
  kernel's "no internal processes" rule), so the agent first moves itself into a leaf of
  its own. Limits: ``cpu.max``, ``memory.max``, ``memory.swap.max`` = 0.

A process joins before it execs anything: :meth:`WorkCgroup.join_self` runs in the forked
child (a ``preexec_fn``) and writes its own pid into every hierarchy, so nothing it starts
can run outside the cgroup even for an instant (writing the pid after the spawn would race
the child's own forks).

Pure parts (parsing mountinfo and stat files, the files a limit writes) are functions of
text; :class:`WorkCgroup` applies them to a cgroup filesystem rooted wherever it is told.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dgpt.exceptions import ProtectionUnavailable

#: CFS scheduling period: Linux's default (100 ms). A shorter one throttles more smoothly
#: but costs scheduler work; the default is what `docker --cpus` uses too.
CPU_PERIOD_US = 100_000
#: The kernel refuses quotas below 1 ms per period.
_MIN_QUOTA_US = 1_000
#: Ray needs this much memory to run a raylet and one worker at all; a lower limit would
#: only make `ray start` fail in confusing ways.
MIN_MEMORY_BYTES = 64 * 2**20

_V2_CONTROLLERS = ("cpu", "memory")


class CgroupVersion(str, enum.Enum):
    V1 = "v1"
    V2 = "v2"


# ---------------------------------------------------------------- detection (pure)


@dataclass(frozen=True)
class Mount:
    """One cgroup filesystem mount: where it is, what it controls, which cgroup its root is."""

    path: Path
    version: CgroupVersion
    controllers: frozenset[str]  # v1: the mount's options; v2: filled from cgroup.controllers
    root: str  # the cgroup the mount shows at its top ("/" unless in a container)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup (v1) and cgroup2 mounts listed in ``/proc/self/mountinfo`` text.

    Format (proc(5)): ``id parent major:minor root mountpoint options [optional...] - fstype
    source superoptions``; v1 controllers are the superoptions (``rw,cpu,cpuacct``).
    """
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, superopts = tail[0], tail[2]
        root, mountpoint = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(Mount(mountpoint, CgroupVersion.V2, frozenset(), root))
        elif fstype == "cgroup":
            opts = {o for o in superopts.split(",") if o not in ("rw", "ro") and "=" not in o}
            mounts.append(Mount(mountpoint, CgroupVersion.V1, frozenset(opts), root))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; the v2 entry is under ``""``.

    Lines read ``hierarchy-id:controller,list:path`` (v1) or ``0::path`` (v2).
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


@dataclass(frozen=True)
class Place:
    """The agent's own cgroup in one hierarchy: the hierarchy's mount point and the directory."""

    mount: Path
    parent: Path


@dataclass(frozen=True)
class Layout:
    """Where the donor's cgroup goes: the agent's own cgroup in the hierarchy that holds the
    CPU quota, the one that accounts CPU time, and the one that holds the memory limit."""

    version: CgroupVersion
    cpu: Place
    cpuacct: Place
    memory: Place


def detect_layout(mounts: Iterable[Mount], own: Mapping[str, str],
                  v2_controllers: Mapping[Path, frozenset[str]] | None = None) -> Layout:
    """Choose the hierarchies for CPU and memory and the agent's own cgroup in each.

    v1 wins where it binds both ``cpu`` and ``memory`` (a hybrid host keeps v2 for systemd
    only); otherwise the v2 mount must offer both controllers.

    Args:
        mounts: from :func:`parse_mountinfo`.
        own: the agent's cgroups, from :func:`parse_proc_cgroup`.
        v2_controllers: each v2 mount's ``cgroup.controllers`` at the agent's cgroup.

    Raises:
        ProtectionUnavailable: no hierarchy offers CPU and memory control here.
    """
    mounts = list(mounts)
    v1 = {c: m for m in mounts if m.version is CgroupVersion.V1 for c in m.controllers}
    if "cpu" in v1 and "memory" in v1:
        acct = "cpuacct" if "cpuacct" in v1 else "cpu"
        return Layout(CgroupVersion.V1, cpu=_place(v1["cpu"], own.get("cpu")),
                      cpuacct=_place(v1[acct], own.get(acct)), memory=_place(v1["memory"], own.get("memory")))
    v2_controllers = v2_controllers or {}
    for mount in mounts:
        if mount.version is CgroupVersion.V2:
            here = _place(mount, own.get(""))
            offered = v2_controllers.get(here.parent, frozenset())
            missing = [c for c in _V2_CONTROLLERS if c not in offered]
            if not missing:
                return Layout(CgroupVersion.V2, cpu=here, cpuacct=here, memory=here)
            raise ProtectionUnavailable(
                f"cgroup v2 at {mount.path} does not offer the {' and '.join(missing)} controller(s) to {here.parent}",
                hint="run the agent with the controllers delegated, e.g. "
                     "`systemd-run --scope -p Delegate=yes dgpt donor join ...`")
    have = ", ".join(sorted(v1)) or "none"
    raise ProtectionUnavailable(f"no cgroup hierarchy controls both CPU and memory here (v1 controllers: {have})",
                                hint="mount the cgroup filesystem (cgroup v2 at /sys/fs/cgroup, or v1 cpu and memory)")


def _place(mount: Mount, path: str | None) -> Place:
    """The agent's cgroup inside ``mount`` (paths in /proc are from the mount's root)."""
    path = path or "/"
    if mount.root != "/" and path.startswith(mount.root):
        path = path[len(mount.root):] or "/"
    return Place(mount.path, mount.path / path.lstrip("/"))


def host_layout(proc: Path = Path("/proc")) -> Layout:
    """This process's layout, read from ``/proc/self``.

    Raises:
        ProtectionUnavailable: as :func:`detect_layout`.
    """
    mounts = parse_mountinfo((proc / "self" / "mountinfo").read_text())
    own = parse_proc_cgroup((proc / "self" / "cgroup").read_text())
    v2: dict[Path, frozenset[str]] = {}
    for mount in mounts:
        if mount.version is CgroupVersion.V2:
            here = _place(mount, own.get("")).parent
            try:
                v2[here] = frozenset((here / "cgroup.controllers").read_text().split())
            except OSError:
                v2[here] = frozenset()
    return detect_layout(mounts, own, v2)


# ---------------------------------------------------------------- limits and accounting (pure)


def cpu_limit_files(version: CgroupVersion, cpus: float, period_us: int = CPU_PERIOD_US) -> list[tuple[str, str]]:
    """The files (in write order) and values that cap CPU time at ``cpus`` cores."""
    if not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus!r}")
    quota = max(_MIN_QUOTA_US, round(cpus * period_us))
    if version is CgroupVersion.V2:
        return [("cpu.max", f"{quota} {period_us}")]
    return [("cpu.cfs_period_us", str(period_us)), ("cpu.cfs_quota_us", str(quota))]


def memory_limit_files(version: CgroupVersion, memory_bytes: int, present: Iterable[str]) -> list[tuple[str, str]]:
    """The files (in write order) and values that cap memory at ``memory_bytes``, swap included.

    ``present`` names the files the cgroup has: swap files exist only where the kernel
    accounts swap. v1 wants the memory limit before memory+swap (memsw must stay >= it).
    """
    if memory_bytes < MIN_MEMORY_BYTES:
        raise ValueError(f"memory_bytes must be at least {MIN_MEMORY_BYTES} (64 MiB), got {memory_bytes}")
    files = set(present)
    if version is CgroupVersion.V2:
        out = [("memory.max", str(memory_bytes))]
        if "memory.swap.max" in files:
            out.append(("memory.swap.max", "0"))
        return out
    out = [("memory.limit_in_bytes", str(memory_bytes))]
    if "memory.memsw.limit_in_bytes" in files:
        out.append(("memory.memsw.limit_in_bytes", str(memory_bytes)))
    return out


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control) as {key: int}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass(frozen=True)
class Usage:
    """What the work used, by the cgroup's own accounting (since it was created)."""

    cpu_s: float  # CPU time of every process in it, all cores together
    throttled_s: float  # time its runnable threads waited because the quota was spent
    throttled_periods: int  # scheduling periods in which it hit the quota
    memory_bytes: int  # charged now (RSS, page cache, shared memory it touched)
    memory_peak_bytes: int | None  # the most ever charged; None where the kernel does not say
    oom_kills: int  # processes the OOM killer killed inside it


def usage_from(version: CgroupVersion, files: Mapping[str, str]) -> Usage:
    """A :class:`Usage` from the text of the cgroup's accounting files (absent ones omitted).

    v1: ``cpuacct.usage`` (ns), ``cpu.stat`` (``nr_throttled``, ``throttled_time`` ns),
    ``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``, ``memory.oom_control``
    (``oom_kill``). v2: ``cpu.stat`` (``usage_usec``, ``nr_throttled``, ``throttled_usec``),
    ``memory.current``, ``memory.peak``, ``memory.events`` (``oom_kill``).
    """
    def number(name: str) -> int | None:
        text = files.get(name, "").strip()
        return int(text) if text.isdigit() else None

    cpu = parse_flat_keyed(files.get("cpu.stat", ""))
    if version is CgroupVersion.V2:
        events = parse_flat_keyed(files.get("memory.events", ""))
        return Usage(cpu_s=cpu.get("usage_usec", 0) / 1e6, throttled_s=cpu.get("throttled_usec", 0) / 1e6,
                     throttled_periods=cpu.get("nr_throttled", 0), memory_bytes=number("memory.current") or 0,
                     memory_peak_bytes=number("memory.peak"), oom_kills=events.get("oom_kill", 0))
    oom = parse_flat_keyed(files.get("memory.oom_control", ""))
    return Usage(cpu_s=(number("cpuacct.usage") or 0) / 1e9, throttled_s=cpu.get("throttled_time", 0) / 1e9,
                 throttled_periods=cpu.get("nr_throttled", 0), memory_bytes=number("memory.usage_in_bytes") or 0,
                 memory_peak_bytes=number("memory.max_usage_in_bytes"), oom_kills=oom.get("oom_kill", 0))


_USAGE_FILES = {
    CgroupVersion.V1: {"cpuacct": ("cpuacct.usage",), "cpu": ("cpu.stat",),
                       "memory": ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control")},
    CgroupVersion.V2: {"cpu": ("cpu.stat",), "memory": ("memory.current", "memory.peak", "memory.events")},
}


def cgroup_name(donor_name: str, state_dir: Path) -> str:
    """The donor's cgroup name: readable, and unique per state folder (several simulated
    donors of one machine, or two fabrics, never share one)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", donor_name)[:40]
    return f"dgpt-{safe}-{digest}"


# ---------------------------------------------------------------- the cgroup itself


class WorkCgroup:
    """One donor's cgroup: the same name in each hierarchy of a :class:`Layout`.

    Create it with :meth:`create`; spawn work with :meth:`join_self` as (part of) its
    ``preexec_fn``; read :meth:`usage`; :meth:`remove` kills what is left and deletes it.
    """

    def __init__(self, layout: Layout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.cpu_dir = layout.cpu.parent / name
        self.cpuacct_dir = layout.cpuacct.parent / name
        self.memory_dir = layout.memory.parent / name
        self.dirs = list(dict.fromkeys([self.cpu_dir, self.cpuacct_dir, self.memory_dir]))
        # Encoded once here: the preexec step in the forked child should do nothing but syscalls.
        self._procs = [os.fsencode(d / "cgroup.procs") for d in self.dirs]

    @property
    def version(self) -> CgroupVersion:
        return self.layout.version

    @classmethod
    def create(cls, name: str, cpus: float, memory_bytes: int, layout: Layout | None = None) -> WorkCgroup:
        """Create (or take over) the cgroup ``name`` with the caps as its limits.

        A cgroup of that name left by an agent that died is taken over: whatever still runs
        in it is that donor's old work and is killed first.

        Raises:
            ProtectionUnavailable: no usable hierarchy, or this user may not create cgroups
                or write their limits there (the message names the path).
        """
        layout = layout or host_layout()
        group = cls(layout, name)
        try:
            if layout.version is CgroupVersion.V2:
                _enable_v2_controllers(layout.cpu.parent)
            for d in group.dirs:
                d.mkdir(exist_ok=True)
            if group.pids():
                group.kill_all()
            group.set_limits(cpus, memory_bytes)
        except PermissionError as exc:
            raise ProtectionUnavailable(
                f"cannot create or limit the cgroup {exc.filename or group.dirs[0]}: permission denied "
                f"(uid {os.getuid()})",
                hint="run the donor agent as root, or in a cgroup delegated to this user "
                     "(`systemd-run --user --scope -p Delegate=yes dgpt donor join ...`)") from None
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.ENOENT, errno.EBUSY):
                raise ProtectionUnavailable(
                    f"cannot create or limit the cgroup {exc.filename or group.dirs[0]}: {exc.strerror}",
                    hint="check that the cgroup filesystem is mounted read-write for this agent") from None
            raise
        return group

    def set_limits(self, cpus: float, memory_bytes: int) -> None:
        """Write the CPU quota and memory limit (safe to repeat with new caps)."""
        for file, value in cpu_limit_files(self.version, cpus):
            _write(self.cpu_dir / file, value)
        present = [p.name for p in self.memory_dir.iterdir()]
        for file, value in memory_limit_files(self.version, memory_bytes, present):
            _write(self.memory_dir / file, value)

    def limits(self) -> tuple[float, int]:
        """The CPU cores and memory bytes the cgroup enforces now, read back from the kernel."""
        if self.version is CgroupVersion.V2:
            quota, period = (self.cpu_dir / "cpu.max").read_text().split()
            cpus = float("inf") if quota == "max" else int(quota) / int(period)
            mem = (self.memory_dir / "memory.max").read_text().strip()
            return cpus, (2**63 - 1 if mem == "max" else int(mem))
        quota_us = int((self.cpu_dir / "cpu.cfs_quota_us").read_text())
        period_us = int((self.cpu_dir / "cpu.cfs_period_us").read_text())
        cpus = float("inf") if quota_us < 0 else quota_us / period_us
        return cpus, int((self.memory_dir / "memory.limit_in_bytes").read_text())

    def join_self(self) -> None:
        """Move the calling process into the cgroup (every hierarchy). Safe in a forked child
        before exec: only open/write/close, with paths encoded beforehand."""
        pid = str(os.getpid()).encode()
        for path in self._procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def add(self, pid: int) -> None:
        """Move a running process in (its later children follow; those it already has do not)."""
        for path in self._procs:
            _write(Path(os.fsdecode(path)), str(pid))

    def pids(self) -> list[int]:
        """Every process in the cgroup (in any of its hierarchies)."""
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return sorted(found)

    def usage(self) -> Usage:
        """CPU time, throttling, memory now and at peak, and OOM kills, from the kernel."""
        where = {"cpu": self.cpu_dir, "cpuacct": self.cpuacct_dir, "memory": self.memory_dir}
        files = {}
        for role, names in _USAGE_FILES[self.version].items():
            for name in names:
                try:
                    files[name] = (where[role] / name).read_text()
                except OSError:
                    continue
        return usage_from(self.version, files)

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the cgroup (it holds the donor's work only) and wait for them."""
        kill_file = self.cpu_dir / "cgroup.kill"
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            if self.version is CgroupVersion.V2 and kill_file.exists():
                _write(kill_file, "1")
            else:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    def remove(self, timeout_s: float = 5.0) -> bool:
        """Kill what is left, then delete the cgroup; False if the kernel kept it busy."""
        self.kill_all(timeout_s)
        deadline = time.monotonic() + timeout_s
        left = list(self.dirs)
        while left:
            for d in list(left):
                try:
                    d.rmdir()
                    left.remove(d)
                except FileNotFoundError:
                    left.remove(d)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
            if left and time.monotonic() >= deadline:
                return False
            if left:
                time.sleep(0.05)  # exited processes leave the cgroup a moment after they die
        return True

    def views(self) -> list[tuple[Path, Path]]:
        """(this cgroup's directory, its hierarchy's mount point) pairs. Bound read-only over
        the mount point inside a sandbox, they let Ray read its node's caps where it looks
        (``/sys/fs/cgroup/memory/memory.limit_in_bytes``, ``/sys/fs/cgroup/memory.max``):
        its memory monitor then stops a task at the cap before the kernel has to."""
        pairs = {self.cpu_dir: self.layout.cpu.mount, self.cpuacct_dir: self.layout.cpuacct.mount,
                 self.memory_dir: self.layout.memory.mount}
        return list(pairs.items())

    def describe(self) -> str:
        cpus, mem = self.limits()
        return f"cgroup {self.version.value} {self.name}: {cpus:g} CPU, {mem / 2**30:.2f} GiB"


def _enable_v2_controllers(parent: Path) -> None:
    """Turn on cpu and memory for the parent's children; move the agent into a leaf of its
    own first if the kernel's no-internal-processes rule requires it.

    Raises:
        ProtectionUnavailable: other processes share the agent's cgroup, so the controllers
            cannot be enabled there.
    """
    control = parent / "cgroup.subtree_control"
    enabled = set(control.read_text().split())
    wanted = [c for c in _V2_CONTROLLERS if c not in enabled]
    if not wanted:
        return
    line = " ".join(f"+{c}" for c in wanted)
    try:
        _write(control, line)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    # The parent holds processes (the agent): move the agent into a leaf, then try again.
    leaf = parent / "dgpt-agent"
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", str(os.getpid()))
    try:
        _write(control, line)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        others = (parent / "cgroup.procs").read_text().split()
        raise ProtectionUnavailable(
            f"cannot enable {', '.join(wanted)} in {parent}: other processes share the agent's cgroup "
            f"({', '.join(others[:5])})",
            hint="start the agent in a cgroup of its own, e.g. `systemd-run --scope -p Delegate=yes dgpt donor join ...`",
        ) from None


def _write(path: Path, value: str) -> None:
    # One write() per value: cgroup files take a value per write call, not a stream.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        exc.filename = str(path)
        raise
    finally:
        os.close(fd)

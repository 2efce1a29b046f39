"""The donor's owner protected from the work: the raylet and every worker in a bubblewrap sandbox.

Everything Ray runs on a donor descends from one `ray start`; wrapping that one command in
`bwrap` confines all of it. Inside the sandbox:

- the whole filesystem is **read-only** (the work runs the donor's Python, venv and Ray);
- the owner's **homes are hidden** (``/home``, ``/root``, the agent user's home), and with
  them the agent's state folder, except what the work needs re-exposed read-only: the
  interpreter, the venv and ``sys.path`` entries that live there, and the Ray auth token;
- ``/tmp``, ``/var/tmp``, ``/run/user`` (session sockets: ssh-agent, D-Bus, X11 and
  Wayland live there), ``/mnt`` and ``/media`` are hidden too; the work's ``/tmp`` and its
  ``HOME`` are folders of the **scratch** folder, the only writable place besides the
  donor's own Ray temp folder;
- its own **PID namespace** with a fresh ``/proc``: the work cannot see, signal or trace
  the owner's processes, nor reach the real filesystem through ``/proc/<pid>/root``;
- **no capabilities**, and when the agent runs as root the work runs as an unprivileged
  user (``nobody`` by default): root's own files outside the homes (``/etc/shadow``, SSH
  host keys) stay unreadable, read-only binds cannot be remounted;
- its own ``/dev`` (plus GPU device nodes when the donor offers GPUs) and IPC namespace.

The network is shared (the raylet talks to the cluster), so is the kernel.

PID 1 of the sandbox is a tiny init (:data:`INIT`, stdlib only): it starts the command as
the work's user, forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 to it, reaps
orphans and exits with the command's status. It takes SIGTERM when bwrap goes away (parent
death signal), so stopping bwrap, or the agent dying, drains `ray start` exactly as a
SIGTERM to an unsandboxed one does; when the command exits the kernel kills whatever else is
left in the namespace, so no stray process of the work outlives its sandbox.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dgpt.exceptions import ProtectionUnavailable

#: The sandbox's init, run as ``python -I -S -c INIT UID GID -- COMMAND...`` (UID -1: keep).
#: It stays the agent's user: the parent-death signal from bwrap is only delivered to a
#: process of bwrap's own user, and forwarding a signal to the work's user needs CAP_KILL.
#: Only the forked command drops to the work's user (which also drops every capability).
#: Handlers come first, because PID 1 ignores any signal it has no handler for.
INIT = r"""
import ctypes, os, signal, sys
uid, gid, cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4:]
child, pending = 0, []
def forward(sig, _frame):
    if child:
        os.kill(child, sig)
    else:
        pending.append(sig)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, forward)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
child = os.fork()
if child == 0:
    try:
        if uid >= 0:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"sandbox: cannot run {cmd[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
for s in pending:
    os.kill(child, s)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(127)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        sys.exit(128 - code if code < 0 else code)
"""

#: Hidden by default: where owners keep their files and session sockets.
DEFAULT_HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"),
                  Path("/mnt"), Path("/media"))
_TMP = Path("/tmp")
#: The user the work runs as when the agent is root.
DEFAULT_USER = "nobody"
#: GPU device nodes bound into the sandbox of a donor that offers GPUs (NVIDIA and DRM).
_GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/dri")


@dataclass(frozen=True)
class SandboxSpec:
    """What a donor's sandbox shows the work.

    Attributes:
        scratch: the work's writable folder; its ``home`` and ``tmp`` become HOME and /tmp.
        writable: more folders bound read-write at the same path (the donor's Ray temp folder).
        readable: paths under hidden folders bound back read-only (interpreter, venv).
        files: single files bound read-only at the same path (the Ray auth token).
        hidden: folders replaced by an empty tmpfs.
        views: (source, target) pairs bound read-only over targets (the cgroup's own
            directories over the hierarchies' mount points).
        devices: device nodes bound in (GPUs).
        uid, gid: the user the work runs as; None keeps the agent's.
    """

    scratch: Path
    writable: tuple[Path, ...] = ()
    readable: tuple[Path, ...] = ()
    files: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = DEFAULT_HIDDEN
    views: tuple[tuple[Path, Path], ...] = ()
    devices: tuple[Path, ...] = ()
    uid: int | None = None
    gid: int | None = None
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def home(self) -> Path:
        return self.scratch / "home"

    @property
    def tmp(self) -> Path:
        return self.scratch / "tmp"


@dataclass(frozen=True)
class MountOp:
    """One step of the sandbox's filesystem, as bwrap applies it."""

    kind: str  # "tmpfs", "dir", "bind", "ro-bind" or "dev-bind"
    dest: Path
    source: Path | None = None


# At one path, later kinds cover earlier ones: hide, then show read-only, then writable.
_RANK = {"tmpfs": 0, "dir": 0, "ro-bind": 1, "bind": 2, "dev-bind": 2}


def mount_plan(spec: SandboxSpec) -> list[MountOp]:
    """The mounts over the read-only root, in the order bwrap must apply them.

    Shallower paths go first, so a deeper mount always lands on top: a folder bound back
    inside a hidden one is seen, a hidden folder inside one bound back stays hidden. The
    private /tmp is a bind of ``scratch/tmp``. Mounts that change nothing (a tmpfs inside a
    tmpfs, a read-only bind inside the read-only root) are left out. Folders that lead to a
    mount through a tmpfs or a writable bind are made 0755 first: bwrap would make them 0700,
    and the work (another user) could not reach what is bound below them.
    """
    ops = [MountOp("tmpfs", p) for p in spec.hidden if p != _TMP]
    ops.append(MountOp("bind", _TMP, spec.tmp))
    ops += [MountOp("ro-bind", p, p) for p in spec.readable]
    ops += [MountOp("bind", p, p) for p in (spec.scratch, *spec.writable)]
    ops += [MountOp("ro-bind", p, p) for p in spec.files]
    ops += [MountOp("ro-bind", target, source) for source, target in spec.views]
    ops += [MountOp("dev-bind", p, p) for p in spec.devices]
    ops.sort(key=lambda op: (len(op.dest.parts), _RANK[op.kind], str(op.dest)))
    root = MountOp("ro-bind", Path("/"), Path("/"))
    kept: list[MountOp] = []
    for op in ops:
        cover = max((k for k in [root, *kept] if k.kind != "dir" and (k.dest == op.dest or k.dest in op.dest.parents)),
                    key=lambda k: len(k.dest.parts))
        if op.kind == "tmpfs" and cover.kind == "tmpfs":
            continue
        if op.kind == "ro-bind" and op.source == op.dest and cover.kind == "ro-bind" and cover.source == cover.dest:
            continue
        if cover.kind in ("tmpfs", "bind"):
            between = [a for a in reversed(op.dest.parents) if len(a.parts) > len(cover.dest.parts)]
            kept += [MountOp("dir", a) for a in between if MountOp("dir", a) not in kept]
        kept.append(op)
    return kept


def bwrap_argv(spec: SandboxSpec, command: Sequence[str], bwrap: str = "bwrap",
               python: str = sys.executable) -> list[str]:
    """The command line that runs ``command`` inside the sandbox ``spec`` describes."""
    if not command:
        raise ValueError("command must not be empty")
    # A /dev/shm of its own, writable by the work: Ray's object store lives there.
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm",
            "--proc", "/proc"]
    for op in mount_plan(spec):
        if op.kind == "tmpfs":
            argv += ["--perms", "0755", "--tmpfs", str(op.dest)]
        elif op.kind == "dir":
            argv += ["--perms", "0755", "--dir", str(op.dest)]
        else:
            argv += [f"--{op.kind}", str(op.source), str(op.dest)]
    argv += ["--unshare-pid", "--unshare-ipc", "--as-pid-1", "--cap-drop", "ALL"]
    if spec.uid is not None:
        # The init's: to drop the command to the work's user, and to forward signals to it.
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    for key, value in (("HOME", str(spec.home)), ("TMPDIR", "/tmp"), *spec.env):
        argv += ["--setenv", key, value]
    argv += ["--chdir", str(spec.scratch), "--", python, "-I", "-S", "-c", INIT,
             str(-1 if spec.uid is None else spec.uid), str(-1 if spec.gid is None else spec.gid), "--", *command]
    return argv


def python_paths(executable: str = sys.executable, path: Iterable[str] = sys.path) -> list[Path]:
    """What the work's Python needs to read: the interpreter (resolved through symlinks), its
    prefixes and every existing ``sys.path`` entry (``PYTHONPATH`` included)."""
    out = [Path(executable).parent, Path(os.path.realpath(executable)).parent, Path(sys.prefix),
           Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix)]
    out += [Path(p) for p in path if p and os.path.exists(p)]
    # dgpt itself (an editable install is found through a finder, not a sys.path entry).
    out.append(Path(__file__).resolve().parents[2])
    return [p.resolve() if p.is_symlink() else p for p in out]


def readable_under(hidden: Iterable[Path], paths: Iterable[Path]) -> tuple[Path, ...]:
    """The paths that lie in a hidden folder (and so must be bound back to be seen)."""
    hidden = list(hidden)
    return tuple(sorted({p for p in paths if any(h == p or h in p.parents for h in hidden)}))


def gpu_devices(root: Path = Path("/")) -> tuple[Path, ...]:
    """The GPU device nodes present on this machine."""
    found: list[Path] = []
    for pattern in _GPU_DEVICE_GLOBS:
        found += sorted(root.glob(pattern.lstrip("/")))
    return tuple(found)


def work_user(name: str | None = None) -> tuple[int, int] | None:
    """(uid, gid) the work runs as: ``name``, or ``nobody`` when the agent is root; None when
    the agent is not root (the work keeps its user: the owner's files stay hidden by the
    mount namespace, root's stay unreadable).

    Raises:
        ProtectionUnavailable: the user does not exist, or dropping to it needs root.
    """
    if os.geteuid() != 0:
        if name is not None:
            raise ProtectionUnavailable(f"sandbox_user={name!r} needs the agent to run as root",
                                        hint="unset sandbox_user, or run the agent as root")
        return None
    name = name or DEFAULT_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ProtectionUnavailable(f"sandbox_user {name!r} does not exist on this machine",
                                    hint=f"create it (`useradd --system --no-create-home {name}`) or pick another "
                                         "unprivileged user") from None
    if entry.pw_uid == 0:
        raise ProtectionUnavailable(f"sandbox_user {name!r} is root: the work would read root's files",
                                    hint="pick an unprivileged user (default: nobody)")
    return entry.pw_uid, entry.pw_gid


def find_bwrap() -> str:
    """The path of ``bwrap``.

    Raises:
        ProtectionUnavailable: bubblewrap is not installed.
    """
    found = shutil.which("bwrap")
    if not found:
        raise ProtectionUnavailable("bubblewrap (bwrap) is not installed",
                                    hint="install it: `apt-get install bubblewrap` (Debian/Ubuntu), "
                                         "`dnf install bubblewrap` (Fedora)")
    return found


def check(spec: SandboxSpec, bwrap: str, timeout_s: float = 20.0) -> None:
    """Run ``true`` in the sandbox once: the kernel may refuse namespaces (containers without
    CAP_SYS_ADMIN, distributions that restrict unprivileged user namespaces).

    Raises:
        ProtectionUnavailable: the sandbox does not start here; the message quotes bwrap.
    """
    try:
        done = subprocess.run(bwrap_argv(spec, ["true"], bwrap), capture_output=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProtectionUnavailable(f"bubblewrap did not start: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ProtectionUnavailable(
            f"bubblewrap cannot build the sandbox here: {detail[-1] if detail else f'exit {done.returncode}'}",
            hint="allow namespaces for bwrap (run the agent as root, or enable unprivileged user namespaces: "
                 "`sysctl kernel.unprivileged_userns_clone=1`; on Ubuntu 24.04 an AppArmor profile for bwrap)")


def prepare(spec: SandboxSpec) -> None:
    """Create the scratch folders and hand them (and the writable folders, and the shared
    files) to the work's user, so the work can use them and nothing else."""
    for path in (spec.scratch, spec.home, spec.tmp, *spec.writable):
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(spec.tmp, 0o1777)
    if spec.uid is None:
        return
    gid = spec.gid if spec.gid is not None else -1
    for top in (spec.scratch, *spec.writable):
        for dirpath, _dirs, files in os.walk(top):
            os.chown(dirpath, spec.uid, gid, follow_symlinks=False)
            for name in files:
                os.chown(os.path.join(dirpath, name), spec.uid, gid, follow_symlinks=False)
    for path in spec.files:
        os.chown(path, spec.uid, gid)

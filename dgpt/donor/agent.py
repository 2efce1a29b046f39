"""The donor agent: registers, heartbeats, and starts/drains/stops this device's raylet.

Lifecycle (DESIGN.md): registered -> standby -> activating -> active -> draining -> standby.
The head answers each heartbeat with an action; the agent also drains by itself when its
idle detectors say the owner is back, on `dgpt donor leave`/`pause`, and on SIGTERM/Ctrl-C.
A pause on the head (the donor page) reaches it as a drain with reason ``paused``; until it
is resumed there, the head answers its heartbeats with standby.
Draining goes through the head (which calls Ray's DrainNode with a deadline); once the raylet
has exited (it does so when drained and idle) or the deadline passed, the agent stops it.

While it waits in standby, the agent long-polls: its heartbeat is held by the head until
the autoscaler activates it, so an activation reaches it at once.

A donor that can run the WireGuard overlay (``overlay``: ``dgpt.overlay.endpoint``) offers
its public key when it registers and brings its tunnel up with the head's grant; if the head
reaches it only through the overlay, the join arguments say so (``RayJoin.node_ip``).

State kept in ``state_dir``: ``donor.json`` (donor id and secret: the id survives restarts),
``agent.pid``, ``paused`` (the user switch), ``ray_auth_token`` and the raylet's log. A
donor may run its raylet with a Ray temp folder of its own (``ray_temp_dir``): several
simulated donors on one machine then never share sockets or unpacked runtime envs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgpt.contract import AgentState, HeartbeatAction, LeaveReason
from dgpt.donor.idle import Detector, HoursDetector, LoadDetector, SwitchDetector
from dgpt.donor.ports import PortProbe, gcs_problem
from dgpt.donor.protection import Protection, ProtectionConfig
from dgpt.donor.storage import DonorStorage
from dgpt.exceptions import ApiError, AuthError, Conflict, DonorError, HeadUnreachable, OverlayError
from dgpt.netaddr import local_ip_towards
from dgpt.overlay.endpoint import DonorEndpoint
from dgpt.processes import (
    become_subreaper,
    die_with_parent,
    read_json,
    reap_orphans,
    stop_tree,
    tree,
    write_json,
    write_secret,
)
from dgpt.ray_node import NodePorts, NodeSpec, donor_argv
from dgpt.sdk.client import DonorClient
from dgpt.sdk.models import (
    DeviceProfile,
    DonorCaps,
    Heartbeat,
    HeartbeatResponse,
    LeaveRequest,
    OverlayOffer,
    RayJoin,
    RegisterRequest,
    RegisterResponse,
)
from dgpt.tls import HeadTrust

log = logging.getLogger("dgpt.donor")

# How often the agent looks at its detectors and its raylet between heartbeats: owners
# expect their machine back within a second of touching it.
POLL_S = 0.25
# `dgpt down` stops the whole fabric: there is nowhere for work to move, so donors drain briefly.
SHUTDOWN_SIGNAL = signal.SIGUSR1
SHUTDOWN_DRAIN_S = 5.0
# A drained node that ran nothing for this many polls (1 s) stops before its deadline.
IDLE_POLLS_TO_STOP = 4
# Titles of Ray's per-node service processes and idle workers: not the donor's work.
_RAY_SERVICE_TITLES = frozenset({"ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent"})
# A held heartbeat gets this much longer than the hold before the agent gives up on it.
_HOLD_SLACK_S = 15.0
# Backoff while the head is away: from 1 s, doubling, at most this.
_MAX_BACKOFF_S = 30.0
# A `ray start` with Ray already imported, waiting for its arguments (one JSON line): the
# agent keeps one ready while standby (AgentConfig.warm_start), so joining skips the import.
_WARM_RAY_START = (
    "import json, sys\n"
    "from ray.scripts.scripts import main\n"
    "line = sys.stdin.readline()\n"
    "if not line:\n"
    "    sys.exit(0)\n"
    "sys.argv = ['ray', *json.loads(line)]\n"
    "main()\n"
)
# Heartbeat answers too ordinary for the donor's log.
_ROUTINE_REASONS = frozenset({"standby", "running", "activated", "draining", ""})


@dataclass
class AgentConfig:
    head_url: str
    join_token: str
    name: str
    device_class: str
    owner: str
    state_dir: Path
    caps: DonorCaps
    profile: DeviceProfile
    ports: NodePorts
    labels: dict[str, str] = field(default_factory=dict)
    node_ip: str | None = None
    # The head's certificate pin (from the join token or DGPT_HEAD_FINGERPRINT; dgpt.tls).
    head_pin: str | None = None
    load_threshold: float | None = None
    # How long the owner's load stays low before the donor donates again (LoadDetector.calm_s).
    load_calm_s: float = 60.0
    allowed_hours: str | None = None
    drain_deadline_s: float = 30.0
    ray_temp_dir: Path | None = None
    # Keep a `ray start` with Ray imported while standby (~200 MB) so joining takes ~2 s less.
    warm_start: bool = True
    overlay: DonorEndpoint | None = None
    # Caps enforced by a cgroup and the work sandboxed (dgpt/donor/protection.py).
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)
    # Port of its piece server when it offers disk (dgpt/donor/storage.py); None: no server.
    storage_port: int | None = None


def state_files(state_dir: Path) -> dict[str, Path]:
    return {
        "identity": state_dir / "donor.json",
        "pid": state_dir / "agent.pid",
        "paused": state_dir / "paused",
        "status": state_dir / "status.json",
        "ray_token": state_dir / "ray_auth_token",
        "ray_log": state_dir / "raylet.log",
        # The head's certificate, kept once it matched the pin: the only one trusted after.
        "head_cert": state_dir / "head_cert.pem",
    }


class DonorAgent:
    """One donor device's agent. ``run()`` blocks until stopped."""

    def __init__(self, cfg: AgentConfig, client: DonorClient | None = None) -> None:
        self.cfg = cfg
        self.files = state_files(cfg.state_dir)
        self.trust = HeadTrust(cfg.head_url, cfg.head_pin, cache=self.files["head_cert"])
        self.client = client or DonorClient(cfg.head_url, trust=self.trust)
        self.storage = DonorStorage(cfg.caps, cfg.state_dir, cfg.storage_port, cfg.node_ip or "0.0.0.0")
        self.detectors: list[Detector] = [SwitchDetector(self.files["paused"])]
        if cfg.allowed_hours:
            self.detectors.append(HoursDetector(cfg.allowed_hours))
        if cfg.load_threshold is not None:
            self.detectors.append(LoadDetector(cfg.load_threshold, calm_s=cfg.load_calm_s))
        self.donor_id: str | None = None
        self.secret: str | None = None
        self.heartbeat_interval_s = 5.0
        self.wait_s = 0.0  # how long the head may hold a standby heartbeat (it says so)
        self.state = AgentState.STANDBY
        self._ray: subprocess.Popen[bytes] | None = None
        self._ray_started = threading.Event()
        self._ray_started_at = 0.0
        self._pending_join: RayJoin | None = None
        self._crashes = 0  # raylets that died soon after starting, in a row
        self._raylet_missing = 0
        self._next_raylet_check = 0.0
        self._retry_after = 0.0
        self._stop = threading.Event()
        self._stop_reason = LeaveReason.SIGTERM
        self._stop_deadline_s: float | None = None
        self._owner_reason: str | None = None
        self._head_ok = True
        self._backoff_s = 1.0
        self._probe = PortProbe(cfg.ports.reachable_ports, cfg.node_ip or "0.0.0.0")
        # What keeps this donor out of Ray, with the fix (told to the head in each heartbeat).
        self._problem: str | None = None
        self._problem_gcs: str | None = None
        self._problem_checked = 0.0
        self._last_reason = ""
        self._warm: subprocess.Popen[bytes] | None = None
        self._protection = Protection(None, None, None)  # set up by run()
        self._warmed_at = -math.inf
        self._held: threading.Thread | None = None
        # Answers of held heartbeats; None when one failed (the head is away).
        self._held_replies: queue.Queue[HeartbeatResponse | None] = queue.Queue()

    # ------------------------------------------------------------ identity

    def advertised_ip(self) -> str | None:
        """The address the head reaches this donor at: --node-ip, else this machine's on its route to the head."""
        if self.cfg.node_ip:
            return self.cfg.node_ip
        from urllib.parse import urlparse

        return local_ip_towards(urlparse(self.cfg.head_url).hostname or "127.0.0.1")

    def _load_identity(self) -> None:
        data = read_json(self.files["identity"]) or {}
        self.donor_id, self.secret = data.get("donor_id"), data.get("donor_secret")

    def register(self) -> None:
        """Register (or re-register keeping the stored donor id); retries while the head is away.

        Raises:
            DonorError: the head refused the join token, or knows this donor id with
                another secret: retrying cannot help.
        """
        self._load_identity()
        req = RegisterRequest(
            name=self.cfg.name, device_class=self.cfg.device_class, owner=self.cfg.owner,
            profile=self.cfg.profile, caps=self.cfg.caps, labels=self.cfg.labels,
            donor_id=self.donor_id, donor_secret=self.secret,
            node_ip=self.advertised_ip(), ray_ports=list(self.cfg.ports.reachable_ports),
            overlay=self._overlay_offer(), storage_url=self.storage.url_for(self.advertised_ip()),
        )
        backoff = 1.0
        while not self._stop.is_set():
            try:
                resp = self.client.register(req, self.cfg.join_token)
                break
            except Conflict as exc:
                raise DonorError(f"the head refused this donor: {exc.message}",
                                 hint=f"remove {self.files['identity']} and join again as a new donor") from None
            except AuthError as exc:
                raise DonorError(f"the head refused the join token: {exc.message}",
                                 hint="ask the operator for a valid join token (`dgpt token create` on the head)") from None
            except (HeadUnreachable, ApiError) as exc:
                log.warning("%s; retrying in %.0fs", _head_problem(exc, self.cfg.head_url), backoff)
                # Jittered backoff: a fleet of donors must not return to a restarted head in lockstep.
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        else:
            return
        self.donor_id, self.secret = resp.donor_id, resp.donor_secret
        self.heartbeat_interval_s = resp.heartbeat_interval_s
        self._overlay_up(resp)
        self.storage.start(resp.donor_id, resp.storage_key, self.advertised_ip())
        write_json(self.files["identity"], {"donor_id": self.donor_id, "donor_secret": self.secret,
                                            "name": self.cfg.name, "head_url": self.cfg.head_url})
        os.chmod(self.files["identity"], 0o600)
        log.info("%s as donor %s", "rejoined" if resp.reused else "registered", self.donor_id)

    # ------------------------------------------------------------ overlay

    def _overlay_offer(self) -> OverlayOffer | None:
        if self.cfg.overlay is None:
            return None
        try:
            return self.cfg.overlay.offer()
        except OverlayError as exc:
            log.error("cannot join through the overlay: %s", exc.message)
            return None

    def _overlay_up(self, resp: RegisterResponse) -> None:
        """Bring the tunnel up with the head's grant (or down, when the head gave none)."""
        endpoint = self.cfg.overlay
        if endpoint is None:
            return
        if resp.overlay is None:
            endpoint.down()
            return
        try:
            endpoint.up(resp.overlay)
        except OverlayError as exc:
            # Still fine if the head reaches this donor directly; its preflight says if not.
            log.error("the overlay tunnel did not come up: %s%s", exc.message, f" ({exc.hint})" if exc.hint else "")

    # ------------------------------------------------------------ raylet

    def _raylet_pid(self) -> int | None:
        if self._ray is None:
            return None
        for proc in tree(self._ray.pid)[1:]:
            try:
                if proc.name() == "raylet":
                    return proc.pid
            except Exception:
                continue
        return None

    def _raylet_gone(self) -> bool:
        """True once an active donor's raylet has been missing for a second (checked each second)."""
        now = time.monotonic()
        if self.state is not AgentState.ACTIVE or now < self._next_raylet_check:
            return False
        self._next_raylet_check = now + 1.0
        self._raylet_missing = 0 if self._raylet_pid() is not None else self._raylet_missing + 1
        return self._raylet_missing >= 2

    def _node_busy(self) -> bool:
        """Whether a task or actor still runs on this donor's raylet (Ray titles worker processes)."""
        if self._ray is None:
            return False
        for proc in tree(self._ray.pid):
            try:
                title = (proc.cmdline() or [""])[0]
            except Exception:
                continue
            if title.startswith("ray::") and title not in _RAY_SERVICE_TITLES:
                return True
        return False

    def ray_running(self) -> bool:
        return self._ray is not None and self._ray.poll() is None

    def _maybe_start_ray(self) -> None:
        """Start the raylet the head asked for, once the crash backoff allows."""
        join = self._pending_join
        if join is None or self.ray_running() or self._owner_reason is not None:
            self._pending_join = None if self.ray_running() or self._owner_reason else join
            return
        if time.monotonic() < self._retry_after:
            return
        self._pending_join = None
        problem = gcs_problem(join.gcs_address)
        if problem is not None:
            self._set_problem(problem, join.gcs_address)
            return
        self._set_problem(None)
        self._probe.stop()  # the raylet takes these ports now
        self.start_ray(join)

    def _listen_for_preflight(self) -> None:
        """Answer on the Ray ports whenever no raylet holds them."""
        if self._ray is None and not self._probe.listening:
            problem = self._probe.start()
            if problem is not None and problem != self._problem:
                self._set_problem(problem)

    def _set_problem(self, problem: str | None, gcs_address: str | None = None) -> None:
        if problem != self._problem:
            (log.error if problem else log.info)(problem or "the head's Ray GCS is reachable again")
        self._problem = problem
        self._problem_gcs = gcs_address if problem else None
        self._problem_checked = time.monotonic()

    def _recheck_problem(self) -> None:
        """Every minute, see whether what kept this donor out of Ray is fixed."""
        if self._problem_gcs is None or time.monotonic() - self._problem_checked < 60:
            return
        self._set_problem(gcs_problem(self._problem_gcs), self._problem_gcs)

    def _raylet_exited(self, code: int | None) -> None:
        """A raylet that dies soon after starting is retried with a growing, capped backoff."""
        ran_s = time.monotonic() - self._ray_started_at
        if self.state is AgentState.DRAINING:
            return
        if code == 0:
            self._crashes = 0
            log.info("raylet stopped cleanly after %.0fs", ran_s)
        elif ran_s < 60:
            self._crashes += 1
            wait_s = min(60.0, 2.0**self._crashes)
            self._retry_after = time.monotonic() + wait_s
            tail = _tail(self.files["ray_log"], 5)
            log.error("raylet exited after %.0fs (code %s); retrying in %.0fs. Last lines of %s:\n%s",
                      ran_s, code, wait_s, self.files["ray_log"], tail)
        else:
            self._crashes = 0
            log.warning("raylet exited by itself (code %s)", code)

    def ray_argv(self, join: RayJoin) -> list[str]:
        """The `ray start --block` command line that joins this donor to the cluster."""
        # A relayed donor advertises its overlay address: the one the head and donors reach.
        spec = NodeSpec(ports=self.cfg.ports, labels=join.labels, num_cpus=join.num_cpus, num_gpus=join.num_gpus,
                        node_ip=join.node_ip or self.cfg.node_ip, temp_dir=self.cfg.ray_temp_dir, memory_bytes=join.memory_bytes,
                        object_store_bytes=object_store_bytes(join.memory_bytes), resources=join.resources)
        return donor_argv(spec, join.gcs_address)

    def _ray_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.files["ray_token"]),
            "RAY_USAGE_STATS_ENABLED": "0",
            # If the agent dies, `ray start` drains its node itself on the SIGTERM it gets.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": f"{self.cfg.drain_deadline_s:g}",
        })
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _spawn_ray(self, argv: list[str] | None) -> subprocess.Popen[bytes]:
        """`ray start` with ``argv``; with None, one that has imported Ray and waits for them."""
        command = [sys.executable, "-c", _WARM_RAY_START] if argv is None else argv
        # In the sandbox, and in the cgroup from before exec: every Ray process descends from this one.
        return subprocess.Popen(self._protection.wrap(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if argv is None else subprocess.DEVNULL, env=self._ray_env(),
                                preexec_fn=self._protection.preexec(die_with_parent), start_new_session=True)

    def _keep_warm(self) -> None:
        """While standby, keep a `ray start` ready with Ray imported: joining skips the ~2 s import."""
        if not self.cfg.warm_start or self._ray is not None or self._owner_reason is not None:
            return
        if (self._warm is None or self._warm.poll() is not None) and time.monotonic() - self._warmed_at > 30:
            self._warmed_at = time.monotonic()  # one that keeps dying is retried at most twice a minute
            self._warm = self._spawn_ray(None)

    def _drop_warm(self) -> None:
        if self._warm is not None:
            if self._warm.poll() is None:
                stop_tree(self._warm.pid, grace_s=2)
            self._warm = None

    def start_ray(self, join: RayJoin) -> None:
        write_secret(self.files["ray_token"], join.auth_token)
        argv = self.ray_argv(join)
        if self.cfg.ray_temp_dir is not None:
            self.cfg.ray_temp_dir.mkdir(parents=True, exist_ok=True)
        self._ray_started.clear()
        self._ray_started_at = time.monotonic()
        self._raylet_missing = 0
        warm, self._warm = self._warm, None
        if warm is not None and warm.poll() is None and warm.stdin is not None:
            warm.stdin.write((json.dumps(argv[1:]) + "\n").encode())
            warm.stdin.close()
            self._ray = warm
        else:
            self._ray = self._spawn_ray(argv)
        threading.Thread(target=self._pump_ray_output, args=(self._ray,), daemon=True).start()
        self.state = AgentState.STARTING
        log.info("starting raylet: %g CPU, %d GPU, %.1f GiB%s", join.num_cpus, join.num_gpus,
                 join.memory_bytes / 2**30, " (warm)" if self._ray is warm else "")

    def _pump_ray_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.files["ray_log"], "ab") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if b"Ray runtime started" in line:
                    self._ray_started.set()

    def stop_ray(self, grace_s: float = 30.0) -> None:
        if self._ray is not None:
            if self._ray.poll() is None:
                stop_tree(self._ray.pid, grace_s=grace_s)
            self._ray = None
        self.state = AgentState.STANDBY

    def drain(self, reason: LeaveReason, deadline_s: float | None = None) -> None:
        """Leave the cluster gracefully: DrainNode through the head, wait, stop the raylet."""
        if not self.ray_running():
            self.stop_ray()
            return
        self.state = AgentState.DRAINING
        deadline_s = deadline_s or self.cfg.drain_deadline_s
        log.info("draining (%s), deadline %.0fs", reason.value, deadline_s)
        try:
            assert self.donor_id and self.secret
            resp = self.client.leave(self.donor_id, self.secret, LeaveRequest(reason=reason, deadline_s=deadline_s))
            deadline_s = resp.deadline_s
            log.info("head: %s", resp.message)
        except (HeadUnreachable, ApiError) as exc:
            # `ray start` drains its own node (DrainNode) when it gets SIGTERM below.
            log.warning("could not ask the head to drain (%s); Ray drains the node on stop", exc)
        deadline = time.monotonic() + deadline_s
        # Work gets until the deadline to finish or move (Serve starts replacements first);
        # once the node has run nothing for IDLE_POLLS_TO_STOP polls it stops early.
        idle_polls = 0
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while time.monotonic() < deadline and self._raylet_pid() is not None and self.ray_running():
            idle_polls = 0 if self._node_busy() else idle_polls + 1
            if idle_polls >= IDLE_POLLS_TO_STOP:
                log.info("node idle: stopping the raylet before the deadline")
                break
            if time.monotonic() >= next_beat:
                # A long drain must not look like a vanished donor: keep heartbeating.
                self._heartbeat_now()
                next_beat = time.monotonic() + self.heartbeat_interval_s
            time.sleep(POLL_S)
        self.stop_ray(grace_s=min(30.0, deadline_s + 5))
        self._heartbeat_now()

    # ------------------------------------------------------------ heartbeat

    def _beat(self) -> Heartbeat:
        return Heartbeat(state=self.state, owner_active=self._owner_reason is not None, owner_reason=self._owner_reason,
                         problem=self._problem)

    def _heartbeat_now(self) -> HeartbeatResponse | None:
        """One heartbeat, answered at once; None while the head is away (the agent goes on)."""
        if not self.donor_id or not self.secret:
            return None
        try:
            resp = self.client.heartbeat(self.donor_id, self.secret, self._beat())
        except AuthError:
            # Unknown donor and wrong secret answer alike: the head lost this donor (a new
            # database) or never knew it. Register again under the same id and secret.
            log.warning("the head does not accept donor %s; registering again", self.donor_id)
            self.register()
            return None
        except (HeadUnreachable, ApiError) as exc:
            # The head is away or restarting: keep the raylet as it is and try again.
            if self._head_ok:
                log.warning("%s; keeping the current state and retrying", _head_problem(exc, self.cfg.head_url))
            self._head_ok = False
            self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)
            return None
        return self._answered(resp)

    def _answered(self, resp: HeartbeatResponse) -> HeartbeatResponse:
        if not self._head_ok:
            log.info("head reachable again")
        self._head_ok = True
        self._backoff_s = 1.0
        if resp.reason != self._last_reason and resp.reason not in _ROUTINE_REASONS:
            # What keeps this donor out (the head cannot reach it, say) belongs in its log.
            (log.warning if resp.reason.startswith("not activated") else log.info)("head: %s", resp.reason)
        self._last_reason = resp.reason
        self.heartbeat_interval_s = resp.heartbeat_interval_s
        self.wait_s = resp.wait_s
        self._write_status()
        return resp

    def _should_hold(self) -> bool:
        return self.state is AgentState.STANDBY and self._owner_reason is None and self.wait_s > 0

    def _start_held_heartbeat(self) -> None:
        """Send a heartbeat the head may hold (long-poll), from a thread: the main loop must
        keep watching the owner and the raylet meanwhile."""
        if self._held is not None and self._held.is_alive():
            return
        assert self.donor_id and self.secret
        donor_id, secret, wait_s, hb = self.donor_id, self.secret, self.wait_s, self._beat()
        hb = hb.model_copy(update={"wait_s": wait_s})

        def poll() -> None:
            client = DonorClient(self.cfg.head_url, timeout_s=wait_s + _HOLD_SLACK_S, trust=self.trust)
            try:
                self._held_replies.put(client.heartbeat(donor_id, secret, hb))
            except Exception as exc:  # the main loop's next plain heartbeat handles the head
                log.debug("held heartbeat failed: %s", exc)
                self.wait_s = 0.0
                self._held_replies.put(None)
            finally:
                client.close()

        self._held = threading.Thread(target=poll, name="held-heartbeat", daemon=True)
        self._held.start()

    def _act(self, resp: HeartbeatResponse) -> None:
        if resp.action is HeartbeatAction.ACTIVATE and resp.ray and not self.ray_running() and self._owner_reason is None:
            self._pending_join = resp.ray
            self._maybe_start_ray()
        elif resp.action is HeartbeatAction.DRAIN and self.ray_running():
            # Paused on the head (the donor page, an operator): the drain says so; else a scale-down.
            reason = LeaveReason.PAUSED if resp.reason == LeaveReason.PAUSED.value else LeaveReason.AUTOSCALER
            self.drain(reason, resp.drain_deadline_s)

    def _write_status(self) -> None:
        write_json(self.files["status"], {"donor_id": self.donor_id, "state": self.state.value, "pid": os.getpid(),
                                          "owner_active": self._owner_reason, "at": time.time()})

    # ------------------------------------------------------------ main loop

    def request_stop(self, reason: LeaveReason = LeaveReason.SIGTERM, deadline_s: float | None = None) -> None:
        """Drain and exit; ``deadline_s`` shortens the drain (the whole fabric is stopping)."""
        self._stop_reason = reason
        self._stop_deadline_s = deadline_s
        self._stop.set()

    def run(self) -> int:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        become_subreaper()
        self._protection = Protection.setup(self.cfg.protection, name=self.cfg.name, state_dir=self.cfg.state_dir,
                                            caps=self.cfg.caps, token_file=self.files["ray_token"],
                                            ray_temp_dir=self.cfg.ray_temp_dir)
        write_json(self.files["pid"], {"pid": os.getpid()})
        try:
            self._listen_for_preflight()  # before registering: the head checks at once
            self.register()
            next_beat = 0.0
            while not self._stop.is_set():
                self._listen_for_preflight()
                self._recheck_problem()
                self._keep_warm()
                owner = next((r for d in self.detectors if (r := d.owner_active())), None)
                if owner != self._owner_reason:
                    next_beat = 0.0  # tell the head at once
                    if owner:
                        self._drop_warm()  # the owner wants the machine: give back its memory too
                self._owner_reason = owner
                if self._owner_reason and self.ray_running() and self.state is not AgentState.DRAINING:
                    log.info("owner is back: %s", self._owner_reason)
                    self.drain(_leave_reason(self._owner_reason))
                    next_beat = 0.0
                if self._ray is not None and self._ray.poll() is None and self._raylet_gone():
                    # A raylet that Ray drained (IDLE_TERMINATION) exits cleanly, and
                    # `ray start --block` does not report clean exits: it lingers without one.
                    log.info("raylet exited (drained by Ray); stopping `ray start`")
                    stop_tree(self._ray.pid, grace_s=10)
                if self._ray is not None and self._ray.poll() is not None:
                    self._raylet_exited(self._ray.returncode)
                    self._ray = None
                    self.state = AgentState.STANDBY
                    next_beat = 0.0
                if self.state is AgentState.STARTING and self._ray_started.is_set():
                    self.state = AgentState.ACTIVE
                    next_beat = 0.0
                self._maybe_start_ray()
                while not self._held_replies.empty():
                    held = self._held_replies.get_nowait()
                    if held is not None:
                        self._act(self._answered(held))
                    next_beat = time.monotonic() + (self.heartbeat_interval_s if held is not None else 0.0)
                if time.monotonic() >= next_beat:
                    if self._should_hold():
                        self._start_held_heartbeat()
                        next_beat = time.monotonic() + self.wait_s + _HOLD_SLACK_S
                    else:
                        resp = self._heartbeat_now()
                        if resp is not None:
                            self._act(resp)
                        interval = self.heartbeat_interval_s if self._head_ok else self._backoff_s
                        # Jitter so a fleet of donors does not heartbeat in lockstep.
                        next_beat = time.monotonic() + interval * random.uniform(0.9, 1.1)
                reap_orphans(keep=[self._ray.pid] if self._ray is not None else [])
                self._stop.wait(POLL_S)
            self.drain(self._stop_reason, self._stop_deadline_s)
            if self._stop_reason is LeaveReason.LEAVE:  # for good: its pieces move first
                self.storage.leave(self.client, self.donor_id, self.secret)
            return 0
        finally:
            self._probe.stop()
            self._drop_warm()
            if self._ray is not None:
                self.stop_ray(grace_s=10)
            if self.cfg.overlay is not None:
                self.cfg.overlay.down()  # after the raylet: it drained over the tunnel
            self._protection.close()
            self.storage.stop()
            self.files["pid"].unlink(missing_ok=True)
            self.files["status"].unlink(missing_ok=True)


def _leave_reason(owner_reason: str) -> LeaveReason:
    if "paused" in owner_reason:
        return LeaveReason.PAUSED
    if "hours" in owner_reason:
        return LeaveReason.OUTSIDE_HOURS
    return LeaveReason.OWNER_ACTIVE


def _head_problem(exc: Exception, head_url: str) -> str:
    """What is wrong with reaching the head, with the fix."""
    if isinstance(exc, HeadUnreachable):
        return (f"cannot reach the head at {head_url}: {exc.message.split(': ', 1)[-1]} (check the URL, that the head "
                "runs - `dgpt head start` - and that the head's firewall lets this machine reach its API port)")
    if isinstance(exc, ApiError) and exc.status_code == 404:
        return (f"{head_url} answered 404: is this the head's control-plane API (DGPT_API_PORT, default 8080), "
                "not its Serve port?")
    if isinstance(exc, ApiError) and exc.status_code >= 500:
        return f"the head is starting or restarting ({exc.status_code})"
    return f"the head answered {exc}"


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Ray needs at least this much object store; below it `ray start` refuses to run.
_MIN_OBJECT_STORE_BYTES = 80 * 2**20


def object_store_bytes(memory_bytes: int) -> int:
    """Object store size inside the memory cap: 30% of it (Ray's own default share)."""
    return max(_MIN_OBJECT_STORE_BYTES, int(memory_bytes * 0.3))


def install_signal_handlers(agent: DonorAgent) -> None:
    def handler(signum: int, _frame: Any) -> None:
        if signum == SHUTDOWN_SIGNAL:
            agent.request_stop(LeaveReason.SHUTDOWN, SHUTDOWN_DRAIN_S)
        else:
            agent.request_stop(LeaveReason.SIGTERM if signum == signal.SIGTERM else LeaveReason.LEAVE)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(SHUTDOWN_SIGNAL, handler)


def find_state_dir(home: Path, donor_id: str | None) -> Path:
    """The state folder of this machine's donor, or of the local-fabric donor with that id.

    Raises:
        DonorError: no such donor on this machine.
    """
    candidates = [home / "donor", *sorted((home / "donors").glob("*"))]
    known = []
    for path in candidates:
        ident = read_json(path / "donor.json")
        if ident:
            known.append(ident.get("donor_id"))
            if donor_id is None or ident.get("donor_id") == donor_id or ident.get("name") == donor_id:
                if donor_id is None and path != home / "donor":
                    continue
                return path
    if donor_id is None:
        raise DonorError(f"no donor has joined from this machine (DGPT_HOME={home})",
                         hint="join with `dgpt donor join --head URL --token T`, or pass --donor-id")
    raise DonorError(f"no donor {donor_id!r} runs from DGPT_HOME={home}",
                     hint=f"known here: {', '.join(filter(None, known)) or 'none'}")

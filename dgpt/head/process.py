"""Starting and stopping the head: the Ray head node, Serve's proxy and the control plane.

`dgpt head start` spawns a supervisor (``python -m dgpt.head.process``) in its own session.
The supervisor brings up the overlay's WireGuard interface first when ``overlay_enabled``,
runs ``ray start --head --block`` as its child in the head's sandbox (``dgpt.head.isolation``;
Ray's processes die with that child), then the control-plane process (registry, REST API,
autoscaler; ``dgpt.head.control_plane``, started again whenever it exits), Serve's proxy and
the control plane's door actor, pinned to the head node; it writes ``head.json`` and then
waits. SIGTERM to the supervisor stops the whole head; `dgpt head stop` does that.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from dgpt import contract
from dgpt.config import Settings, load_settings
from dgpt.exceptions import FabricError
from dgpt.head.paths import head_paths, ray_temp_dir
from dgpt.processes import (
    alive,
    become_subreaper,
    die_with_parent,
    port_in_use,
    read_json,
    reap_orphans,
    spawn_detached,
    stop_tree,
    stop_trees,
    wait_until,
    write_json,
    write_secret,
)
from dgpt.ray_node import NodePorts, NodeSpec, head_argv
from dgpt.tls import ensure_certificate, head_fingerprint, head_trust

#: How long the head's Ray processes get to exit on stop before SIGKILL.
HEAD_STOP_GRACE_S = 5.0
# Settings a running head records in head.json so later commands find it with DGPT_HOME alone.
#: What a running head records in head.json for later commands of this DGPT_HOME: its ports,
#: its address, and how its API speaks (plain HTTP on loopback, or HTTPS and with which certificate).
RUNTIME_KEYS = ("ray_port", "dashboard_port", "http_port", "api_port", "metrics_port", "node_ip", "http_host", "tls",
                "tls_cert_file", "tls_key_file")


def ray_env(token_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that reaches this fabric's Ray with token auth on."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    # Job entrypoints say `python ...`: it must be the Python that has Ray and dgpt.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands these settings to a child process (never the API key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGPT_")}
    for key, value in settings.model_dump().items():
        if value is not None and key != "api_key":
            env[f"DGPT_{key.upper()}"] = str(value)
    return env


def head_addresses(settings: Settings) -> dict[str, str]:
    host = settings.node_ip or "127.0.0.1"
    return {
        "ray_address": f"{host}:{settings.ray_port}",
        "dashboard_url": f"http://{host}:{settings.dashboard_port}",
        "api_url": settings.api_url,
        "serve_url": settings.serve_url,
        # What donors and clients on other machines pin (join tokens carry it).
        **({"api_fingerprint": pin} if (pin := head_fingerprint(settings)) else {}),
    }


def shell_env(settings: Settings) -> dict[str, str]:
    """Exports with which plain Ray tools (`ray job submit`, `ray status`, `serve deploy`) reach the fabric."""
    paths = head_paths(settings.home)
    addr = head_addresses(settings)
    return {
        # `ray status` and drivers (ray.init) dial the GCS; `ray job submit` the Jobs API;
        # `serve deploy|status` the dashboard.
        "RAY_ADDRESS": addr["ray_address"],
        "RAY_API_SERVER_ADDRESS": addr["dashboard_url"],
        "RAY_DASHBOARD_ADDRESS": addr["dashboard_url"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(paths["ray_token"]),
        "DGPT_HOME": str(settings.home),
        "DGPT_HEAD_URL": settings.local_head_url,
        **({"DGPT_HEAD_FINGERPRINT": pin} if (pin := head_fingerprint(settings)) else {}),
    }


def prepare_state(settings: Settings) -> dict[str, Path]:
    """Create the head's state folder and its secrets (kept across restarts).

    Raises:
        FabricError: the settings carry a donor's fault-injection drill.
    """
    if settings.fault_inject:
        # The head reruns disputed work: its answers settle disputes, so it never lies.
        raise FabricError(f"DGPT_FAULT_INJECT={settings.fault_inject} is a drill for donors, not the head",
                          hint="unset DGPT_FAULT_INJECT where the head starts; set it for one donor's agent")
    paths = head_paths(settings.home)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    paths["dir"].chmod(0o700)  # the head's user only, whatever else may reach $DGPT_HOME
    paths["log"].parent.mkdir(parents=True, exist_ok=True)
    if not paths["ray_token"].is_file():
        write_secret(paths["ray_token"], secrets.token_hex(32))
    if not paths["api_key"].is_file():
        write_secret(paths["api_key"], f"dgpt_api_{secrets.token_urlsafe(24)}")
    if settings.tls_enabled and settings.tls_cert_file is None:
        ensure_certificate(paths["tls"], [settings.node_ip or "", socket.gethostname(), "127.0.0.1"])
    return paths


def ray_head_argv(settings: Settings) -> list[str]:
    ip = settings.node_ip or "127.0.0.1"
    spec = NodeSpec(ports=NodePorts(settings.ray_node_port_base, settings.ray_worker_ports),
                    labels={contract.LABEL_ROLE: contract.ROLE_HEAD}, num_cpus=settings.head_cpus, node_ip=ip,
                    temp_dir=ray_temp_dir(settings.home))
    dashboard_host = "0.0.0.0" if settings.http_host == "0.0.0.0" else ip
    return head_argv(spec, settings.ray_port, dashboard_host, settings.dashboard_port)


def _start_training_support(settings: Settings) -> None:
    """The head's checkpoint store and Ray Train's donor-aware coordinator (dgpt.train)."""
    from dgpt.train.coordinator import start_coordinator
    from dgpt.train.storage import start_head_store

    start_head_store(settings)
    kind = start_coordinator()
    if kind != "donor-aware":
        print(f"warning: elastic training uses Ray's {kind} autoscaling coordinator", file=sys.stderr, flush=True)


def _start_serve(settings: Settings) -> None:
    """Serve's proxy, and the applications the registry recorded (before the control plane
    starts, which records what Serve runs: see :func:`restore_serve`)."""
    import ray
    from ray import serve

    gcs = f"{settings.node_ip or '127.0.0.1'}:{settings.ray_port}"
    ray.init(address=gcs, namespace=contract.NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port, "location": "HeadOnly"})
    restore_serve(settings)


def _start_door(settings: Settings) -> None:
    """The control plane's door actor, pinned to this (the head) node, and training support."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dgpt.head.control_link import ControlPlaneDoor, link_path

    # Pinned by node identity, not by a custom resource any raylet could advertise.
    head_node = ray.get_runtime_context().get_node_id()
    actor: Any = ray.remote(ControlPlaneDoor).options(  # type: ignore[attr-defined]
        name=contract.REGISTRY_ACTOR,
        namespace=contract.NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=32,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node, soft=False),
    ).remote(str(link_path(settings.home)))
    ray.get(actor.ping.remote(), timeout=120)
    _start_training_support(settings)
    ray.shutdown()


class ControlProcess:
    """The control-plane process (``python -m dgpt.head.control_plane``): the supervisor's
    child, started again whenever it exits, as Ray restarted the actor it once was."""

    #: The shortest time between two starts (a control plane that cannot start does not spin).
    RESTART_AFTER_S = 2.0

    def __init__(self, settings: Settings, env: dict[str, str], log_path: Path, owner: tuple[int, int] | None) -> None:
        self.settings, self.env, self.log_path, self.owner = settings, env, log_path, owner
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        argv = [sys.executable, "-m", "dgpt.head.control_plane"]
        if self.owner is not None:
            argv += ["--owner", f"{self.owner[0]}:{self.owner[1]}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, preexec_fn=die_with_parent)
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.settings.model_dump_json().encode())
        self.proc.stdin.close()
        self.started_at = time.monotonic()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the control plane answers through its socket.

        Raises:
            FabricError: it exited, or did not answer within ``timeout_s``.
        """
        from dgpt.head.control_link import call_link, link_path

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-12:] if self.log_path.is_file() else []
                raise FabricError("the control plane exited while starting:\n  " + "\n  ".join(tail),
                                  hint=f"see {self.log_path}")
            try:
                if call_link(link_path(self.settings.home), "ping", {}, wait_s=0.5) == "ok":
                    return
            except FabricError:
                pass
            if time.monotonic() > deadline:
                raise FabricError(f"the control plane did not answer within {timeout_s:.0f} s",
                                  hint=f"see {self.log_path}")
            time.sleep(0.3)

    def keep_alive(self) -> None:
        """Start it again if it exited (at most every ``RESTART_AFTER_S``)."""
        if self.proc is None or self.proc.poll() is None or time.monotonic() - self.started_at < self.RESTART_AFTER_S:
            return
        print(f"control plane exited with code {self.proc.returncode}; starting it again", file=sys.stderr,
              flush=True)
        self.start()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_tree(self.proc.pid, grace_s=grace_s)


def restore_serve(settings: Settings, timeout_s: float = 60.0) -> int:
    """Re-apply the Serve applications the registry recorded, on a head that runs none.

    Before the control plane starts (it records what Serve runs every few seconds), so the
    record of a head that was stopped with apps deployed is not overwritten by an empty one.
    Returns how many applications were re-applied.
    """
    from dgpt.exceptions import ServeError
    from dgpt.head.dashboard import Dashboard, deployed_apps, serve_body
    from dgpt.head.store import RegistryStore

    store = RegistryStore(head_paths(settings.home)["db"])
    try:
        apps = store.serve_apps()
    finally:
        store.close()
    if not apps:
        return 0
    dashboard = Dashboard.of(settings)
    deadline = time.monotonic() + timeout_s
    while True:  # the dashboard's Serve module answers a few seconds after the head starts
        try:
            if deployed_apps(dashboard.serve_details()):
                return 0  # Serve already runs config apps: nothing to restore
            dashboard.put_serve(serve_body(settings, apps))
            print(f"re-applied {len(apps)} Serve application(s): {', '.join(a.get('name', '?') for a in apps)}",
                  flush=True)
            return len(apps)
        except ServeError as exc:
            if time.monotonic() > deadline:
                print(f"warning: could not re-apply the recorded Serve applications: {exc}", flush=True)
                return 0
            time.sleep(1.0)


def advertised(settings: Settings) -> Settings:
    """``settings`` with the address donors must use: ``node_ip``, else this machine's
    primary non-loopback address (a head on 127.0.0.1 is unreachable from other machines)."""
    if settings.node_ip:
        return settings
    from dgpt.netaddr import primary_ip

    return settings.model_copy(update={"node_ip": primary_ip()})


def run_supervisor(settings: Settings) -> int:
    """Run the head in the foreground until SIGTERM/SIGINT; returns the exit code."""
    settings = advertised(settings)
    paths = prepare_state(settings)
    become_subreaper()
    for port, name in ((settings.ray_port, "DGPT_RAY_PORT"), (settings.dashboard_port, "DGPT_DASHBOARD_PORT"),
                       (settings.http_port, "DGPT_HTTP_PORT"), (settings.api_port, "DGPT_API_PORT")):
        if port_in_use(port, settings.node_ip or "127.0.0.1"):
            print(f"error: port {port} ({name}) is already in use; pick another with {name}=...", file=sys.stderr)
            return 2
    env = ray_env(paths["ray_token"])
    env.update(NodePorts(settings.ray_node_port_base, settings.ray_worker_ports).head_env())
    # Nothing to drain on the head itself: its work is the control plane, stopped with it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED")})
    os.environ.pop("RAY_ADDRESS", None)
    hub = None
    if settings.overlay_enabled:
        from dgpt.exceptions import OverlayError
        from dgpt.overlay.hub import OverlayHub

        hub = OverlayHub(settings, paths["overlay_key"], paths["overlay_log"])
        try:
            hub.up()
        except OverlayError as exc:
            print(f"error: {exc.message}" + (f"\n  -> {exc.hint}" if exc.hint else ""), file=sys.stderr, flush=True)
            return 2
    ray_log = paths["log"].with_name("ray-head.log")
    # The last head's record of its address. `ray start --head` refuses to start when that
    # address equals its own and a raylet on this machine still names it (`--gcs-address`):
    # a donor on the head's machine waiting for its head to come back is such a raylet.
    (ray_temp_dir(settings.home) / "ray_current_cluster").unlink(missing_ok=True)
    from dgpt.head.isolation import setup as isolation_setup

    try:
        isolation = isolation_setup(settings)
    except FabricError as exc:
        print(f"error: {exc.message}" + (f"\n  -> {exc.hint}" if exc.hint else ""), file=sys.stderr, flush=True)
        return 2
    print(f"the head's Ray runs {isolation.describe()}", file=sys.stderr if isolation.spec is None else sys.stdout,
          flush=True)
    with open(ray_log, "ab") as log:
        ray_proc = subprocess.Popen(isolation.wrap(ray_head_argv(settings)), stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
    control = ControlProcess(settings, ray_env(paths["ray_token"]), paths["control_log"], isolation.owner)

    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def own_signals() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    own_signals()
    try:
        ip = settings.node_ip or "127.0.0.1"
        if not wait_until(lambda: port_in_use(settings.ray_port, ip) or ray_proc.poll() is not None, 120):
            raise FabricError("the Ray head did not open its port within 120 s", hint=f"see {ray_log}")
        if ray_proc.poll() is not None:
            tail = ray_log.read_text(errors="replace").splitlines()[-12:] if ray_log.is_file() else []
            raise FabricError(f"`ray start --head` exited with code {ray_proc.returncode}:\n  " + "\n  ".join(tail),
                              hint=f"see {ray_log}")
        _start_serve(settings)
        control.start()
        control.wait_ready()
        _start_door(settings)
        # ray.init() installed its own SIGTERM handler (a bare sys.exit) and ray.shutdown()
        # put back the default (die at once, leaving Ray running): ours again, so a stop
        # always runs the clean-up below.
        own_signals()
        write_json(paths["info"], {"pid": os.getpid(), "started_at": time.time(), **head_addresses(settings),
                                   "env": shell_env(settings), "settings": settings.model_dump(
                                       include=set(RUNTIME_KEYS), mode="json")})
        print(f"dgpt head ready: {head_addresses(settings)}", flush=True)
        while not stopping and ray_proc.poll() is None:
            reap_orphans(keep=[ray_proc.pid, control.pid or 0])
            control.keep_alive()
            time.sleep(0.5)
        return 0 if stopping else 1
    except Exception as exc:
        print(f"error: head failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Nothing on the head needs draining (every record is committed as it happens), so
        # `ray start` and its processes, and orphans adopted from it (we are their
        # subreaper), share one short grace period before SIGKILL. The control plane goes
        # first: a driver whose cluster vanished under it only logs errors.
        control.stop()
        stop_trees([ray_proc.pid, *(c.pid for c in psutil.Process().children()
                                    if c.pid != ray_proc.pid and (hub is None or c.pid != hub.pid))],
                   grace_s=HEAD_STOP_GRACE_S)
        if hub is not None:
            hub.down()  # after Ray: donors' raylets see the head go, not a network cut first
        paths["info"].unlink(missing_ok=True)


def head_running(settings: Settings) -> dict | None:
    """head.json of a running head of this DGPT_HOME, or None."""
    paths = head_paths(settings.home)
    pid_info = read_json(paths["pid"])
    if not pid_info or not alive(pid_info.get("pid")):
        return None
    return read_json(paths["info"]) or {"pid": pid_info["pid"]}


def start_head(settings: Settings, timeout_s: float = 180.0, on_wait: Any = None) -> dict:
    """Start the head in the background; return its addresses once the API answers.

    Raises:
        FabricError: a head already runs for this DGPT_HOME, or it failed to start.
    """
    import httpx

    settings = advertised(settings)
    paths = prepare_state(settings)
    if head_running(settings):
        raise FabricError(f"a head already runs for DGPT_HOME={settings.home}", hint="stop it with `dgpt head stop`")
    paths["info"].unlink(missing_ok=True)  # left by a head that was killed: its ports are stale
    pid = spawn_detached([sys.executable, "-m", "dgpt.head.process"], paths["log"], settings_env(settings))
    write_json(paths["pid"], {"pid": pid})
    health = f"{settings.api_url}/health"
    trust = head_trust(settings)

    def ready() -> bool:
        if not alive(pid):
            return True
        if not paths["info"].is_file():  # written once everything is up; later commands read it
            return False
        try:
            return httpx.get(health, timeout=2, verify=trust.verify()).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + timeout_s
    while not ready():
        if on_wait:
            on_wait(time.monotonic() - (deadline - timeout_s))
        if time.monotonic() > deadline:
            stop_tree(pid, grace_s=20)
            raise FabricError(f"the head did not answer {health} within {timeout_s:.0f} s", hint=f"see {paths['log']}")
        time.sleep(0.5)
    if not alive(pid):
        tail = paths["log"].read_text(errors="replace").splitlines()[-15:] if paths["log"].is_file() else []
        raise FabricError("the head exited while starting:\n  " + "\n  ".join(tail), hint=f"full log: {paths['log']}")
    return {"pid": pid, **head_addresses(settings)}


def stop_head(settings: Settings, grace_s: float = 30.0) -> bool:
    """Stop the head of this DGPT_HOME by pid. Returns False if none was running."""
    paths = head_paths(settings.home)
    pid_info = read_json(paths["pid"])
    if not pid_info or not alive(pid_info.get("pid")):
        paths["pid"].unlink(missing_ok=True)
        return False
    stop_tree(int(pid_info["pid"]), grace_s=grace_s)
    paths["pid"].unlink(missing_ok=True)
    return True


if __name__ == "__main__":
    sys.exit(run_supervisor(load_settings()))

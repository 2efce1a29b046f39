"""All of dgpt's settings: one pydantic model, read from DGPT_* variables and a TOML file.

Precedence, strongest first: explicit overrides (CLI flags) > ``DGPT_*`` environment
variables > the ports a head running from ``$DGPT_HOME`` recorded (``head/head.json``) >
the TOML file (``$DGPT_CONFIG``, else ``$DGPT_HOME/config.toml``) > defaults.
No other module reads ``DGPT_*`` variables.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgpt.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "DGPT_"

Port = Annotated[int, Field(ge=1, le=65535)]
#: Fixed ports of one Ray node from ``ray_node_port_base`` on (see :func:`node_ports`).
NODE_PORTS = 9
PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


def _default_home() -> Path:
    return Path.home() / ".dgpt"


class Settings(BaseModel):
    """Every dgpt setting. Field ``x`` is read from ``DGPT_X`` (upper case)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Field(default_factory=_default_home, description="State folder: SQLite, logs, pids.")

    # Head addresses. Defaults are Ray's own ports, for real deployments.
    ray_port: Port = Field(6379, description="GCS port of the Ray head.")
    dashboard_port: Port = Field(8265, description="Ray dashboard and Jobs API port.")
    http_port: Port = Field(8000, description="Serve HTTP port: inference apps under /<app>.")
    api_port: Port = Field(8080, description="Control-plane REST API (/api/v1): donors, jobs, tokens, status.")
    metrics_port: Port = Field(
        9108, description="Head: Prometheus metrics of the control plane (/metrics) and the Ray nodes to scrape "
        "(/ray/targets, Prometheus HTTP service discovery); see deployments/prometheus/."
    )
    http_host: str = Field("0.0.0.0", min_length=1, description="Interface the head's HTTP servers bind.")
    node_ip: str | None = Field(
        None, description="Address this machine advertises to Ray and the head; autodetected (never loopback) if unset."
    )
    # Every port a Ray node listens on is fixed, so an operator can write one firewall rule.
    ray_node_port_base: Port = Field(
        6380, le=65535 - NODE_PORTS,
        description=f"First of the {NODE_PORTS} ports Ray nodes listen on (node manager, object manager, "
        "dashboard agent gRPC and HTTP, runtime-env agent, metrics; on the head also Ray client, autoscaler and "
        "dashboard metrics).",
    )
    ray_worker_ports: str = Field(
        "10002-19999", description="Ports Ray's worker processes listen on, START-END (Ray's own default range)."
    )
    head_url: str | None = Field(None, description="Base URL of the head's HTTP API, for clients and donors.")
    # The control plane over HTTPS (dgpt/tls.py).
    tls: Literal["auto", "on", "off"] = Field(
        "auto", description="Serve the control-plane API over HTTPS: auto (whenever http_host is not a loopback "
        "address), on, or off."
    )
    tls_cert_file: Path | None = Field(
        None, description="The head's own TLS certificate (PEM); unset: the head makes a self-signed one on first "
        "start, in $DGPT_HOME/head/tls/."
    )
    tls_key_file: Path | None = Field(None, description="The private key of tls_cert_file (PEM).")
    head_fingerprint: str | None = Field(
        None, description="SHA-256 fingerprint of the head's certificate (sha256:<hex>) that clients on other "
        "machines pin; a join token carries it already."
    )
    api_key: str | None = Field(None, description="API key for /api/v1 calls (apps, CLI).")

    # Donor lifecycle. Defaults suit real donors on real networks.
    heartbeat_interval_s: PositiveSeconds = Field(5.0, description="How often a running donor heartbeats.")
    standby_heartbeat_interval_s: PositiveSeconds = Field(
        30.0, description="Shortest interval of standby donors' held (long-poll) heartbeats; the head stretches it "
        "for large fleets."
    )
    heartbeat_timeout_s: PositiveSeconds = Field(
        30.0, description="Silence after which an active donor's session ends as lost."
    )
    drain_deadline_s: PositiveSeconds = Field(
        30.0, description="How long a draining donor's work gets before its raylet stops."
    )
    monitor_interval_s: PositiveSeconds = Field(
        2.0, description="How often the registry reconciles donors with Ray's node table."
    )
    idle_load_threshold: float = Field(
        0.6, gt=0, le=64,
        description="CPU the owner's own (non-Ray, non-dgpt) processes use, in cores per core, above which for "
        "three polls in a row the owner counts as back and the donor drains; it donates again once that load "
        "has stayed at or below the threshold for idle_calm_s.",
    )
    fault_inject: Literal["wrong-results"] | None = Field(
        None, description="A drill on a donor: 'wrong-results' makes its verified tasks and shadowed Serve requests "
        "answer wrong on purpose, so the fabric's verification can be seen to catch it (dgpt/verify/fault.py). "
        "Never set on the head."
    )
    idle_calm_s: float = Field(
        60.0, gt=0, le=86400,
        description="How long the owner's load must stay at or below idle_load_threshold before a donor the "
        "owner took back donates again (a person pauses between bursts of work).",
    )
    allowed_hours: str | None = Field(
        None, description="Local hours a donor may work, e.g. '22-7'; unset means any hour."
    )
    head_cpus: float = Field(0.0, ge=0, le=1024, description="CPUs the head offers to user work.")
    # How a donor protects its owner from the work (dgpt/donor/protection.py).
    enforce_caps: Literal["auto", "on", "off"] = Field(
        "auto", description="Enforce a donor's CPU and memory caps with a cgroup: auto (where the machine allows, "
        "else a warning), on (refuse to start without), off."
    )
    sandbox: Literal["auto", "on", "off"] = Field(
        "auto", description="Run a donor's work in a bubblewrap sandbox that hides the owner's files: auto, on, off."
    )
    sandbox_user: str | None = Field(
        None, min_length=1, description="User a root donor agent or head runs Ray work as (default: nobody)."
    )
    sandbox_shared: str | None = Field(
        None, min_length=1, description="Folders the sandboxed work (on a donor, or on the head) may write, "
        "separated by ':' (absolute paths, e.g. a shared mount for Ray Train's storage_path); everything else "
        "stays read-only or hidden."
    )
    head_sandbox: Literal["auto", "on", "off"] = Field(
        "auto", description="Run the head's Ray (job drivers, any task placed on the head) in a bubblewrap sandbox "
        "that hides $DGPT_HOME and its secrets: auto (where the machine allows, else a warning), on (refuse to "
        "start without), off (Ray work can read the head's secrets)."
    )

    # The WireGuard overlay (dgpt/overlay): donors behind NAT join through the head.
    overlay_enabled: bool = Field(
        False, description="Head: run the WireGuard overlay so donors behind NAT can join (needs root, "
        "wireguard-go, wg and nft on the head)."
    )
    overlay_join: Literal["auto", "off"] = Field(
        "auto", description="Donor: join through the head's overlay when the head offers one and this machine "
        "can (root, wireguard-go, wg, nft); 'off' never does."
    )
    overlay_port: Port = Field(51820, description="Head: the UDP port of its WireGuard interface (open it to donors).")
    overlay_cidr: str = Field(
        "100.96.0.0/16", description="Head: the overlay's IPv4 network; the head takes its first address. The "
        "default (carrier-grade NAT space) rarely clashes with home networks."
    )
    overlay_interface: str = Field(
        "dgpt0", description="Name of this machine's WireGuard interface (at most 15 letters, digits, '-', '_', '.')."
    )
    overlay_endpoint: str | None = Field(
        None, description="Head: the host donors send WireGuard packets to (default: node_ip)."
    )

    @field_validator("overlay_cidr")
    @classmethod
    def _check_cidr(cls, value: str) -> str:
        parse_overlay_cidr(value)
        return value

    @field_validator("overlay_interface")
    @classmethod
    def _check_interface(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
            raise ValueError(f"must be 1-15 letters, digits, '-', '_' or '.', got {value!r}")
        return value

    # The donor storage tier (dgpt/storage; the head's side in dgpt/head/storage_tier.py).
    storage_port: Port | None = Field(
        None, description="Donor: port of its piece server (storage tier); default ray_node_port_base + "
        f"{NODE_PORTS}, the port right after the node's Ray block (open it to clients of the storage tier)."
    )
    storage_lost_after_s: PositiveSeconds = Field(
        3600.0, description="Head: a donor silent this long has its pieces written off and repaired elsewhere "
        "(a shorter silence only makes them unreadable for a while)."
    )
    storage_capability_ttl_s: float = Field(
        600.0, gt=0, le=86_400, description="Head: life of each piece capability it issues to clients."
    )
    storage_gc_grace_s: float = Field(
        3600.0, ge=0, le=30 * 86_400,
        description="Head: pieces of deleted or replaced files stay this long, for readers still on them."
    )
    storage_repair_interval_s: PositiveSeconds = Field(
        10.0, description="Head: how often the repair checker, the audits and garbage collection run."
    )
    storage_audits_per_round: int = Field(
        16, ge=0, le=10_000, description="Head: random pieces challenged each repair interval (0: no audits)."
    )

    train_checkpoints: Literal["auto", "donors", "head"] = Field(
        "auto", description="Head: where dgpt.train keeps a run's checkpoints when the run names no storage: "
        "'donors' (the donor storage tier), 'head' (the head's checkpoint store), or 'auto': the donor tier "
        "once its erasure-coding profile is durable against churn (enough donors of distinct owners; "
        "dgpt/train/storage.py:choose_checkpoint_store), else the head."
    )

    # Autoscaler bounds (autoscaler/bounds.py holds the rest of its pacing).
    min_active_donors: int = Field(0, ge=0, le=100_000, description="Donors kept active even with no demand.")
    max_active_donors: int = Field(
        2000, ge=1, le=100_000, description="Most donors in the Ray cluster at once (Ray's envelope: a few thousand)."
    )
    idle_timeout_s: PositiveSeconds = Field(300.0, description="Idle time after which the autoscaler may drain a donor.")
    autoscaler_interval_s: PositiveSeconds = Field(1.0, description="How often the autoscaler decides.")
    control_plane_nice: int = Field(
        -10, ge=-20, le=0,
        description="Head: the control plane's CPU priority (a nice value). Below 0 it keeps heartbeats and "
        "autoscaler ticks on time while Serve replicas or jobs on the head saturate its CPUs; it needs root or "
        "CAP_SYS_NICE, and without either the control plane runs at 0 and says so in its log. 0: as any process.",
    )
    credit_interval_s: PositiveSeconds = Field(
        60.0, ge=1, description="Longest interval of one donor session's work in one credit ledger row (also what "
        "one void of a failed result takes back at least)."
    )
    debug: bool = Field(False, description="Show tracebacks on errors.")

    @field_validator("allowed_hours")
    @classmethod
    def _check_hours(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hours(value)
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.min_active_donors > self.max_active_donors:
            raise ValueError(
                f"min_active_donors ({self.min_active_donors}) must not exceed max_active_donors ({self.max_active_donors})"
            )
        check_ports(self)
        return self

    @field_validator("sandbox_shared")
    @classmethod
    def _check_shared(cls, value: str | None) -> str | None:
        if value is not None:
            parse_shared_folders(value)
        return value

    @field_validator("ray_worker_ports")
    @classmethod
    def _check_worker_ports(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("head_fingerprint")
    @classmethod
    def _check_fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^sha256:[0-9a-fA-F]{64}$", value.strip()):
            raise ValueError(f"must be sha256: followed by 64 hex digits (`dgpt status` on the head prints it), "
                             f"got {value!r}")
        return value.strip().lower()

    @model_validator(mode="after")
    def _check_tls_files(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a file")
        return self

    @field_validator("head_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value

    @property
    def sandbox_shared_folders(self) -> tuple[Path, ...]:
        """``sandbox_shared`` as paths (empty when unset)."""
        return parse_shared_folders(self.sandbox_shared) if self.sandbox_shared else ()

    @property
    def api_url(self) -> str:
        """The control plane base URL (``.../api/v1``)."""
        return f"{self.local_head_url}/api/v1"

    @property
    def tls_enabled(self) -> bool:
        """Whether the head serves its API over HTTPS (``tls``; auto: when it listens beyond loopback)."""
        if self.tls != "auto":
            return self.tls == "on"
        try:
            return not ipaddress.ip_address(self.http_host).is_loopback
        except ValueError:
            return self.http_host != "localhost"

    @property
    def local_head_url(self) -> str:
        """The head's control-plane URL that clients on this machine use."""
        if self.head_url:
            return self.head_url
        host = self.node_ip or "127.0.0.1"
        return f"{'https' if self.tls_enabled else 'http'}://{host}:{self.api_port}"

    @property
    def serve_url(self) -> str:
        """The head's Serve proxy (inference endpoints)."""
        host = self.node_ip or "127.0.0.1"
        return f"http://{host}:{self.http_port}"


def parse_port_range(spec: str) -> tuple[int, int]:
    """Parse ``'START-END'`` (inclusive) ports.

    Raises:
        ValueError: not two ports 1024-65535 joined by '-', or fewer than 16 ports.
    """
    parts = spec.split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"must look like 'START-END' (e.g. '10002-19999'), got {spec!r}")
    start, end = (int(p) for p in parts)
    if not 1024 <= start <= end <= 65535:
        raise ValueError(f"ports must be 1024-65535 and START <= END, got {spec!r}")
    if end - start + 1 < 16:
        raise ValueError(f"{spec!r} holds {end - start + 1} ports; Ray's workers need at least 16")
    return start, end


def parse_overlay_cidr(spec: str) -> ipaddress.IPv4Network:
    """Parse the overlay's network.

    Raises:
        ValueError: not an IPv4 network with a prefix of /8 to /29 (room for a head and donors).
    """
    try:
        net = ipaddress.ip_network(spec, strict=True)
    except ValueError as exc:
        raise ValueError(f"must be an IPv4 network such as '100.96.0.0/16', got {spec!r} ({exc})") from None
    if not isinstance(net, ipaddress.IPv4Network) or not 8 <= net.prefixlen <= 29:
        raise ValueError(f"must be an IPv4 network from /8 to /29, got {spec!r}")
    return net


#: What each of a node's fixed ports is, in order from ``ray_node_port_base``.
NODE_PORT_NAMES = ("node manager", "object manager", "dashboard agent gRPC", "dashboard agent HTTP",
                   "runtime-env agent", "metrics export", "Ray client server", "autoscaler metrics",
                   "dashboard metrics")


def node_ports(base: int) -> dict[str, int]:
    """The fixed ports of one Ray node whose block starts at ``base``."""
    return {name: base + i for i, name in enumerate(NODE_PORT_NAMES)}


def storage_port(s: Settings) -> int:
    """The port a donor's piece server listens on: ``storage_port``, else the one after its Ray block."""
    return s.storage_port if s.storage_port is not None else s.ray_node_port_base + NODE_PORTS


def check_ports(s: Settings) -> None:
    """Refuse port settings Ray would trip over, saying why (Ray itself hides it in a log).

    Raises:
        ValueError: a fixed port lies in the worker range, or two fixed ports clash.
    """
    lo, hi = parse_port_range(s.ray_worker_ports)
    fixed = {"ray_port": s.ray_port, "dashboard_port": s.dashboard_port, "http_port": s.http_port,
             "api_port": s.api_port, "metrics_port": s.metrics_port}
    fixed.update({f"ray_node_port_base+{i} ({name})": port
                  for i, (name, port) in enumerate(node_ports(s.ray_node_port_base).items())})
    fixed["storage_port"] = storage_port(s)
    for name, port in fixed.items():
        if lo <= port <= hi:
            raise ValueError(
                f"{name}={port} lies inside ray_worker_ports {s.ray_worker_ports}: a Ray worker may take that "
                "port first and the service then fails to start; move the port or the worker range"
            )
    seen: dict[int, str] = {}
    for name, port in fixed.items():
        if port in seen:
            raise ValueError(f"{name} and {seen[port]} are both port {port}; every fixed port must differ")
        seen[port] = name


def parse_hours(spec: str) -> tuple[int, int]:
    """Parse an allowed-hours window ``'START-END'`` (24h clock, END exclusive; may wrap).

    Raises:
        ValueError: the text is not two hours 0-23 joined by '-', or START equals END.
    """
    parts = spec.split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"must look like 'START-END' in whole hours (e.g. '22-7'), got {spec!r}")
    start, end = (int(p) for p in parts)
    if not (0 <= start <= 23 and 0 <= end <= 23) or start == end:
        raise ValueError(f"hours must be 0-23 and differ, got {spec!r}")
    return start, end


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    fields = Settings.model_fields
    out: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in fields:
            out[name] = value
    return out


def _toml_values(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", hint="fix or remove the file") from exc
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown setting(s): {', '.join(unknown)}",
            hint=f"valid settings: {', '.join(sorted(Settings.model_fields))}",
        )
    return data


def _running_head_values(home: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads((home / "head" / "head.json").read_text())
    except (OSError, ValueError):
        return {}
    recorded = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {k: v for k, v in recorded.items() if k in Settings.model_fields and v is not None}


def load_settings(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from overrides, ``DGPT_*`` variables, the TOML file and defaults.

    Args:
        overrides: values that win over everything (CLI flags); ``None`` values are ignored.
        env: the environment to read; ``os.environ`` when omitted.

    Raises:
        ConfigError: a value is invalid; the message names the variable or key.
    """
    env = os.environ if env is None else env
    env_vals = _env_values(env)
    home = Path(env_vals.get("home") or _default_home()).expanduser()
    if overrides and overrides.get("home"):
        home = Path(overrides["home"]).expanduser()
    config_path = Path(env["DGPT_CONFIG"]) if env.get("DGPT_CONFIG") else home / "config.toml"
    if env.get("DGPT_CONFIG") and not config_path.is_file():
        raise ConfigError(f"DGPT_CONFIG points at {config_path}, which is not a file", hint="fix DGPT_CONFIG or unset it")
    values: dict[str, Any] = _toml_values(config_path) if config_path.is_file() else {}
    sources = {k: f"{config_path}: {k}" for k in values}
    # A head running from this DGPT_HOME recorded its ports: clients find it without flags.
    running = _running_head_values(home)
    values.update(running)
    sources.update({k: f"{home}/head/head.json: {k}" for k in running})
    values.update(env_vals)
    sources.update({k: ENV_PREFIX + k.upper() for k in env_vals})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            sources[key] = "--" + key.replace("_", "-")
    values["home"] = home
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:  # a rule across settings: its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            key = str(err["loc"][0])
            where = sources.get(key, key)
            problems.append(f"{where}={values.get(key)!r}: {err['msg']}")
        raise ConfigError(
            "invalid setting: " + "; ".join(problems),
            hint="fix the value (see `dgpt config` for every setting and its default)",
        ) from None


#: Folders the sandbox never shows writable, whatever ``sandbox_shared`` says.
_NEVER_SHARED = (Path("/"), Path("/proc"), Path("/dev"), Path("/sys"), Path("/etc"), Path("/usr"), Path("/boot"))


def parse_shared_folders(value: str) -> tuple[Path, ...]:
    """``sandbox_shared`` as paths: absolute, ``:``-separated, none a system folder."""
    out: list[Path] = []
    for part in value.split(":"):
        if not part:
            raise ValueError(f"empty folder in {value!r}: separate folders with a single ':'")
        path = Path(part)
        if not path.is_absolute():
            raise ValueError(f"{part!r} is not an absolute path")
        path = Path(os.path.normpath(path))
        if any(path == k or (k != Path("/") and k in path.parents) for k in _NEVER_SHARED):
            raise ValueError(f"{part!r} is a system folder; the work may only write folders of its own")
        out.append(path)
    return tuple(dict.fromkeys(out))

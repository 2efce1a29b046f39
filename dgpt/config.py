"""All of dgpt's settings: one pydantic model, read from DGPT_* variables and a TOML file.

Precedence, strongest first: explicit overrides (CLI flags) > ``DGPT_*`` environment
variables > the ports a head running from ``$DGPT_HOME`` recorded (``head/head.json``) >
the TOML file (``$DGPT_CONFIG``, else ``$DGPT_HOME/config.toml``) > defaults.
No other module reads ``DGPT_*`` variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dgpt.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "DGPT_"

Port = Annotated[int, Field(ge=1, le=65535)]
#: Fixed ports of one Ray node from ``ray_node_port_base`` on (see :func:`node_ports`).
NODE_PORTS = 7
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
    http_host: str = Field("0.0.0.0", min_length=1, description="Interface the head's HTTP servers bind.")
    node_ip: str | None = Field(
        None, description="Address this machine advertises to Ray and the head; autodetected (never loopback) if unset."
    )
    # Every port a Ray node listens on is fixed, so an operator can write one firewall rule.
    ray_node_port_base: Port = Field(
        6380, le=65535 - NODE_PORTS,
        description=f"First of the {NODE_PORTS} ports each Ray node listens on (node manager, object manager, "
        "dashboard agent gRPC and HTTP, runtime-env agent, metrics, Ray client on the head).",
    )
    ray_worker_ports: str = Field(
        "10002-19999", description="Ports Ray's worker processes listen on, START-END (Ray's own default range)."
    )
    head_url: str | None = Field(None, description="Base URL of the head's HTTP API, for clients and donors.")
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
        "three polls in a row the owner counts as back and the donor drains.",
    )
    allowed_hours: str | None = Field(
        None, description="Local hours a donor may work, e.g. '22-7'; unset means any hour."
    )
    head_cpus: float = Field(0.0, ge=0, le=1024, description="CPUs the head offers to user work.")

    # Autoscaler bounds (autoscaler/bounds.py holds the rest of its pacing).
    min_active_donors: int = Field(0, ge=0, le=100_000, description="Donors kept active even with no demand.")
    max_active_donors: int = Field(
        2000, ge=1, le=100_000, description="Most donors in the Ray cluster at once (Ray's envelope: a few thousand)."
    )
    idle_timeout_s: PositiveSeconds = Field(300.0, description="Idle time after which the autoscaler may drain a donor.")
    autoscaler_interval_s: PositiveSeconds = Field(1.0, description="How often the autoscaler decides.")
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

    @field_validator("ray_worker_ports")
    @classmethod
    def _check_worker_ports(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("head_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value else value

    @property
    def api_url(self) -> str:
        """The control plane base URL (``.../api/v1``)."""
        return f"{self.local_head_url}/api/v1"

    @property
    def local_head_url(self) -> str:
        """The head's control-plane URL that clients on this machine use."""
        if self.head_url:
            return self.head_url
        host = self.node_ip or "127.0.0.1"
        return f"http://{host}:{self.api_port}"

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


#: What each of a node's fixed ports is, in order from ``ray_node_port_base``.
NODE_PORT_NAMES = ("node manager", "object manager", "dashboard agent gRPC", "dashboard agent HTTP",
                   "runtime-env agent", "metrics export", "Ray client server")


def node_ports(base: int) -> dict[str, int]:
    """The fixed ports of one Ray node whose block starts at ``base``."""
    return {name: base + i for i, name in enumerate(NODE_PORT_NAMES)}


def check_ports(s: Settings) -> None:
    """Refuse port settings Ray would trip over, saying why (Ray itself hides it in a log).

    Raises:
        ValueError: a fixed port lies in the worker range, or two fixed ports clash.
    """
    lo, hi = parse_port_range(s.ray_worker_ports)
    fixed = {"ray_port": s.ray_port, "dashboard_port": s.dashboard_port, "http_port": s.http_port,
             "api_port": s.api_port}
    fixed.update({f"ray_node_port_base+{i} ({name})": port
                  for i, (name, port) in enumerate(node_ports(s.ray_node_port_base).items())})
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

"""Serve applications on a fabric: deploy a config file, read their status, delete one.

Everything goes through Ray's public Serve REST API on the head's dashboard
(``PUT``/``GET /api/serve/applications/``, the API behind ``serve deploy|status``), with
the fabric's Ray auth token; replicas are mapped to donors through the control plane's
donor list (the registry's view of which Ray node each donor runs).

The Serve REST API replaces *all* config-deployed applications on every ``PUT``. So a
deploy sends the applications already deployed from config together with the new ones,
and a delete sends all but the one deleted. Applications started from Python
(``serve.run``) are not config-deployed: a ``PUT`` never
touches them, and ``delete`` refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dgpt.config import Settings
from dgpt.exceptions import ConfigError, ServeError
from dgpt.head.dashboard import Dashboard, serve_body
from dgpt.head.paths import head_paths
from dgpt.head.process import head_running

__all__ = [
    "AppStatus",
    "DeploymentStatus",
    "ReplicaStatus",
    "ServeStatus",
    "delete",
    "deploy",
    "deploy_config",
    "endpoint_rows",
    "load_config",
    "status",
    "validate_config",
    "wait_deleted",
    "wait_running",
]

_POLL_S = 0.5
# Application states that will not change without a new deploy.
_FAILED = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica: where it runs and in which state."""

    replica_id: str
    state: str
    node_id: str | None
    donor: str  # the donor's name, "head", or the first 8 hex digits of an unknown node id


@dataclass(frozen=True)
class DeploymentStatus:
    """One deployment of an application and its replicas."""

    name: str
    status: str
    message: str
    target_replicas: int | None
    replicas: tuple[ReplicaStatus, ...]


@dataclass(frozen=True)
class AppStatus:
    """One Serve application on the fabric."""

    name: str
    route_prefix: str | None
    status: str
    message: str
    from_config: bool  # deployed from a config file (``dgpt serve deploy``), not ``serve.run``
    deployments: tuple[DeploymentStatus, ...]

    def replicas_per_donor(self, states: frozenset[str] = frozenset({"RUNNING"})) -> dict[str, int]:
        """``{donor: replica count}`` over every deployment, counting replicas in ``states``."""
        out: dict[str, int] = {}
        for dep in self.deployments:
            for rep in dep.replicas:
                if rep.state in states:
                    out[rep.donor] = out.get(rep.donor, 0) + 1
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class ServeStatus:
    """Every application on the fabric, and the raw config of those deployed from files."""

    apps: tuple[AppStatus, ...]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def app(self, name: str) -> AppStatus | None:
        """The application called ``name``, or ``None``."""
        return next((a for a in self.apps if a.name == name), None)


# ----------------------------------------------------------------------------- config file


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate a Serve config file (the format ``serve deploy`` accepts).

    Returns:
        The config as a JSON-able dict, checked against Ray's ``ServeDeploySchema``.

    Raises:
        ConfigError: the file is missing, is not YAML, or is not a Serve config; the
            message names the file and the offending field.
    """

    if not path.exists():
        raise ConfigError(f"Serve config {path} does not exist",
                          hint="pass a Serve config YAML, e.g. `dgpt serve deploy deployments/digits.yaml`")
    if not path.is_file():
        raise ConfigError(f"Serve config {path} is not a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"Serve config {path} is not valid YAML{where}: {problem}",
                          hint="fix the YAML syntax (indentation, colons, quotes)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Serve config {path} is not a text file") from None
    return validate_config(raw, str(path))


def validate_config(raw: Any, source: str = "the config") -> dict[str, Any]:
    """Check a parsed Serve config against Ray's ``ServeDeploySchema``.

    Returns:
        The config as a JSON-able dict (only the fields it sets).

    Raises:
        ConfigError: it is not a Serve config; the message names ``source`` and the field.
    """
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(raw, dict) or "applications" not in raw:
        got = type(raw).__name__ if not isinstance(raw, dict) else f"keys {sorted(raw)}"
        raise ConfigError(
            f"{source} is not a Serve config: it needs a top-level `applications:` list (got {got})",
            hint="see deployments/digits.yaml for the format (`serve build` writes one too)",
        )
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ConfigError(f"{source} is not a valid Serve config: {problems}",
                          hint="see deployments/digits.yaml for the format") from None
    if not schema.applications:
        raise ConfigError(f"{source} lists no applications", hint="add at least one entry under `applications:`")
    return schema.model_dump(mode="json", exclude_unset=True)


# ----------------------------------------------------------------------------- REST plumbing


def _dashboard(settings: Settings) -> Dashboard:
    token_path = head_paths(settings.home)["ray_token"]
    if not head_running(settings) or not token_path.is_file():
        raise ServeError(f"no head runs for DGPT_HOME={settings.home}",
                         hint="start one with `dgpt up` (or `dgpt head start`), or pass --home")
    return Dashboard.of(settings)


def _node_names(settings: Settings) -> dict[str, str]:
    """``{node_id_hex: donor name}`` from the control plane (empty if it does not answer)."""
    from dgpt.exceptions import DgptError
    from dgpt.head.fabric import api_client

    client = api_client(settings)
    try:
        return {d.node_id: d.name for d in client.donors() if d.node_id}
    except DgptError:
        return {}
    finally:
        client.close()


def _parse(details: dict[str, Any], names: dict[str, str], head_node_id: str | None) -> ServeStatus:
    apps: list[AppStatus] = []
    configs: dict[str, dict[str, Any]] = {}
    for name, app in sorted((details.get("applications") or {}).items()):
        deployments = []
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            replicas = []
            for rep in dep.get("replicas") or []:
                node = rep.get("node_id")
                if node and node in names:
                    donor = names[node]
                elif node and node == head_node_id:
                    donor = "head"
                else:
                    donor = node[:8] if node else "-"
                replicas.append(ReplicaStatus(replica_id=str(rep.get("replica_id", "")),
                                              state=str(rep.get("state", "")), node_id=node, donor=donor))
            deployments.append(DeploymentStatus(
                name=dep_name, status=str(dep.get("status", "")), message=str(dep.get("message") or ""),
                target_replicas=dep.get("target_num_replicas"), replicas=tuple(replicas)))
        deployed = app.get("deployed_app_config")
        if deployed:
            configs[name] = deployed
        apps.append(AppStatus(name=name, route_prefix=app.get("route_prefix"), status=str(app.get("status", "")),
                              message=str(app.get("message") or ""), from_config=bool(deployed),
                              deployments=tuple(deployments)))
    return ServeStatus(apps=tuple(apps), configs=configs)


def status(settings: Settings) -> ServeStatus:
    """Every Serve application on the fabric, with replicas mapped to donors.

    Raises:
        ServeError: no head runs for this DGPT_HOME, or the dashboard did not answer.
    """
    details = _dashboard(settings).serve_details()
    head_node = (details.get("controller_info") or {}).get("node_id")
    return _parse(details, _node_names(settings), head_node)


def _put(settings: Settings, configs: list[dict[str, Any]], base: dict[str, Any] | None = None) -> None:
    _dashboard(settings).put_serve(serve_body(settings, configs, base))


# ----------------------------------------------------------------------------- operations


def deploy(settings: Settings, path: Path) -> list[str]:
    """Deploy the applications of a Serve config file; other applications stay as they are.

    Returns immediately once Serve accepted the config; ``wait_running`` waits for replicas.

    Returns:
        The names of the applications in the file.

    Raises:
        ConfigError: the file is missing or not a valid Serve config.
        ServeError: no head runs, a name clashes with an application started from Python,
            or Serve refused the config.
    """
    return deploy_config(settings, load_config(path), str(path))


def deploy_config(settings: Settings, config: dict[str, Any], source: str = "the config") -> list[str]:
    """``deploy`` for a config already in memory (a dict in the Serve config file format).

    Raises:
        ConfigError / ServeError: as ``deploy``.
    """
    config = validate_config(config, source)
    new_apps = config["applications"]
    names = [a.get("name", "default") for a in new_apps]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source} names an application twice: {names}")
    current = status(settings)
    for name in names:
        existing = current.app(name)
        if existing is not None and not existing.from_config:
            raise ServeError(f"application {name!r} was started from Python (serve.run), not from a config file",
                             hint="rename the application in the config file")
    kept = [cfg for app_name, cfg in current.configs.items() if app_name not in names]
    _put(settings, kept + new_apps, base=config)
    return names


def delete(settings: Settings, name: str) -> None:
    """Delete one application deployed from a config file; the others keep running.

    Raises:
        ServeError: no such application, or it was started from Python (the control plane).
    """
    current = status(settings)
    app = current.app(name)
    if app is None:
        known = ", ".join(a.name for a in current.apps) or "none"
        raise ServeError(f"no Serve application {name!r} on this fabric (applications: {known})",
                         hint="see `dgpt serve status`")
    if not app.from_config:
        raise ServeError(f"application {name!r} was started from Python (serve.run), not `dgpt serve deploy`",
                         hint="the control plane `dgpt` stops with the head (`dgpt down`)")
    _put(settings, [cfg for app_name, cfg in current.configs.items() if app_name != name])


def wait_running(settings: Settings, names: list[str], timeout_s: float = 300.0,
                 on_wait: Callable[[ServeStatus, float], None] | None = None) -> ServeStatus:
    """Wait until every application in ``names`` is RUNNING.

    Raises:
        ServeError: an application failed to deploy (the message is Serve's), or the
            timeout passed (the message says what each deployment waits for).
    """
    started = time.monotonic()
    while True:
        current = status(settings)
        apps = [current.app(n) for n in names]
        if on_wait is not None:
            on_wait(current, time.monotonic() - started)
        if all(a is not None and a.status == "RUNNING" for a in apps):
            return current
        for app in apps:
            if app is not None and app.status in _FAILED:
                raise ServeError(f"application {app.name!r} is {app.status}: {app.message.strip()[-1500:]}",
                                 hint="fix the app or its config, then `dgpt serve deploy` again")
        if time.monotonic() - started > timeout_s:
            waiting = "; ".join(_describe_waiting(a, n) for a, n in zip(apps, names, strict=True))
            raise ServeError(f"applications not RUNNING after {timeout_s:.0f}s: {waiting}",
                             hint="replicas may lack donors with room: see `dgpt status` and `dgpt serve status`")
        time.sleep(_POLL_S)


def wait_deleted(settings: Settings, name: str, timeout_s: float = 120.0) -> None:
    """Wait until application ``name`` is gone.

    Raises:
        ServeError: it is still there after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while status(settings).app(name) is not None:
        if time.monotonic() > deadline:
            raise ServeError(f"application {name!r} still exists {timeout_s:.0f}s after its deletion",
                             hint="see `dgpt serve status`")
        time.sleep(_POLL_S)


def _describe_waiting(app: AppStatus | None, name: str) -> str:
    if app is None:
        return f"{name}: not created yet"
    parts = []
    for dep in app.deployments:
        running = sum(1 for r in dep.replicas if r.state == "RUNNING")
        target = dep.target_replicas if dep.target_replicas is not None else "?"
        parts.append(f"{dep.name} {dep.status} {running}/{target} replicas"
                     + (f" ({dep.message.strip()[:200]})" if dep.message.strip() else ""))
    return f"{name} {app.status}: " + ", ".join(parts)


def endpoint_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per Serve application for `dgpt status`: app, route, status, replicas per donor.

    ``replicas`` maps each donor (its name; ``head`` for the head node) to its RUNNING
    replicas; ``url`` is the endpoint on the head's Serve proxy.

    Raises:
        ServeError: no head runs for this DGPT_HOME, or the dashboard did not answer.
    """
    rows = []
    for app in status(settings).apps:
        route = app.route_prefix
        rows.append({
            "app": app.name,
            "route": route,
            "url": f"{settings.serve_url}{route}" if route else None,
            "status": app.status,
            "replicas": app.replicas_per_donor(),
            "replicas_total": sum(app.replicas_per_donor().values()),
        })
    return rows

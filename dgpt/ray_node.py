"""The `ray start --block` command lines of dgpt's nodes, head and donors, built in one place.

Every port a node listens on is fixed (``ray_node_port_base`` and on, ``ray_worker_ports``),
so an operator can open exactly these in a firewall (README: "ports to open"). No Ray import:
this only builds argv.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dgpt.config import node_ports, parse_port_range


@dataclass(frozen=True)
class NodePorts:
    """Where one Ray node listens: its block of fixed ports and its workers' range."""

    base: int
    workers: str  # "START-END"

    def argv(self, head: bool) -> list[str]:
        p = node_ports(self.base)
        lo, hi = parse_port_range(self.workers)
        out = [
            f"--node-manager-port={p['node manager']}",
            f"--object-manager-port={p['object manager']}",
            f"--dashboard-agent-grpc-port={p['dashboard agent gRPC']}",
            f"--dashboard-agent-listen-port={p['dashboard agent HTTP']}",
            f"--runtime-env-agent-port={p['runtime-env agent']}",
            f"--metrics-export-port={p['metrics export']}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
        ]
        if head:
            out.append(f"--ray-client-server-port={p['Ray client server']}")
        return out

    def head_env(self) -> dict[str, str]:
        """Environment of the head's `ray start`: Ray reads these two ports from it, not flags."""
        p = node_ports(self.base)
        return {"AUTOSCALER_METRIC_PORT": str(p["autoscaler metrics"]),
                "DASHBOARD_METRIC_PORT": str(p["dashboard metrics"])}

    @property
    def reachable_ports(self) -> tuple[int, int]:
        """The two ports every other node dials on this one (node manager, object manager)."""
        p = node_ports(self.base)
        return p["node manager"], p["object manager"]


@dataclass(frozen=True)
class NodeSpec:
    """What one `ray start --block` is given."""

    ports: NodePorts
    labels: Mapping[str, str]
    num_cpus: float
    num_gpus: int = 0
    node_ip: str | None = None
    temp_dir: Path | None = None
    memory_bytes: int | None = None
    object_store_bytes: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _common(spec: NodeSpec, head: bool) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(spec.labels.items()))
    out = [f"--num-cpus={spec.num_cpus:g}", f"--num-gpus={spec.num_gpus}", f"--labels={labels}",
           *spec.ports.argv(head), "--disable-usage-stats"]
    if spec.memory_bytes is not None:
        out.append(f"--memory={spec.memory_bytes}")
    if spec.object_store_bytes is not None:
        out.append(f"--object-store-memory={spec.object_store_bytes}")
    if spec.resources:
        out.append(f"--resources={json.dumps(dict(spec.resources))}")
    if spec.node_ip:
        out.append(f"--node-ip-address={spec.node_ip}")
    if spec.temp_dir is not None:
        out.append(f"--temp-dir={spec.temp_dir}")
    return out


def head_argv(spec: NodeSpec, gcs_port: int, dashboard_host: str, dashboard_port: int) -> list[str]:
    """`ray start --head --block` for the head node."""
    return [ray_bin(), "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-host={dashboard_host}",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", *_common(spec, head=True)]


def donor_argv(spec: NodeSpec, gcs_address: str) -> list[str]:
    """`ray start --address ... --block` for a donor node."""
    return [ray_bin(), "start", "--block", f"--address={gcs_address}", *_common(spec, head=False)]

"""Fixed Ray ports: refused up front when they clash, sliced for simulated donors, in every argv."""

from __future__ import annotations

import pytest

from dgpt.config import load_settings, node_ports
from dgpt.exceptions import ConfigError, FabricError
from dgpt.head.fabric import local_port_layout, private_settings
from dgpt.ray_node import NodePorts, NodeSpec, donor_argv, head_argv


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"ray_port": 10500}, "ray_port=10500 lies inside ray_worker_ports 10002-19999"),
    ({"ray_node_port_base": 12000}, "ray_node_port_base+0 (node manager)=12000 lies inside"),
    ({"api_port": 6382}, "both port 6382"),
    ({"ray_worker_ports": "30000-30005"}, "at least 16"),
    ({"ray_worker_ports": "lots"}, "START-END"),
])
def test_a_port_that_would_clash_is_refused_saying_why(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides, env={})
    assert needle in str(err.value)


def test_local_donors_get_their_own_ports_and_worker_slices(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = load_settings({"home": tmp_path, "ray_worker_ports": "10000-10399"}, env={})
    head, donors = local_port_layout(s, 3)
    assert head == "10000-10099" and [w for _, w in donors] == ["10100-10199", "10200-10299", "10300-10399"]
    assert [b for b, _ in donors] == [6390, 6400, 6410]
    blocks = [set(node_ports(b).values()) for b in [s.ray_node_port_base] + [b for b, _ in donors]]
    assert all(not (a & b) for i, a in enumerate(blocks) for b in blocks[i + 1:]), "no two nodes share a port"
    with pytest.raises(FabricError, match="too small"):
        local_port_layout(load_settings({"home": tmp_path, "ray_worker_ports": "10000-10040"}, env={}), 3)


def test_private_settings_pick_free_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = private_settings(tmp_path), private_settings(tmp_path)
    assert a.ray_node_port_base != b.ray_node_port_base or a.ray_worker_ports != b.ray_worker_ports


def test_every_node_port_is_in_the_ray_start_command() -> None:
    ports = NodePorts(6380, "10002-10999")
    spec = NodeSpec(ports=ports, labels={"dgpt.io/role": "donor"}, num_cpus=2, node_ip="10.0.0.5")
    donor = donor_argv(spec, "10.0.0.1:6379")
    for flag in ("--node-manager-port=6380", "--object-manager-port=6381", "--dashboard-agent-grpc-port=6382",
                 "--dashboard-agent-listen-port=6383", "--runtime-env-agent-port=6384", "--metrics-export-port=6385",
                 "--min-worker-port=10002", "--max-worker-port=10999", "--node-ip-address=10.0.0.5",
                 "--address=10.0.0.1:6379"):
        assert flag in donor
    assert not any(a.startswith("--ray-client-server-port") for a in donor)
    head = head_argv(spec, 6379, "0.0.0.0", 8265)
    assert "--ray-client-server-port=6386" in head and "--head" in head
    assert ports.reachable_ports == (6380, 6381)

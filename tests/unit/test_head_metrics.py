"""The control plane's Prometheus metrics without Ray: the named series, bounded labels, the
metrics server over real HTTP, heartbeat timing with the long-poll hold excluded, the scrape
config in deployments/, and the settings that place them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from autoscaler.decisions import ActivateDonor
from dgpt.config import load_settings
from dgpt.contract import LABEL_DEVICE_CLASS, LABEL_ROLE
from dgpt.exceptions import ConfigError
from dgpt.head.api import build_app
from dgpt.head.metrics import CountingActuator, HeadMetrics, MetricsServer, TimedHeld, ray_targets
from dgpt.head.ray_adapter import RayNode
from dgpt.processes import free_port
from dgpt.sdk.client import DonorClient
from dgpt.sdk.models import Heartbeat
from tests.unit.conftest import ApiServer, _NoRay
from tests.unit.test_api import _join_token, _req
from tests.unit.test_registry import Clock, FakeRay, _activate, _registry, _request

ROOT = Path(__file__).resolve().parents[2]
NAMED = ("dgpt_donors", "dgpt_sessions_ended_total", "dgpt_heartbeat_seconds_bucket", "dgpt_heartbeat_seconds_count",
         "dgpt_autoscaler_decisions_total", "dgpt_placement_seconds", "dgpt_credit_issued_total",
         "dgpt_credit_voided_total", "dgpt_credit_ledger", "dgpt_metered_resource_seconds_total",
         "dgpt_verification_outcomes_total", "dgpt_storage_durability_margin")


def _value(text: str, series: str) -> float:
    """The value of one exact series line (``name{labels}``) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the metrics:\n{text}")


class _Served:
    """build_app instrumented as the control plane does, on uvicorn, over ApiServer's registry."""

    def __init__(self, api_server: ApiServer) -> None:
        self.metrics = HeadMetrics(api_server.registry.counts)
        app = self.metrics.instrument(build_app(api_server.registry, _NoRay(), held=TimedHeld()))
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_heartbeats_are_timed_without_their_hold_and_labels_stay_bounded(api_server: ApiServer) -> None:
    served = _Served(api_server)
    try:
        token = _join_token(api_server)
        with DonorClient(served.url) as d:
            donors = [d.register(_req(f"m{i}"), token) for i in range(12)]
            started = time.monotonic()
            d.heartbeat(donors[0].donor_id, donors[0].donor_secret, Heartbeat(state="standby", wait_s=1.5))
            held_s = time.monotonic() - started
            for r in donors:
                d.heartbeat(r.donor_id, r.donor_secret, Heartbeat(state="standby"))
        assert held_s >= 1.4, "the first heartbeat was held (long-poll)"
        text = served.metrics.text().decode()
        assert _value(text, "dgpt_heartbeat_seconds_count") == 13
        assert _value(text, "dgpt_heartbeat_seconds_sum") < 1.0, "the hold is not heartbeat latency"
        assert _value(text, 'dgpt_api_request_seconds_count{code="2xx",operation="registerDonor"}') == 12
        assert _value(text, 'dgpt_donors{state="standby"}') == 12
        assert not any(r.donor_id in text for r in donors), "no donor id is a label value"
        lines = len(text.splitlines())
        with DonorClient(served.url) as d:
            more = [d.register(_req(f"n{i}"), token) for i in range(20)]
            for r in more:
                d.heartbeat(r.donor_id, r.donor_secret, Heartbeat(state="standby"))
        assert len(served.metrics.text().decode().splitlines()) == lines, "more donors, not more series"
        httpx.get(f"{served.url}/api/v1/donors/nobody%2Fx")
        assert "unmatched" in served.metrics.text().decode() or "getDonor" in served.metrics.text().decode()
    finally:
        served.stop()


def test_sessions_decisions_credit_and_hooks_are_counted(tmp_path: Path) -> None:
    ray, clock = FakeRay(), Clock()
    reg = _registry(tmp_path, ray, clock)
    metrics = HeadMetrics(reg.counts)
    reg.on_session_end = metrics.session_ended
    token = reg.create_token("join", "t").token
    assert token
    a = reg.register(_request("a"), token)
    _activate(reg, ray, clock, a.donor_id, a.donor_secret, "node-a")
    ray.die("node-a")
    reg.tick()
    actuator = CountingActuator(metrics, reg, 10.0)
    actuator.apply((ActivateDonor(a.donor_id, "demand"), ActivateDonor("d-ghost", "demand")), clock())
    metrics.credit_changed(2.5, 0.0)
    metrics.credit_changed(0.0, 1.0)
    metrics.record_verification("disagreed")
    with pytest.raises(ValueError, match="outcome must be one of"):
        metrics.record_verification("maybe")
    text = metrics.text().decode()
    assert _value(text, 'dgpt_sessions_ended_total{kind="lost"}') == 1
    assert _value(text, 'dgpt_sessions_ended_total{kind="drained"}') == 0
    assert _value(text, 'dgpt_autoscaler_decisions_total{action="activate",result="ok"}') == 1
    assert _value(text, 'dgpt_autoscaler_decisions_total{action="ActivateDonor",result="refused"}') == 1
    assert _value(text, "dgpt_credit_issued_total") == 2.5 and _value(text, "dgpt_credit_voided_total") == 1.0
    assert _value(text, 'dgpt_verification_outcomes_total{outcome="disagreed"}') == 1
    assert "dgpt_storage_durability_margin NaN" in text
    metrics.durability_margin(lambda: 3.0)
    assert _value(metrics.text().decode(), "dgpt_storage_durability_margin") == 3.0
    with metrics.placement_timer("placement_view"):
        pass
    assert _value(metrics.text().decode(), 'dgpt_placement_seconds_count{call="placement_view"}') == 1
    fresh = HeadMetrics(dict).text().decode()
    for name in NAMED:
        assert f"\n{name}" in fresh, f"{name} is exposed before its first event"


def test_the_metrics_server_serves_metrics_and_rays_targets(tmp_path: Path) -> None:
    s = load_settings({"home": tmp_path, "metrics_port": free_port(), "http_host": "127.0.0.1",
                       "ray_node_port_base": 7000}, env={})
    nodes = [RayNode("h", True, {LABEL_ROLE: "head"}, {}, "10.0.0.1", True, metrics_export_port=7005),
             RayNode("a", True, {LABEL_ROLE: "donor", LABEL_DEVICE_CLASS: "laptop"}, {}, "10.0.0.2", False,
                     metrics_export_port=6395),
             RayNode("b", True, {LABEL_ROLE: "donor", LABEL_DEVICE_CLASS: "laptop"}, {}, "10.0.0.3", False,
                     metrics_export_port=6395),
             RayNode("gone", False, {LABEL_ROLE: "donor"}, {}, "10.0.0.4", False, metrics_export_port=6395)]
    server = MetricsServer(HeadMetrics(lambda: {"active": 2}), s, lambda: nodes).start()
    try:
        base = f"http://127.0.0.1:{s.metrics_port}"
        r = httpx.get(f"{base}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert _value(r.text, 'dgpt_donors{state="active"}') == 2
        targets = httpx.get(f"{base}/ray/targets").json()
        assert targets == ray_targets(nodes, s)
        by = {(t["labels"]["ray_component"], t["labels"]["dgpt_role"]): t["targets"] for t in targets}
        assert by[("node", "donor")] == ["10.0.0.2:6395", "10.0.0.3:6395"], "live nodes only"
        assert by[("node", "head")] == ["10.0.0.1:7005"]
        assert by[("autoscaler", "head")] == ["10.0.0.1:7007"] and by[("dashboard", "head")] == ["10.0.0.1:7008"]
        assert httpx.get(f"{base}/nope").status_code == 404
        with pytest.raises(Exception, match="DGPT_METRICS_PORT"):
            MetricsServer(HeadMetrics(dict), s, lambda: [])  # the port is taken: said, naming the setting
    finally:
        server.stop()


def test_the_scrape_config_follows_the_default_port() -> None:
    config = yaml.safe_load((ROOT / "deployments" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    port = load_settings(env={}).metrics_port
    assert jobs["dgpt"]["static_configs"][0]["targets"] == [f"HEAD:{port}"]
    assert jobs["ray"]["http_sd_configs"][0]["url"] == f"http://HEAD:{port}/ray/targets"


def test_metrics_settings_are_checked_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics_port and api_port are both port 8080"):
        load_settings({"home": tmp_path, "metrics_port": 8080}, env={})
    with pytest.raises(ConfigError, match="metrics_port=12000 lies inside ray_worker_ports"):
        load_settings({"home": tmp_path}, env={"DGPT_METRICS_PORT": "12000"})
    with pytest.raises(ConfigError, match="DGPT_METRICS_PORT='lots'"):
        load_settings({"home": tmp_path}, env={"DGPT_METRICS_PORT": "lots"})
    with pytest.raises(ConfigError, match="DGPT_CREDIT_INTERVAL_S='0.5'"):
        load_settings({"home": tmp_path}, env={"DGPT_CREDIT_INTERVAL_S": "0.5"})

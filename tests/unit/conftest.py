"""Unit tests never start Ray: ray.init raises here."""

import pytest

#: Ambient Ray settings a developer's shell (or an earlier test module) may hold: the Ray Jobs
#: client reads them in place of the address it is given, and its auth from them.
RAY_AMBIENT = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    for key in RAY_AMBIENT:
        monkeypatch.delenv(key, raising=False)
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; put this test in tests/integration/")

    monkeypatch.setattr(ray, "init", refuse)


class _NoRay:
    """The head services the API needs from Ray, absent in unit tests."""

    ray_address = "127.0.0.1:1"
    dashboard_url = "http://127.0.0.1:1"
    tls_fingerprint = None

    def autoscaler_status(self):
        return {"ticks": 0, "errors": 0, "recent": []}

    def cluster_resources(self):
        return {}, {}

    def jobs(self):
        raise RuntimeError("no Ray in unit tests")


class ApiServer:
    """The real control-plane API (FastAPI on uvicorn, a real registry on a real SQLite file)
    in a thread on a free port; only Ray is absent (no node table, no jobs)."""

    def __init__(self, home, services=None, storage=None):
        import threading
        import time

        import uvicorn

        from dgpt.config import load_settings
        from dgpt.head.api import build_app
        from dgpt.head.paths import head_paths
        from dgpt.head.registry import Registry
        from dgpt.head.store import RegistryStore
        from dgpt.processes import free_port, write_secret

        self.home = home
        port = free_port()
        self.settings = load_settings({"home": home, "api_port": port, "node_ip": "127.0.0.1", "http_host": "127.0.0.1",
                                       "heartbeat_interval_s": 1.0, "standby_heartbeat_interval_s": 30.0}, env={})
        paths = head_paths(home)
        paths["dir"].mkdir(parents=True, exist_ok=True)
        self.api_key = "dgpt_api_unit-test-key-0123456789"
        write_secret(paths["api_key"], self.api_key)
        write_secret(paths["ray_token"], "ray-token")
        store = RegistryStore(paths["db"])
        store.ensure_token("api", self.api_key, "test", time.time())
        self.registry = Registry(self.settings, store, None, "127.0.0.1:1", paths["ray_token"])
        self.app = build_app(self.registry, services or _NoRay(), storage=storage)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/api/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.registry.store.close()


@pytest.fixture
def api_server(tmp_path):
    server = ApiServer(tmp_path)
    yield server
    server.stop()

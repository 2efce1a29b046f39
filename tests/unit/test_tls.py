"""The control plane's TLS: the head's certificate, pins carried by join tokens, and clients that
refuse any other certificate before sending a secret (a real uvicorn server over HTTPS)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from dgpt.config import load_settings
from dgpt.exceptions import ConfigError, HeadUnreachable
from dgpt.processes import free_port
from dgpt.sdk.client import Client
from dgpt.tls import HeadTrust, PinMismatch, ensure_certificate, fingerprint, pin_token, split_token


class _Server:
    """A real HTTPS server with a certificate of its own; it records what reached it."""

    def __init__(self, folder: Path) -> None:
        self.cert, self.key = ensure_certificate(folder, ["127.0.0.1"])
        self.seen: list[str] = []
        app = FastAPI()

        @app.get("/api/v1/health")
        async def health(request: Request) -> dict:
            self.seen.append(request.headers.get("authorization", ""))
            return {"status": "ok"}

        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ssl_certfile=str(self.cert), ssl_keyfile=str(self.key)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the HTTPS server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    with _Server(tmp_path / "head") as s:
        yield s


def test_the_certificate_is_made_once_and_kept(tmp_path: Path) -> None:
    cert, key = ensure_certificate(tmp_path, ["10.0.0.5", "head.example"])
    pin = fingerprint(cert.read_text())
    assert pin.startswith("sha256:") and len(pin) == 7 + 64
    assert key.stat().st_mode & 0o777 == 0o600, "the private key is the owner's alone"
    again, _ = ensure_certificate(tmp_path, ["10.0.0.6"])
    assert fingerprint(again.read_text()) == pin, "a restart keeps the certificate donors pinned"
    from cryptography import x509

    sans = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "head.example" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_a_join_token_carries_the_pin_and_only_the_secret_is_sent() -> None:
    pin = "sha256:" + "ab" * 32
    assert split_token(pin_token("dgpt_join_s3cret", pin)) == ("dgpt_join_s3cret", pin)
    assert split_token("dgpt_join_s3cret") == ("dgpt_join_s3cret", None)
    assert split_token(f"dgpt_join_x@{pin.upper().replace('SHA256', 'sha256')}")[1] == pin
    with pytest.raises(ConfigError, match="the fingerprint in --token-file"):
        split_token("dgpt_join_x@sha256:nothex", "--token-file")


def test_a_pinned_client_talks_to_the_head_and_keeps_its_certificate(server: _Server, tmp_path: Path) -> None:
    pin = fingerprint(server.cert.read_text())
    cache = tmp_path / "donor" / "head_cert.pem"
    with Client(server.url, "k", trust=HeadTrust(server.url, pin, cache=cache)) as c:
        assert c.health()
    assert fingerprint(cache.read_text()) == pin, "the pinned certificate is kept for later runs"
    # Later, without the pin at hand (e.g. `dgpt donor credit`), the kept certificate is trusted.
    with Client(server.url, "k", trust=HeadTrust(server.url, cache=cache)) as c:
        assert c.health()


def test_a_different_certificate_is_refused_before_any_secret_is_sent(server: _Server, tmp_path: Path) -> None:
    other, _ = ensure_certificate(tmp_path / "impostor", ["127.0.0.1"])
    wrong = fingerprint(other.read_text())
    with Client(server.url, "the-api-key", fingerprint=wrong) as c, pytest.raises(PinMismatch) as err:
        c.health()
    assert fingerprint(server.cert.read_text()) in err.value.message and wrong in err.value.message
    assert server.seen == [], "nothing reached the server"
    # A client that kept the impostor's certificate cannot complete a handshake with the real head.
    cache = tmp_path / "kept.pem"
    cache.write_text(other.read_text())
    with Client(server.url, "the-api-key", trust=HeadTrust(server.url, cache=cache)) as c, \
            pytest.raises(HeadUnreachable, match="does not trust") as unreachable:
        c.health()
    assert "DGPT_HEAD_FINGERPRINT" in str(unreachable.value.hint)
    assert server.seen == []


def test_an_unpinned_client_does_not_trust_a_self_signed_head(server: _Server) -> None:
    with Client(server.url, "k") as c, pytest.raises(HeadUnreachable, match="does not trust"):
        c.health()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/api/v1/health", timeout=5)
    assert server.seen == []


def test_tls_settings_are_validated_and_auto_follows_the_listen_address(tmp_path: Path) -> None:
    def load(**values: object):
        return load_settings({"home": tmp_path, **values}, env={})

    assert load(http_host="0.0.0.0").tls_enabled and load(http_host="0.0.0.0").local_head_url.startswith("https://")
    assert not load(http_host="127.0.0.1").tls_enabled
    assert load(http_host="127.0.0.1", tls="on").tls_enabled
    assert not load(http_host="0.0.0.0", tls="off").tls_enabled
    def from_env(**env: str):
        return load_settings({"home": tmp_path}, env=env)

    with pytest.raises(ConfigError, match="DGPT_HEAD_FINGERPRINT"):
        from_env(DGPT_HEAD_FINGERPRINT="md5:1234")
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        from_env(DGPT_TLS_CERT_FILE=str(tmp_path))
    with pytest.raises(ConfigError, match="tls_cert_file .* is not a file"):
        from_env(DGPT_TLS_CERT_FILE=str(tmp_path / "nope.pem"), DGPT_TLS_KEY_FILE=str(tmp_path / "nope.key"))
    with pytest.raises(ConfigError, match="DGPT_TLS"):
        from_env(DGPT_TLS="maybe")


@pytest.mark.parametrize("http_host", ["127.0.0.1", "0.0.0.0"])
def test_later_commands_of_the_home_speak_what_the_running_head_speaks(tmp_path: Path, http_host: str) -> None:
    import json

    from dgpt.head.process import RUNTIME_KEYS

    head = load_settings({"home": tmp_path, "http_host": http_host, "api_port": 23456}, env={})
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "head.json").write_text(json.dumps(
        {"settings": head.model_dump(include=set(RUNTIME_KEYS), mode="json")}))
    client = load_settings(env={"DGPT_HOME": str(tmp_path)})  # `dgpt status` with DGPT_HOME alone
    assert client.local_head_url == head.local_head_url
    assert client.local_head_url.startswith("https://" if http_host == "0.0.0.0" else "http://")

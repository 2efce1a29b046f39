"""The CLI with Typer's CliRunner: one sub-app per noun, each command against a real API server (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgpt.cli import donor, head, job, serve, storage, token
from dgpt.cli.main import app
from dgpt.exceptions import ConfigError, DonorError
from dgpt.sdk.client import DonorClient
from dgpt.sdk.models import DeviceProfile, DonorCaps, RegisterRequest
from tests.unit.conftest import ApiServer

runner = CliRunner()
GIB = 2**30


def _env(api_server: ApiServer) -> dict[str, str]:
    return {"DGPT_HOME": str(api_server.home), "DGPT_API_PORT": str(api_server.settings.api_port),
            "DGPT_NODE_IP": "127.0.0.1", "DGPT_HTTP_HOST": "127.0.0.1", "COLUMNS": "200"}


@pytest.mark.parametrize(("module", "commands"), [
    (head.head_app, {"start", "stop"}),
    (donor.donor_app, {"join", "pause", "resume", "leave", "list", "credit"}),
    (job.job_app, {"submit", "status", "list", "logs", "stop"}),
    (token.token_app, {"create", "list", "revoke"}),
    (serve.serve_app, {"deploy", "status", "delete"}),
    (storage.storage_app, {"put", "get", "ls", "rm", "status"}),
])
def test_each_noun_is_its_own_typer_app(module, commands: set[str]) -> None:
    names = {c.name or c.callback.__name__ for c in module.registered_commands}  # type: ignore[union-attr]
    assert names == commands
    result = runner.invoke(app, [next(g.name for g in app.registered_groups if g.typer_instance is module), "--help"])
    assert result.exit_code == 0 and all(c in result.output for c in commands)


def test_root_carries_the_fabric_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "down", "status", "env", "config", "demo", "head", "donor", "job", "token", "serve",
                    "storage"):
        assert command in result.output


def test_config_and_env_show_the_effective_settings(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "--home", str(tmp_path)], env={"DGPT_API_PORT": "28080", "COLUMNS": "250"})
    assert result.exit_code == 0 and "DGPT_API_PORT" in result.output and "28080" in result.output
    result = runner.invoke(app, ["env", "--home", str(tmp_path)], env={"DGPT_API_PORT": "28080"})
    assert f"export DGPT_HOME={tmp_path}" in result.output
    assert "export DGPT_HEAD_URL=https://127.0.0.1:28080" in result.output  # it listens beyond loopback: TLS


def test_tokens_are_created_listed_and_revoked(api_server: ApiServer) -> None:
    env = _env(api_server)
    made = runner.invoke(app, ["token", "create", "--label", "laptops"], env=env)
    assert made.exit_code == 0, made.output
    token_id = made.output.split("join token ")[1].split(":")[0]
    listed = runner.invoke(app, ["token", "list"], env=env)
    assert token_id in listed.output and "laptops" in listed.output
    assert runner.invoke(app, ["token", "revoke", token_id], env=env).exit_code == 0
    assert api_server.registry.list_tokens()[-1].revoked_at is not None
    bad = runner.invoke(app, ["token", "create", "--kind", "root"], env=env)
    assert isinstance(bad.exception, ConfigError) and "--kind 'root'" in bad.exception.message


def test_donor_list_pages_and_filters(api_server: ApiServer) -> None:
    join = api_server.registry.create_token("join", "t").token
    assert join
    with DonorClient(api_server.url) as d:
        for i in range(7):
            d.register(RegisterRequest(name=f"dn{i}", device_class="laptop" if i % 2 else "desktop", owner=f"own{i}",
                                       profile=DeviceProfile(cpus=2, memory_bytes=4 * GIB, cpu_gflops=10.0),
                                       caps=DonorCaps(cpus=1, memory_bytes=GIB)), join)
    env = _env(api_server)
    first = runner.invoke(app, ["donor", "list", "--limit", "3"], env=env)
    assert first.exit_code == 0, first.output
    assert "dn0" in first.output and "dn3" not in first.output and "--after" in first.output
    cursor = first.output.split("--after ")[1].split("`")[0].strip()
    rest = runner.invoke(app, ["donor", "list", "--after", cursor], env=env)
    assert "dn3" in rest.output and "dn6" in rest.output and "dn0" not in rest.output
    laptops = runner.invoke(app, ["donor", "list", "--class", "laptop"], env=env)
    assert "dn1" in laptops.output and "dn0" not in laptops.output
    status = runner.invoke(app, ["status", "--json"], env=env)
    data = json.loads(status.output)
    assert data["donors_by_state"] == {"registered": 7} and data["donors_total"] == 7
    assert "error" in data["endpoints"], "no Serve without a head: said, not raised"


def test_pause_and_resume_flip_the_switch_of_a_local_donor(tmp_path: Path) -> None:
    state = tmp_path / "donors" / "donor-1"
    state.mkdir(parents=True)
    (state / "donor.json").write_text(json.dumps({"donor_id": "d-1", "name": "donor-1"}))
    assert runner.invoke(app, ["donor", "pause", "--donor-id", "donor-1", "--home", str(tmp_path)]).exit_code == 0
    assert (state / "paused").exists()
    assert runner.invoke(app, ["donor", "resume", "--donor-id", "d-1", "--home", str(tmp_path)]).exit_code == 0
    assert not (state / "paused").exists()
    ghost = runner.invoke(app, ["donor", "pause", "--donor-id", "ghost", "--home", str(tmp_path)])
    assert isinstance(ghost.exception, DonorError) and "known here: d-1" in (ghost.exception.hint or "")


def test_join_refuses_a_temp_dir_too_long_for_rays_sockets(tmp_path: Path) -> None:
    long_dir = "/tmp/" + "x" * 60
    result = runner.invoke(app, ["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t",
                                 "--ray-temp-dir", long_dir, "--home", str(tmp_path)])
    assert isinstance(result.exception, ConfigError) and "--ray-temp-dir" in result.exception.message

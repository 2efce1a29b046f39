"""The CLI refuses bad flags, settings and states with a message naming the culprit (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dgpt.processes import free_port


def _dgpt(*args: str, home, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DGPT_")}
    full_env = {**base, "DGPT_HOME": str(home), "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "dgpt.cli.main", *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["donor", "join", "--token", "t"], {}, "--head is required"),
        (["donor", "join", "--head", "ftp://x", "--token", "t"], {}, "must start with http://"),
        (["donor", "join", "--head", "http://127.0.0.1:9"], {}, "--token (or --token-file) is required"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token-file", "/nonexistent"], {}, "--token-file"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--device-class", "toaster"], {},
         "--device-class 'toaster'"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--labels", "novalue"], {}, "--labels"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--labels", "dgpt.io/role=x"], {},
         "reserved"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--load-threshold", "lots"], {},
         "--load-threshold"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--owner", "bad owner!"], {}, "--owner"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--cpus", "100000"], {}, "--cpus"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--memory-gb", "0.001"], {},
         "--memory-gb"),
        (["donor", "join", "--head", "http://127.0.0.1:9", "--token", "t", "--gpus", "4"], {}, "--gpus 4"),
        (["env"], {"DGPT_HTTP_PORT": "99999"}, "DGPT_HTTP_PORT"),
        (["env"], {"DGPT_HEARTBEAT_INTERVAL_S": "-1"}, "DGPT_HEARTBEAT_INTERVAL_S"),
        (["env"], {"DGPT_ALLOWED_HOURS": "25-3"}, "DGPT_ALLOWED_HOURS"),
        (["env"], {"DGPT_IDLE_CALM_S": "0"}, "DGPT_IDLE_CALM_S"),
        (["env"], {"DGPT_FAULT_INJECT": "lies"}, "DGPT_FAULT_INJECT"),
        (["head", "start"], {"DGPT_FAULT_INJECT": "wrong-results"}, "is a drill for donors, not the head"),
        (["token", "create", "--kind", "root"], {}, "--kind 'root'"),
        (["job", "submit"], {}, "entrypoint is missing"),
        (["job", "submit", "--runtime-env-json", "[1]", "--", "python", "x.py"], {}, "--runtime-env-json"),
        (["donor", "pause", "--donor-id", "ghost"], {}, "no donor 'ghost'"),
        (["up", "--donors", "99"], {}, "--donors"),
        (["up", "--donors", "2", "--min-active", "3"], {}, "--min-active 3 must be between 0 and --donors (2)"),
        (["env"], {"DGPT_MIN_ACTIVE_DONORS": "9", "DGPT_MAX_ACTIVE_DONORS": "3"}, "min_active_donors (9)"),
    ],
)
def test_bad_input_names_the_culprit(tmp_path, args, env, needle) -> None:
    out = _dgpt(*args, home=tmp_path, **env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert needle in text, text
    assert "Traceback" not in text


def test_no_head_tells_the_user_what_to_do(tmp_path) -> None:
    out = _dgpt("status", home=tmp_path, DGPT_HTTP_PORT=str(free_port()))
    assert out.returncode == 1
    assert "cannot reach the dgpt head" in out.stderr and "dgpt up" in out.stderr


def test_bad_config_file_is_named(tmp_path) -> None:
    (tmp_path / "config.toml").write_text("ray_port = 'abc'\nbogus = 1\n")
    out = _dgpt("env", home=tmp_path)
    assert out.returncode == 2
    assert "config.toml" in out.stderr and "bogus" in out.stderr


def test_import_dgpt_stays_light() -> None:
    code = ("import sys, dgpt, dgpt.placement, dgpt.sdk.client, dgpt.donor.agent\n"
            "heavy = [m for m in ('torch', 'ray.serve', 'ray') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""The REST API keeps its OpenAPI contract under fuzzing, against a real head.

A head with no donors (Ray head, control plane, Serve proxy: ``fabric.up(settings, 0)``)
is fuzzed by schemathesis' own CLI: examples, coverage, fuzzing and the stateful phase that
follows the schema's links (register -> heartbeat -> leave, create token -> revoke, submit
job -> status / logs / stop). Its checks: no 5xx, only documented statuses, answers that
validate against the declared models, and no operation that ignores its credentials.

Credentials for each security scheme come from the hooks (``schemathesis_hooks.py``): the
head's API key, a join token, and the secret of a donor registered before the run (or of
one the fuzzer registered). The verdict is read from schemathesis' own NDJSON report: no
failure, no error, and every operation answered at least once with something other than 401.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.paths import head_paths
from dgpt.sdk.client import Client, DonorClient
from dgpt.sdk.models import DeviceProfile, DonorCaps, RegisterRequest
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HERE = Path(__file__).parent
REPO = HERE.parent.parent
#: The fuzzing run's own limit; with the head's start the test stays well under 3 minutes.
FUZZ_TIMEOUT_S = 150
GIB = 2**30


@pytest.fixture(scope="module")
def empty_head(ray_test_env: None) -> Iterator[Settings]:
    """A head with no donors. A 1 s standby interval bounds how long a fuzzed heartbeat is held."""
    home = Path(tempfile.mkdtemp(prefix="dgpt-api-"))
    settings = fabric_settings(home, standby_heartbeat_interval_s=1.0)
    try:
        fabric.up(settings, 0, timeout_s=180)
        yield settings
    finally:
        fabric.down(settings)
        shutil.rmtree(home, ignore_errors=True)


def _known_objects(settings: Settings) -> dict[str, str]:
    """A donor and a finished job that exist before the run, and the credentials it uses."""
    key = head_paths(settings.home)["api_key"].read_text().strip()
    join_token = (head_paths(settings.home)["dir"] / "join_token").read_text().strip()
    with Client(settings.local_head_url, key) as client, DonorClient(settings.local_head_url) as donors:
        reg = donors.register(RegisterRequest(
            name="known-donor", device_class="desktop", owner="contract",
            profile=DeviceProfile(cpus=4, memory_bytes=8 * GIB, cpu_gflops=20.0),
            caps=DonorCaps(cpus=2, memory_bytes=2 * GIB)), join_token)
        job = client.submit_job("echo contract")
        wait_for(lambda: client.job(job.job_id).status in ("SUCCEEDED", "FAILED"), 120, "the known job to finish")
        # A job no node can run (the head offers no CPU to user work) is demand: the autoscaler
        # activates standby donors, so heartbeats are answered "activate" with Ray join arguments.
        client.submit_job("true", entrypoint_num_cpus=1)
        wait_for(lambda: client.donor(reg.donor_id).target == "active", 60, "the autoscaler to want the known donor")
        # Every token that exists now is one the run relies on: none may be revoked.
        protected = [t.token_id for t in client.tokens()]
    return {"API_FUZZ_API_KEY": key, "API_FUZZ_JOIN_TOKEN": join_token, "API_FUZZ_DONOR_ID": reg.donor_id,
            "API_FUZZ_DONOR_SECRET": reg.donor_secret, "API_FUZZ_JOB_ID": job.job_id,
            "API_FUZZ_PROTECTED_TOKENS": ",".join(protected)}


def _run_schemathesis(settings: Settings, env: dict[str, str], out: Path) -> subprocess.CompletedProcess[str]:
    schema_url = f"{settings.local_head_url}/api/openapi.json"
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml"), "run",
            schema_url, "--report", "ndjson", "--report-ndjson-path", str(out / "run.ndjson")]
    if os.environ.get("API_FUZZ_SEED"):  # reproduce a failed run: its seed is in the output
        argv += ["--seed", os.environ["API_FUZZ_SEED"]]
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "HYPOTHESIS_STORAGE_DIRECTORY": str(out / "hypothesis"), "NO_COLOR": "1"}
    return subprocess.run(argv, cwd=out, env=full_env, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)


def _read_report(path: Path) -> tuple[dict[tuple[str, str], Counter[int]], list[str], list[str]]:
    """From schemathesis' NDJSON events: answers per operation, failed checks, errors."""
    answers: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    failures: list[str] = []
    errors: list[str] = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        kind, body = next(iter(event.items()))
        if kind in ("NonFatalError", "FatalError"):
            errors.append(f"{kind}: {body.get('label', '')} {body.get('info', body)}")
        if kind != "ScenarioFinished":
            continue
        recorder = body["recorder"]
        cases = {cid: c["value"] for cid, c in recorder.get("cases", {}).items()}
        for cid, interaction in (recorder.get("interactions") or {}).items():
            case, response = cases.get(cid), interaction.get("response")
            if case is None or response is None:
                continue
            # Requests with a method the operation does not declare (405 probes) are not its answers.
            if interaction["request"]["method"].upper() == case["method"].upper():
                answers[(case["method"].upper(), case["path"])][response["status_code"]] += 1
        for cid, checks in (recorder.get("checks") or {}).items():
            case = cases.get(cid) or {}
            for check in checks:
                if check.get("status") != "success":
                    failure = (check.get("failure_info") or {}).get("failure") or {}
                    failures.append(f"{check.get('name')} on {case.get('method')} {case.get('path')} "
                                    f"(case {cid}): {failure.get('title', '')} {failure.get('message', '')}".rstrip())
    return answers, failures, errors


def _operations(schema: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops}


def test_the_api_keeps_its_contract_under_fuzzing(empty_head: Settings, tmp_path: Path) -> None:
    env = _known_objects(empty_head)
    schema = httpx.get(f"{empty_head.local_head_url}/api/openapi.json").json()
    done = _run_schemathesis(empty_head, env, tmp_path)
    tail = (done.stdout + done.stderr)[-6000:]
    answers, failures, errors = _read_report(tmp_path / "run.ndjson")
    operations = _operations(schema)
    print(done.stdout[done.stdout.rfind("SUMMARY") - 40:])
    print("answers per operation:")
    for method, path in sorted(operations, key=lambda op: op[::-1]):
        print(f"  {method:6} {path:42} {dict(sorted(answers.get((method, path), Counter()).items()))}")

    assert not failures, f"{len(failures)} check(s) failed:\n" + "\n".join(failures[:20]) + f"\n{tail}"
    assert not errors, f"{len(errors)} error(s):\n" + "\n".join(errors[:20]) + f"\n{tail}"
    assert done.returncode == 0, tail
    unanswered = sorted(op for op in operations if not (answers.get(op, Counter()) - Counter({401: 10**9})))
    assert not unanswered, f"only 401s (or nothing) for {unanswered}; answers: {dict(answers)}"
    # The run went deep: registrations, heartbeats and job submissions were accepted.
    assert answers[("POST", "/api/v1/donors")][201] > 0 and answers[("POST", "/api/v1/jobs")][201] > 0
    assert answers[("POST", "/api/v1/donors/{donor_id}/heartbeat")][200] > 0

    # The run's own credentials still work: it revoked none of them.
    with Client(empty_head.local_head_url, env["API_FUZZ_API_KEY"]) as client:
        live = {t.token_id for t in client.tokens() if t.revoked_at is None}
    assert set(env["API_FUZZ_PROTECTED_TOKENS"].split(",")) <= live


def test_ray_jobs_refusals_are_documented_statuses(empty_head: Settings) -> None:
    """What Ray itself refuses (found by its own message text, which a Ray upgrade may change)."""
    key = head_paths(empty_head.home)["api_key"].read_text().strip()
    api, auth = empty_head.api_url, {"Authorization": f"Bearer {key}"}
    first = httpx.post(f"{api}/jobs", json={"entrypoint": "true", "submission_id": "contract-dup"}, headers=auth,
                       timeout=60)
    again = httpx.post(f"{api}/jobs", json={"entrypoint": "true", "submission_id": "contract-dup"}, headers=auth,
                       timeout=60)
    assert first.status_code == 201 and again.status_code == 409, again.text
    assert "contract-dup" in again.json()["message"] and again.json()["hint"]
    bad_env = httpx.post(f"{api}/jobs", json={"entrypoint": "true", "runtime_env": {"pip": 5}}, headers=auth,
                         timeout=60)
    assert bad_env.status_code == 422 and "runtime_env" in bad_env.json()["message"], bad_env.text
    missing = httpx.get(f"{api}/jobs/contract-missing", headers=auth, timeout=60)
    assert missing.status_code == 404 and "contract-missing" in missing.json()["message"], missing.text

"""The REST API's contract: the committed schema, the checker that guards it, and the promises
the schema makes (one security scheme per operation, every error documented with ErrorBody,
links between operations), checked on the schema and over real HTTP.

The fuzzing run against a real head is tests/integration/test_api_contract.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dgpt.head.api import API_VERSION, _ray_jobs_error
from dgpt.head.api_schema import breaking_changes, committed_schema, live_schema, main
from tests.unit.conftest import ApiServer, _NoRay

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def live() -> Schema:
    return live_schema()


@pytest.fixture(scope="module")
def committed() -> Schema:
    return committed_schema()


def _ops(schema: Schema) -> dict[str, tuple[str, str, Schema]]:
    return {op["operationId"]: (method.upper(), path, op)
            for path, item in schema["paths"].items() for method, op in item.items()}


# ---------------------------------------------------------------- the committed contract


def test_the_live_schema_keeps_the_committed_contract(live: Schema, committed: Schema) -> None:
    problems = breaking_changes(committed, live)
    assert not problems, ("the API breaks its committed contract (dgpt/head/openapi-v1.json):\n  "
                          + "\n  ".join(problems) + "\nkeep the old shape, or release a new major version")
    assert live["info"]["version"] == API_VERSION
    assert committed["info"]["version"].split(".")[0] == API_VERSION.split(".")[0] == "1"


def test_the_check_command_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0
    assert "compatible with openapi-v1.json" in capsys.readouterr().out


# ---------------------------------------------------------------- the checker catches each break


def _schemas(s: Schema) -> Schema:
    return s["components"]["schemas"]


def _op(s: Schema, method: str, path: str) -> Schema:
    return s["paths"][path][method]


def _drop_field(model: str, name: str) -> Callable[[Schema], None]:
    def mutate(s: Schema) -> None:
        del _schemas(s)[model]["properties"][name]
        _schemas(s)[model]["required"] = [r for r in _schemas(s)[model].get("required", []) if r != name]
    return mutate


def _add_required_field(s: Schema) -> None:
    _schemas(s)["RegisterRequest"]["properties"]["region"] = {"type": "string"}
    _schemas(s)["RegisterRequest"]["required"].append("region")


def _add_required_param(s: Schema) -> None:
    _op(s, "get", "/api/v1/donors")["parameters"].append(
        {"in": "query", "name": "region", "required": True, "schema": {"type": "string"}})


def _param(s: Schema, name: str) -> Schema:
    return next(p for p in _op(s, "get", "/api/v1/donors")["parameters"] if p["name"] == name)


BREAKS: dict[str, tuple[Callable[[Schema], None], str]] = {
    "path removed": (lambda s: s["paths"].pop("/api/v1/cluster"), "/api/v1/cluster: path removed"),
    "operation removed": (lambda s: s["paths"]["/api/v1/donors"].pop("get"), "GET /api/v1/donors: operation removed"),
    "response status removed": (lambda s: _op(s, "get", "/api/v1/donors/{donor_id}")["responses"].pop("404"),
                                "GET /api/v1/donors/{donor_id}: response 404 removed"),
    "response field removed": (_drop_field("DonorView", "state"), ".state: field removed"),
    "request field removed": (_drop_field("Heartbeat", "owner_active"), "body.owner_active: field removed"),
    "response field made optional": (lambda s: _schemas(s)["DonorView"]["required"].remove("state"),
                                     ".state: field no longer always present"),
    "request field added as required": (_add_required_field, "POST /api/v1/donors: body.region: required field added"),
    "parameter added as required": (_add_required_param, "required query parameter 'region' added"),
    "request field made required": (lambda s: _schemas(s)["Heartbeat"]["required"].append("owner_active"),
                                    "body.owner_active: field made required"),
    "parameter made required": (lambda s: _param(s, "limit").update(required=True),
                                "query parameter 'limit' made required"),
    "enum value removed": (lambda s: _schemas(s)["DonorState"]["enum"].remove("gone"), "enum value(s) 'gone' removed"),
    "request type changed": (lambda s: _schemas(s)["Heartbeat"]["properties"]["wait_s"].update(type="string"),
                             "body.wait_s: type changed from number to string"),
    "response type changed": (
        lambda s: _schemas(s)["RegisterResponse"]["properties"]["heartbeat_interval_s"].update(type="string"),
        "201: body.heartbeat_interval_s: type changed from number to string"),
    "response type widened": (
        lambda s: _schemas(s)["RegisterResponse"]["properties"]["donor_id"].update(type=["string", "null"]),
        "body.donor_id: type changed from string to null | string"),
    "parameter type changed": (lambda s: _param(s, "limit")["schema"].update(type="string"),
                               "query parameter 'limit': type changed from integer to string"),
    "security changed": (lambda s: _op(s, "post", "/api/v1/jobs").update(security=[{"joinToken": []}]),
                         "POST /api/v1/jobs: security changed: apiKey no longer accepted"),
    "credentials now needed": (lambda s: _op(s, "get", "/api/v1/health").update(security=[{"apiKey": []}]),
                               "GET /api/v1/health: security changed: no credentials no longer accepted"),
    "link removed": (lambda s: _op(s, "post", "/api/v1/donors")["responses"]["201"]["links"].pop("heartbeat"),
                     "link 'heartbeat' removed"),
    "request limit tightened": (lambda s: _schemas(s)["RegisterRequest"]["properties"]["name"].update(maxLength=10),
                                "body.name: maxLength lowered to 10"),
    "response header removed": (lambda s: _op(s, "get", "/api/v1/donors")["responses"]["200"]["headers"]
                                .pop("X-Next-Cursor"), "header X-Next-Cursor removed"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_the_checker_catches_each_breaking_change(committed: Schema, name: str) -> None:
    mutate, expected = BREAKS[name]
    mutated = copy.deepcopy(committed)
    mutate(mutated)
    problems = breaking_changes(committed, mutated)
    assert any(expected in p for p in problems), f"{name}: expected {expected!r} among {problems}"


def _add_optional_everything(s: Schema) -> None:
    s["paths"]["/api/v1/regions"] = {"get": {"operationId": "listRegions", "responses": {"200": {"description": "ok"}}}}
    _op(s, "get", "/api/v1/donors")["parameters"].append(
        {"in": "query", "name": "region", "required": False, "schema": {"type": "string"}})
    _schemas(s)["RegisterRequest"]["properties"]["region"] = {"type": "string"}
    _schemas(s)["DonorView"]["properties"]["region"] = {"type": "string"}
    _schemas(s)["DonorView"]["required"].append("region")
    _schemas(s)["DonorState"]["enum"].append("hibernating")
    _op(s, "get", "/api/v1/cluster")["responses"]["404"] = {"description": "new", "content": {}}
    _schemas(s)["Heartbeat"]["properties"]["wait_s"]["maximum"] = 900.0  # accepts more
    _schemas(s)["Heartbeat"]["required"] = []  # a request field made optional


def test_additions_pass(committed: Schema) -> None:
    mutated = copy.deepcopy(committed)
    _add_optional_everything(mutated)
    assert breaking_changes(committed, mutated) == []


# ---------------------------------------------------------------- what the schema promises

SCHEMES = {
    "health": [],
    "registerDonor": [{"joinToken": []}],
    "heartbeatDonor": [{"donorSecret": []}],
    "leaveDonor": [{"donorSecret": []}],
    "getOwnCredit": [{"donorSecret": []}],
    "getOwnDonor": [{"donorSecret": []}],
    "leaveStorage": [{"donorSecret": []}],
    # The donor's owner (its secret) or an operator (an API key).
    "pauseDonor": [{"donorSecret": []}, {"apiKey": []}],
    "resumeDonor": [{"donorSecret": []}, {"apiKey": []}],
    # The pages hold no data: they load it with the credential typed into them.
    "pagesIndex": [],
    "operatorPage": [],
    "donorPage": [],
    "pageAsset": [],
}


def test_every_operation_declares_exactly_its_scheme(live: Schema) -> None:
    ops = _ops(live)
    assert len(ops) == 40
    for op_id, (method, path, op) in ops.items():
        assert op.get("security") == SCHEMES.get(op_id, [{"apiKey": []}]), f"{method} {path}"
        if op.get("security"):
            assert "401" in op["responses"], f"{method} {path} takes credentials but does not document 401"
        else:
            assert "401" not in op["responses"]


def test_every_error_answer_is_documented_with_errorbody(live: Schema) -> None:
    for method, path, op in _ops(live).values():
        for status, response in op["responses"].items():
            if int(status) >= 400:
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", f"{method} {path} {status}"
        assert "413" in op["responses"]  # the body limit applies before routing
        if "requestBody" in op:
            assert {"400", "422"} <= set(op["responses"]), f"{method} {path}"
    body = live["components"]["schemas"]["ErrorBody"]
    assert set(body["properties"]) == {"error", "message", "hint", "detail"} and body["required"] == ["error", "message"]


def test_links_lead_from_one_answer_to_the_next(live: Schema) -> None:
    ops = _ops(live)
    expected = {
        ("registerDonor", "201"): {"heartbeat": ("heartbeatDonor", "donor_id", "$response.body#/donor_id"),
                                   "leave": ("leaveDonor", "donor_id", "$response.body#/donor_id"),
                                   "get": ("getDonor", "donor_id", "$response.body#/donor_id")},
        ("heartbeatDonor", "200"): {"leave": ("leaveDonor", "donor_id", "$request.path.donor_id")},
        ("createToken", "201"): {"revoke": ("revokeToken", "token_id", "$response.body#/token_id")},
        ("submitJob", "201"): {"status": ("getJob", "job_id", "$response.body#/job_id"),
                               "logs": ("getJobLogs", "job_id", "$response.body#/job_id"),
                               "stop": ("stopJob", "job_id", "$response.body#/job_id")},
    }
    for (source, status), links in expected.items():
        declared = ops[source][2]["responses"][status]["links"]
        for name, (target, param, value) in links.items():
            assert declared[name] == {"operationId": target, "parameters": {param: value}}
            # The link names a real parameter of the target, and a field the source answers with.
            assert param in {p["name"] for p in ops[target][2]["parameters"]}
            if value.startswith("$response.body#/"):
                ref = ops[source][2]["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                model = live["components"]["schemas"][ref.rsplit("/", 1)[1]]
                assert value.rsplit("/", 1)[1] in model["required"]


# ---------------------------------------------------------------- error shapes over HTTP


def _shape(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert {"error", "message", "hint"} <= set(body) <= {"error", "message", "hint", "detail"}, body
    return dict(body)


def test_unparsable_bodies_get_400_naming_the_body(api_server: ApiServer) -> None:
    auth = {"Authorization": f"Bearer {api_server.api_key}", "Content-Type": "application/json"}
    for content in (b"{not json", b"\x9e\x91\xed\xff\x92\x19", b'{"kind": "join",'):
        r = httpx.post(f"{api_server.api}/tokens", content=content, headers=auth)
        assert r.status_code == 400, r.text
        assert _shape(r)["detail"] == [{"field": "body", "problem": r.json()["detail"][0]["problem"]}]
        assert r.json()["message"].startswith("body: ")
    assert len(httpx.get(f"{api_server.api}/tokens", headers=auth).json()) == 1, "nothing was created"


def test_an_undeclared_method_gets_405_with_allow(api_server: ApiServer) -> None:
    r = httpx.put(f"{api_server.api}/tokens", headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 405 and _shape(r)["error"] == "method not allowed"
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}


def test_an_oversize_body_gets_413_in_the_error_shape(api_server: ApiServer) -> None:
    r = httpx.request("GET", f"{api_server.api}/health", content=b"x" * (2 << 20))
    assert r.status_code == 413 and _shape(r)["error"] == "payload too large"


def test_an_unexpected_failure_gets_500_in_the_error_shape(api_server: ApiServer) -> None:
    # The registry's SQLite file closed under it: a server fault, not the caller's.
    api_server.registry.store.close()
    r = httpx.post(f"{api_server.api}/tokens", json={"kind": "join"},
                   headers={"Authorization": f"Bearer {api_server.api_key}"})
    assert r.status_code == 500 and _shape(r)["error"] == "internal error" and "ProgrammingError" in r.json()["message"]


class _DeadJobServer(_NoRay):
    """Ray's job server at a port nothing listens on: what a restarting head looks like.

    The port stays bound (never listening) while the test runs, so no other process can take
    it meanwhile: connecting is refused, every time."""

    def __init__(self) -> None:
        import socket

        self._held = socket.socket()
        self._held.bind(("127.0.0.1", 0))

    def jobs(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        # A header of its own: Ray reads its auth mode once per process, so after an
        # integration module (token auth) it would look for a token file this test has none
        # of, and fail before connecting. With the header it connects, and is refused.
        return JobSubmissionClient(f"http://127.0.0.1:{self._held.getsockname()[1]}",
                                   headers={"Authorization": "Bearer unit-test"})


def test_ray_jobs_unreachable_is_503(tmp_path: Any) -> None:
    server = ApiServer(tmp_path, services=_DeadJobServer())
    try:
        r = httpx.post(f"{server.api}/jobs", json={"entrypoint": "echo hi"},
                       headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60)
        assert r.status_code == 503 and "does not answer" in _shape(r)["message"] and r.json()["hint"], r.text
    finally:
        server.stop()


@pytest.mark.parametrize(("exc", "status"), [
    (RuntimeError("Request failed with status code 404: Job 'x' does not exist."), 404),
    (RuntimeError("Request failed with status code 400: Job with submission_id x already exists."), 409),
    (RuntimeError("Request failed with status code 400: entrypoint_num_cpus must be >= 0."), 422),
    (ValueError("runtime_env field 'pip' must be a list"), 422),
    (TypeError("expected str"), 422),
    (RuntimeError("Request failed with status code 500: boom"), 502),
])
def test_ray_jobs_failures_map_to_documented_statuses(exc: Exception, status: int) -> None:
    assert _ray_jobs_error(exc).status_code == status


def test_a_job_may_not_read_the_heads_disk(api_server: ApiServer) -> None:
    auth = {"Authorization": f"Bearer {api_server.api_key}"}
    for env, field in (({"working_dir": str(api_server.home)}, "runtime_env.working_dir"),
                       ({"py_modules": ["s3://bucket/m.zip", "/etc"]}, "runtime_env.py_modules"),
                       ({"pip": "/root/requirements.txt"}, "runtime_env.pip"),
                       ({"env_vars": {"A": 1}}, "runtime_env.env_vars")):
        r = httpx.post(f"{api_server.api}/jobs", json={"entrypoint": "ls", "runtime_env": env}, headers=auth)
        assert r.status_code == 422 and field in r.json()["message"], r.text


def test_a_donor_chosen_id_and_secret_must_be_usable_in_a_path_and_a_header(api_server: ApiServer) -> None:
    from tests.unit.test_api import _join_token, _req

    token = _join_token(api_server)
    for extra, field in (({"donor_id": "a/b"}, "donor_id"), ({"donor_secret": "s" * 16 + " \u00e9"}, "donor_secret"),
                         ({"labels": {"dgpt.io/role": "head"}}, "labels")):
        body = {**_req("chosen").model_dump(mode="json"), **extra}
        r = httpx.post(f"{api_server.api}/donors", json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 422 and field in r.json()["message"], r.text


def test_an_encoded_slash_stays_in_its_path_parameter(api_server: ApiServer) -> None:
    auth = {"Authorization": f"Bearer {api_server.api_key}"}
    token = httpx.post(f"{api_server.api}/tokens", json={"kind": "join"}, headers=auth).json()
    for path, field in (("donors/d-1%2Fheartbeat", "donor_id"), (f"tokens/{token['token_id']}%2F..", "token_id"),
                        ("jobs/x%2flogs", "job_id")):
        r = httpx.request("DELETE" if path.startswith("tokens") else "GET", f"{api_server.api}/{path}", headers=auth)
        assert r.status_code == 422 and field in r.json()["message"], (path, r.text)
    assert httpx.get(f"{api_server.api}/tokens", headers=auth).json()[-1]["revoked_at"] is None

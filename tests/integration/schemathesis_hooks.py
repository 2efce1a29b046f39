"""Schemathesis hooks for the API contract run (tests/integration/test_api_contract.py).

Loaded by the schemathesis process (``hooks`` in schemathesis.toml). The test passes the run's
credentials in ``API_FUZZ_*`` environment variables; these hooks give each operation the
credential of the scheme it declares, so authenticated operations are fuzzed past their
401:

- ``apiKey``: the head's API key; ``joinToken``: a join token;
- ``donorSecret``: the secret of the donor named in the path: a donor registered before the
  run, or one the fuzzer registered itself (its secret is read off the 201 answer);
- path parameters ``donor_id`` / ``job_id`` are often swapped for a donor and a job known
  to exist, so the 200 paths of single-object operations are reached, not only 404s;
- the run never revokes the credentials it uses, and every job it submits runs ``true``
  (the head has two cores: a fuzzed entrypoint is a shell command).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import schemathesis
from hypothesis import strategies as st

API_KEY = os.environ["API_FUZZ_API_KEY"]
JOIN_TOKEN = os.environ["API_FUZZ_JOIN_TOKEN"]
DONOR_ID = os.environ["API_FUZZ_DONOR_ID"]
DONOR_SECRET = os.environ["API_FUZZ_DONOR_SECRET"]
JOB_ID = os.environ.get("API_FUZZ_JOB_ID", "")
PROTECTED_TOKENS = frozenset(filter(None, os.environ.get("API_FUZZ_PROTECTED_TOKENS", "").split(",")))
HARMLESS_ENTRYPOINT = "true"

_secrets: dict[str, str] = {DONOR_ID: DONOR_SECRET}
_lock = threading.Lock()


def _schemes(operation: Any) -> set[str]:
    return {name for requirement in operation.definition.raw.get("security") or [] for name in requirement}


@schemathesis.auth(refresh_interval=None)
class SchemeCredentials:
    """The credential of the scheme the operation declares (none for ``health``)."""

    def get(self, case: Any, ctx: Any) -> str | None:
        schemes = _schemes(ctx.operation)
        if "apiKey" in schemes:
            return API_KEY
        if "joinToken" in schemes:
            return JOIN_TOKEN
        if "donorSecret" in schemes:
            donor_id = str((case.path_parameters or {}).get("donor_id", ""))
            with _lock:
                return _secrets.get(donor_id, DONOR_SECRET)
        return None

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


def _negative_at(case: Any, where: str) -> bool:
    from schemathesis.core.parameters import ParameterLocation

    return case.meta is not None and case.meta.is_negative_at(ParameterLocation[where])


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """A job the head would accept runs ``true``: a fuzzed entrypoint is a shell command."""
    body = case.body
    if case.method.upper() == "POST" and case.path == "/api/v1/jobs" and not _negative_at(case, "BODY") \
            and isinstance(body, dict) and isinstance(body.get("entrypoint"), str):
        case.body = {**body, "entrypoint": HARMLESS_ENTRYPOINT}
    return case


@schemathesis.hook
def flatmap_case(context: Any, case: Any) -> Any:
    """Half the positive cases address the known donor / job instead of a generated id."""
    params = case.path_parameters or {}
    known = {"donor_id": DONOR_ID, "job_id": JOB_ID}
    swap = {name: value for name, value in known.items() if name in params and value}
    if not swap or _negative_at(case, "PATH"):
        return st.just(case)

    def swapped(use_known: bool) -> Any:
        if use_known:
            case.path_parameters = {**params, **swap}
        return case

    return st.booleans().map(swapped)


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    # The pool of ids read off earlier answers (GET /tokens) must not revoke the run's own keys.
    if case.method.upper() == "DELETE" and case.path == "/api/v1/tokens/{token_id}":
        if str((case.path_parameters or {}).get("token_id")) in PROTECTED_TOKENS:
            case.path_parameters = {**case.path_parameters, "token_id": "0protected0"}


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if case.method.upper() == "POST" and case.path == "/api/v1/donors" and response.status_code == 201:
        try:
            answer = response.json()
        except ValueError:
            return
        if isinstance(answer, dict) and isinstance(answer.get("donor_id"), str):
            with _lock:
                _secrets[answer["donor_id"]] = str(answer.get("donor_secret", ""))

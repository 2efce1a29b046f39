"""Payload models: every field a peer sends is validated, and the message names it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dgpt.sdk.models import JobSubmitRequest, RegisterRequest, SessionImport

GIB = 2**30
BASE = {
    "name": "d1", "owner": "alice", "device_class": "desktop",
    "profile": {"cpus": 4, "memory_bytes": 8 * GIB, "cpu_gflops": 10.0},
    "caps": {"cpus": 2, "memory_bytes": 2 * GIB},
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"device_class": "toaster"}, "device_class"),
        ({"labels": {"dgpt.io/role": "head"}}, "reserved"),
        ({"labels": {"zone": "eu west"}}, "label value"),
        ({"name": "no spaces"}, "name"),
        ({"caps": {"cpus": 0, "memory_bytes": 2 * GIB}}, "cpus"),
        ({"caps": {"cpus": 1, "memory_bytes": 2 * GIB, "tpus": 1}}, "tpus"),
        ({"donor_secret": "short"}, "donor_secret"),
    ],
)
def test_register_request_names_the_bad_field(change, needle) -> None:
    with pytest.raises(ValidationError) as err:
        RegisterRequest.model_validate({**BASE, **change})
    assert needle in str(err.value)


def test_imported_session_must_end_after_it_starts() -> None:
    assert SessionImport(started_at=1.0, ended_at=2.0, ended_as="lost").ended_as == "lost"
    with pytest.raises(ValidationError, match="before started_at"):
        SessionImport(started_at=5.0, ended_at=2.0, ended_as="drained")
    with pytest.raises(ValidationError, match="ended_as"):
        SessionImport(started_at=1.0, ended_at=2.0, ended_as="vanished")


def test_jobs_may_not_carry_secrets() -> None:
    with pytest.raises(ValidationError, match="RAY_AUTH_TOKEN"):
        JobSubmitRequest(entrypoint="python x.py", runtime_env={"env_vars": {"RAY_AUTH_TOKEN": "t"}})
    assert JobSubmitRequest(entrypoint="python x.py", runtime_env={"env_vars": {"SEED": "1"}}).entrypoint

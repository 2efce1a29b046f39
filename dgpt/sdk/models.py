"""Versioned request and response models shared by the control plane, the SDK and donors.

Every payload a peer sends is validated here. A field added later gets a default, so an
older donor keeps working with a newer head (``v`` names the payload version).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgpt.contract import (
    RESERVED_LABEL_PREFIX,
    AgentState,
    DonorState,
    HeartbeatAction,
    LeaveReason,
    SessionEnd,
    Target,
)

#: 2: heartbeats carry ``wait_s`` and may be held (long-poll).
PAYLOAD_VERSION = 2

# Ray label keys/values: DNS-like names, optionally prefixed (dgpt.io/donor-id).
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

DEVICE_CLASSES = ("laptop", "desktop", "gpu-rig", "server", "phone", "unknown")

class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Strict(BaseModel):
    # Requests from peers: unknown fields are an error so typos are caught, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_label_key(key: str) -> str:
    if not _LABEL_KEY.match(key):
        raise ValueError(f"label key {key!r} is not a valid Ray label key (letters, digits, '-', '_', '.', optional 'prefix/')")
    if key.startswith(RESERVED_LABEL_PREFIX):
        raise ValueError(f"label key {key!r} is reserved: dgpt sets dgpt.io/* labels itself")
    return key


def check_label_value(value: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"label value {value!r} is not a valid Ray label value (at most 63 of letters, digits, '-', '_', '.')")
    return value


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric")
    return value


class GpuInfo(_Strict):
    name: str = Field(..., min_length=1, max_length=200)
    memory_bytes: int = Field(..., ge=0)


class DeviceProfile(_Strict):
    """What the donor agent measured on its device."""

    cpus: int = Field(..., ge=1, le=4096)
    memory_bytes: int = Field(..., ge=1)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpu_gflops: float = Field(..., ge=0, le=1e7)
    gpu_gflops: float = Field(0.0, ge=0, le=1e9)
    disk_free_bytes: int = Field(0, ge=0)
    platform: str = Field("", max_length=200)
    hostname: str = Field("", max_length=255)


class DonorCaps(_Strict):
    """What the donor offers: never more than its profile measured."""

    cpus: float = Field(..., gt=0, le=4096)
    memory_bytes: int = Field(..., ge=64 * 2**20)
    gpus: int = Field(0, ge=0, le=64)
    disk_bytes: int = Field(0, ge=0)


class RegisterRequest(_Strict):
    v: int = PAYLOAD_VERSION
    name: str = Field(..., min_length=1, max_length=63)
    device_class: str = "unknown"
    owner: str = Field(..., min_length=1, max_length=63)
    profile: DeviceProfile
    caps: DonorCaps
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    # A donor re-registering after the head lost or restarted keeps its identity.
    donor_id: str | None = Field(None, min_length=1, max_length=63)
    donor_secret: str | None = Field(None, min_length=16, max_length=256)
    # Where the head and other nodes reach this donor's raylet: checked before it is
    # activated (an older agent sends neither and is not checked).
    node_ip: str | None = Field(default=None, min_length=1, max_length=64)
    ray_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=8)

    @field_validator("node_ip")
    @classmethod
    def _node_ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"node_ip {v!r} is not an IP address") from None
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        return check_name(v, "owner")

    @field_validator("device_class")
    @classmethod
    def _device_class(cls, v: str) -> str:
        if v not in DEVICE_CLASSES:
            raise ValueError(f"device_class {v!r} is not one of {', '.join(DEVICE_CLASSES)}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_label_key(key)
            check_label_value(value)
        return v


class RegisterResponse(_Model):
    v: int = PAYLOAD_VERSION
    donor_id: str
    donor_secret: str
    heartbeat_interval_s: float
    reused: bool = False


class Heartbeat(_Strict):
    v: int = PAYLOAD_VERSION
    state: AgentState
    owner_active: bool = False
    owner_reason: str | None = Field(None, max_length=200)
    # Long-poll: how long the head may hold this heartbeat before answering. A standby
    # donor waits here, so an activation reaches it at once rather than at its next beat.
    wait_s: float = Field(default=0.0, ge=0, le=600)
    # Why the agent cannot join Ray now (e.g. the head's GCS port does not answer), with the fix.
    problem: str | None = Field(default=None, max_length=500)


class RayJoin(_Model):
    """Everything a donor needs for `ray start --address ... --block`."""

    gcs_address: str
    auth_token: str
    num_cpus: float
    num_gpus: int
    memory_bytes: int
    resources: dict[str, float]
    labels: dict[str, str]


class HeartbeatResponse(_Model):
    v: int = PAYLOAD_VERSION
    action: HeartbeatAction
    ray: RayJoin | None = None
    drain_deadline_s: float | None = None
    # When to send the next heartbeat, and how long the head may hold it (0: not at all).
    heartbeat_interval_s: float
    wait_s: float = 0.0
    reason: str = ""


class LeaveRequest(_Strict):
    v: int = PAYLOAD_VERSION
    reason: LeaveReason = LeaveReason.LEAVE
    deadline_s: float | None = Field(None, gt=0, le=3600)


class LeaveResponse(_Model):
    donor_id: str
    state: DonorState
    drain_requested: bool
    deadline_s: float
    message: str = ""


class SessionView(_Model):
    session_id: int
    node_id: str | None
    started_at: float
    ended_at: float | None = None
    ended_as: SessionEnd | None = None
    end_reason: str | None = None


class SessionImport(_Strict):
    """A finished session recorded elsewhere (history a donor brings): it seeds reliability."""

    started_at: float = Field(..., ge=0)
    ended_at: float = Field(..., ge=0)
    ended_as: SessionEnd

    @model_validator(mode="after")
    def _ordered(self) -> SessionImport:
        if self.ended_at < self.started_at:
            raise ValueError(f"ended_at ({self.ended_at}) is before started_at ({self.started_at})")
        return self


class DonorView(_Model):
    donor_id: str
    name: str
    state: DonorState
    target: Target = Target.STANDBY
    device_class: str
    owner: str
    node_id: str | None
    profile: DeviceProfile
    caps: DonorCaps
    resources: dict[str, float]
    labels: dict[str, str]
    registered_at: float
    last_heartbeat_at: float | None
    owner_active: bool = False
    drain_reason: str | None = None
    sessions: list[SessionView] = Field(default_factory=list)
    sessions_total: int = 0
    sessions_lost: int = 0
    uptime_s: float = 0.0
    # P(the donor stays the next hour), from its sessions and its device-class prior.
    reliability: float | None = None
    # Why it is not activated, with the fix (its Ray ports unreachable, the head unreachable).
    problem: str | None = None


class TokenCreateRequest(_Strict):
    kind: Literal["join", "api"] = "join"
    label: str = Field("", max_length=200)


class TokenView(_Model):
    token_id: str
    kind: Literal["join", "api"]
    label: str
    created_at: float
    revoked_at: float | None = None
    token: str | None = None  # the secret, shown once at creation


class JobSubmitRequest(_Strict):
    entrypoint: str = Field(..., min_length=1, max_length=10_000)
    runtime_env: dict[str, Any] | None = None
    submission_id: str | None = Field(None, min_length=1, max_length=128)
    metadata: dict[str, str] | None = None
    entrypoint_num_cpus: float | None = Field(None, ge=0)
    entrypoint_num_gpus: float | None = Field(None, ge=0)

    @field_validator("runtime_env")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Secrets never enter job payloads: the Ray token reaches jobs through the cluster.
        env = (v or {}).get("env_vars") or {}
        if not isinstance(env, dict):
            raise ValueError("runtime_env.env_vars must be an object of string to string")
        for key in env:
            if key in ("RAY_AUTH_TOKEN", "DGPT_API_KEY"):
                raise ValueError(f"runtime_env.env_vars.{key} is a secret and may not be sent in a job")
        return v


class JobView(_Model):
    job_id: str
    status: str
    entrypoint: str
    message: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class ClusterView(_Model):
    donors_by_state: dict[str, int]
    active_donors: int
    standby_donors: int
    resources_total: dict[str, float]
    resources_available: dict[str, float]
    autoscaler: dict[str, Any] = Field(default_factory=dict)
    ray_address: str = ""
    dashboard_url: str = ""


class FieldProblem(_Model):
    """One invalid field of a request: where it is and what is wrong with it."""

    field: str
    problem: str


class ErrorBody(_Model):
    """Every 4xx/5xx answer of the API has this shape."""

    error: str = Field(..., description="The kind of error, e.g. AuthError, NotFound, invalid request.")
    message: str = Field(..., description="What went wrong, naming the field or object.")
    hint: str | None = Field(None, description="What to do next.")
    detail: list[FieldProblem] | None = Field(None, description="The invalid fields, for 422 answers.")

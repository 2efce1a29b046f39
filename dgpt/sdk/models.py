"""Versioned request and response models shared by the control plane, the SDK and donors.

Every payload a peer sends is validated here. A field added later gets a default, so an
older donor keeps working with a newer head (``v`` names the payload version).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import JsonDict

from dgpt.config import NODE_PORTS, parse_port_range
from dgpt.contract import (
    RESERVED_LABEL_PREFIX,
    AgentState,
    DonorState,
    HeartbeatAction,
    LeaveReason,
    PausedBy,
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
#: Donor ids: what a path segment of ``/donors/{donor_id}`` accepts.
DONOR_ID_PATTERN = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$"
#: A donor-chosen secret travels as ``Authorization: Bearer``: RFC 6750's token68 characters.
SECRET_PATTERN = r"^[-A-Za-z0-9._~+/]+=*$"
#: Unix seconds up to the year 2286: bounds a timestamp a peer sends (sums of them stay finite).
MAX_TIMESTAMP_S = 1e10
#: 1 PiB: more memory or disk than any donor has; below 2**53, so JSON numbers carry it exactly.
MAX_BYTES = 2**50

# What the validators below check, stated in the schema too, so clients (and fuzzers) can
# build valid requests from the schema alone. The validators keep their messages.
_NAME_SCHEMA: JsonDict = {"pattern": _NAME.pattern}
_DEVICE_CLASS_SCHEMA: JsonDict = {"enum": list(DEVICE_CLASSES)}
_LABELS_SCHEMA: JsonDict = {
    "propertyNames": {"pattern": _LABEL_KEY.pattern, "not": {"pattern": "^" + re.escape(RESERVED_LABEL_PREFIX)}},
    "additionalProperties": {"type": "string", "pattern": _LABEL_VALUE.pattern, "maxLength": 63},
}
IpAddress = Annotated[str, WithJsonSchema({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
                                           "maxLength": 64})]
# A WireGuard key: 32 bytes in standard base64 (the last character before '=' carries 4 bits).
_WG_KEY = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")

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
    memory_bytes: int = Field(..., ge=0, le=MAX_BYTES)


class DeviceProfile(_Strict):
    """What the donor agent measured on its device."""

    cpus: int = Field(..., ge=1, le=4096)
    memory_bytes: int = Field(..., ge=1, le=MAX_BYTES)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpu_gflops: float = Field(..., ge=0, le=1e7)
    gpu_gflops: float = Field(0.0, ge=0, le=1e9)
    disk_free_bytes: int = Field(0, ge=0, le=MAX_BYTES)
    platform: str = Field("", max_length=200)
    hostname: str = Field("", max_length=255)


class DonorCaps(_Strict):
    """What the donor offers: never more than its profile measured."""

    cpus: float = Field(..., gt=0, le=4096)
    memory_bytes: int = Field(..., ge=64 * 2**20, le=MAX_BYTES)
    gpus: int = Field(0, ge=0, le=64)
    disk_bytes: int = Field(0, ge=0, le=MAX_BYTES)


def check_wg_key(value: str, what: str) -> str:
    if not _WG_KEY.match(value):
        raise ValueError(f"{what} {value[:60]!r} is not a WireGuard key (44 characters of base64, as `wg pubkey` prints)")
    return value


class OverlayOffer(_Strict):
    """A donor asks to join through the head's WireGuard overlay.

    It sends its public key only: the private key is made on the donor and never leaves it.
    Its Ray ports tell the head which overlay traffic to let through to it.
    """

    public_key: str
    node_port_base: int = Field(..., ge=1, le=65535 - NODE_PORTS)
    worker_ports: str

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_wg_key(v, "public_key")

    @field_validator("worker_ports")
    @classmethod
    def _workers(cls, v: str) -> str:
        try:
            parse_port_range(v)
        except ValueError as exc:
            raise ValueError(f"worker_ports {exc}") from None
        return v


class OverlayGrant(_Model):
    """The head's answer to an :class:`OverlayOffer`: where this donor sits on the overlay."""

    address: str  # the donor's overlay address; Ray advertises it when the donor is relayed
    prefix_len: int
    head_address: str  # the head's overlay address (its GCS there, for relayed donors)
    head_public_key: str
    endpoint: str  # host:port of the head's WireGuard UDP port, dialled outbound
    keepalive_s: int  # keeps the donor's NAT mapping open


class RegisterRequest(_Strict):
    v: int = PAYLOAD_VERSION
    name: str = Field(..., min_length=1, max_length=63, json_schema_extra=_NAME_SCHEMA)
    device_class: str = Field("unknown", json_schema_extra=_DEVICE_CLASS_SCHEMA)
    owner: str = Field(..., min_length=1, max_length=63, json_schema_extra=_NAME_SCHEMA)
    profile: DeviceProfile
    caps: DonorCaps
    labels: dict[str, str] = Field(default_factory=dict, max_length=32, json_schema_extra=_LABELS_SCHEMA)
    # A donor re-registering after the head lost or restarted keeps its identity.
    donor_id: str | None = Field(None, min_length=1, max_length=63, pattern=DONOR_ID_PATTERN)
    donor_secret: str | None = Field(None, min_length=16, max_length=256, pattern=SECRET_PATTERN)
    # Where the head and other nodes reach this donor's raylet: checked before it is
    # activated (an older agent sends neither and is not checked).
    node_ip: IpAddress | None = Field(default=None, min_length=1, max_length=64)
    ray_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=8)
    # The donor can join through the head's WireGuard overlay (it runs wireguard-go).
    overlay: OverlayOffer | None = None
    # Where its piece server (storage tier) listens, when it offers disk: http://ADDRESS:PORT.
    storage_url: str | None = Field(default=None, min_length=8, max_length=300, pattern=r"^https?://[^/\s]+$")

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
    # Its place on the overlay, when it offered to join one and the head runs one.
    overlay: OverlayGrant | None = None
    # The key its piece server checks capabilities with (hex), when it reported a storage_url
    # and the head runs the storage tier; it travels like the Ray token, only to this donor.
    storage_key: str | None = None


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
    # The address the donor's raylet advertises (its overlay address when relayed); None: its own.
    node_ip: str | None = None


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

    started_at: float = Field(..., ge=0, le=MAX_TIMESTAMP_S, description="Unix seconds.")
    ended_at: float = Field(..., ge=0, le=MAX_TIMESTAMP_S, description="Unix seconds.")
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
    # How Ray reaches it: False direct (its own address), True relayed through the head's
    # overlay (low bandwidth), None not known yet (no preflight passed).
    relayed: bool | None = None
    overlay_ip: str | None = None
    # Paused on the head (`POST /donors/{id}/pause`): drained and kept out of Ray until resumed.
    paused: bool = Field(False, description="Paused on the head: drained, and never activated until resumed.")
    paused_by: PausedBy | None = Field(None, description="Who paused it: its owner (donor secret) or an operator.")
    paused_at: float | None = Field(None, description="When it was paused (Unix seconds).")
    load: float | None = Field(None, description="The share of its granted CPUs its work uses now (Ray's "
                                                 "accounting); None when no raylet runs.")
    trust: float | None = Field(None, description="Verification trust 0..1 (dgpt.verify); None: never checked.")
    verification: VerificationView | None = Field(
        default=None, description="Its verification record (counts and latest outcomes); only in a single donor's view.")


class VerificationOutcomeView(_Model):
    """One verified task or shadowed request the donor took part in, and how it was judged."""

    task_id: str
    outcome: Literal["valid", "invalid", "error", "inconclusive"]
    reason: str = ""
    node_id: str | None = None
    at: float


class VerificationView(_Model):
    """A donor's verification record: BOINC-style redundancy outcomes and the trust they give it."""

    trust: float
    valid: int
    invalid: int
    errors: int
    inconclusive: int
    consecutive_valid: int
    updated_at: float
    recent: list[VerificationOutcomeView] = Field(default_factory=list, description="Newest first.")


class PauseResponse(_Model):
    """The answer to a pause or a resume: where the donor stands now."""

    donor_id: str
    paused: bool
    paused_by: PausedBy | None = None
    paused_at: float | None = None
    state: DonorState
    drain_requested: bool = Field(False, description="Ray was asked to drain its node (DrainNode with a deadline).")
    message: str = ""


class FleetSessionView(SessionView):
    """An ended session in the fleet's list of recent drains and losses."""

    donor_id: str
    donor_name: str


class FleetSample(_Model):
    """The fleet by state at one moment."""

    at: float = Field(..., description="Unix seconds.")
    donors_by_state: dict[str, int]


class FleetHistory(_Model):
    """Fleet size over time: a sample whenever the counts changed (at most one per ``step_s``),
    oldest first; the last sample is now."""

    step_s: float
    points: list[FleetSample]


class CreditPoint(_Model):
    """The fleet's credit in one interval."""

    start_at: float
    end_at: float
    credit: float = Field(..., description="Credit of the ledger rows that end in this interval, net of voids.")
    total_credit: float = Field(..., description="The fleet's credit earned up to the end of this interval.")


class CreditHistory(_Model):
    """The fleet's credit over time, in equal intervals ending now, oldest first."""

    step_s: float
    points: list[CreditPoint]
    total_credit: float


class EndpointView(_Model):
    """A Serve application (an inference endpoint) and where its replicas run."""

    app: str
    route_prefix: str | None = None
    status: str
    message: str = ""
    replicas: dict[str, int] = Field(default_factory=dict, description="RUNNING replicas per donor id (`head` for "
                                                                       "the head node, a node id prefix if unknown).")
    replicas_total: int = 0


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


#: Job ids: what a path segment of ``/jobs/{job_id}`` accepts.
JOB_ID_PATTERN = r"^[-A-Za-z0-9_.:]+$"
#: runtime_env fields Ray reads from the submitting machine's disk when they name a local path:
#: the head's, here. They must be URIs (``s3://``, ``gs://``, ``https://`` ...).
_URI_FIELDS = ("working_dir", "py_modules", "java_jars")
_FILE_FIELDS = ("pip", "uv", "conda")


def _is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def check_runtime_env(env: dict[str, Any]) -> dict[str, Any]:
    """Refuse what would leak the head's secrets or files into a job (see ``_URI_FIELDS``)."""
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        raise ValueError("runtime_env.env_vars must be an object of string to string")
    for key in env_vars:
        # Secrets never enter job payloads: the Ray token reaches jobs through the cluster.
        if key in ("RAY_AUTH_TOKEN", "DGPT_API_KEY"):
            raise ValueError(f"runtime_env.env_vars.{key} is a secret and may not be sent in a job")
    for name in _URI_FIELDS:
        value = env.get(name)
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_uri(v) for v in values):
            raise ValueError(f"runtime_env.{name} must be a URI (s3://, gs://, https://, ...), got {value!r}: "
                             "a local path would be read from the head's disk")
    for name in _FILE_FIELDS:
        value = env.get(name)
        if isinstance(value, str) and ("/" in value or value.endswith((".txt", ".yaml", ".yml"))):
            raise ValueError(f"runtime_env.{name} must list packages (or name a conda env), not a file: {value!r}")
    return env


class JobSubmitRequest(_Strict):
    entrypoint: str = Field(..., min_length=1, max_length=10_000)
    runtime_env: dict[str, Any] | None = None
    submission_id: str | None = Field(None, min_length=1, max_length=128, pattern=JOB_ID_PATTERN)
    metadata: dict[str, str] | None = None
    entrypoint_num_cpus: float | None = Field(None, ge=0)
    entrypoint_num_gpus: float | None = Field(None, ge=0)

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_runtime_env(v) if v is not None else None


class JobView(_Model):
    job_id: str
    status: str
    entrypoint: str
    message: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class RogueNodeView(_Model):
    """A live Ray node the head never granted as it is: no donor session, or claims beyond it."""

    node_id: str
    address: str
    reason: str
    since: float
    drain_requested: bool = False
    gone_at: float | None = Field(default=None, description="When it left Ray (drained or dead); listed for 10 minutes "
                                                    "after, so an operator still sees what happened.")


class ClusterView(_Model):
    donors_by_state: dict[str, int]
    active_donors: int
    standby_donors: int
    resources_total: dict[str, float]
    resources_available: dict[str, float]
    autoscaler: dict[str, Any] = Field(default_factory=dict)
    ray_address: str = ""
    dashboard_url: str = ""
    #: Ray nodes that joined without a donor session or claim more than theirs: drained, and
    #: never matched to a donor (so never in placement).
    rogue_nodes: list[RogueNodeView] = Field(default_factory=list)


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


# ---------------------------------------------------------------- credit (dgpt.credit)


class CreditWeights(_Model):
    """Credits one resource-second earns on this donor (BOINC's unit: 200 per GFLOPS-day)."""

    cpu: float = Field(..., description="Credits per CPU-second: the core's share of the CPU GFLOPS x 200/86400.")
    gpu: float = Field(..., description="Credits per GPU-second: the GPU's GFLOPS x 200/86400.")
    memory: float = Field(..., description="Credits per byte-second of memory (0: memory is metered, not credited).")


class CreditEntryView(_Model):
    """One row of the credit ledger: a metered interval of a session, or a void of one."""

    seq: int
    kind: Literal["credit", "void"]
    session_id: int | None = None
    node_id: str | None = None
    start_at: float
    end_at: float
    cpu_s: float
    gpu_s: float
    memory_byte_s: float
    weights: CreditWeights
    credit: float = Field(..., description="cpu_s x weights.cpu + gpu_s x weights.gpu + memory_byte_s x "
                                           "weights.memory; negative for a void.")
    voided: bool = Field(False, description="A later void row took this interval's credit back.")
    voids_seq: int | None = Field(None, description="For a void: the row whose credit it takes back.")
    reason: str | None = None
    recorded_at: float
    hash: str


class SessionCredit(_Model):
    """What one session of the donor earned."""

    session_id: int
    cpu_s: float
    gpu_s: float
    memory_byte_s: float
    credit: float = Field(..., description="Credit earned, net of voids.")
    voided_credit: float = 0.0
    entries: int = 0


class LedgerTip(_Model):
    """The last row of the ledger: keep it, and a later check proves the ledger was not rewritten."""

    seq: int
    hash: str


class DonorCredit(_Model):
    """A donor's credit: totals, recent average credit, per session, the latest ledger rows."""

    donor_id: str
    total_credit: float = Field(..., description="Credit earned, net of voids.")
    recent_average_credit: float = Field(..., description="Credits per day, decaying with a one-week half-life.")
    voided_credit: float = Field(0.0, description="Credit taken back because results failed verification.")
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    memory_byte_s: float = 0.0
    weights: CreditWeights | None = Field(None, description="The weights its current profile earns at.")
    sessions: list[SessionCredit] = Field(default_factory=list)
    entries: list[CreditEntryView] = Field(default_factory=list, description="The latest ledger rows, oldest first.")
    tip: LedgerTip
    as_of: float


class CreditSummary(_Model):
    """One donor's credit in a list (``GET /credit``)."""

    donor_id: str
    total_credit: float
    recent_average_credit: float
    voided_credit: float = 0.0


class CreditVoidRequest(_Strict):
    """Take back the credit of a donor's work in ``[start_at, end_at]``: its results failed verification.

    Every credit row of the donor that overlaps the span is voided whole (a row covers at most
    ``credit_interval_s`` of one session).
    """

    start_at: float = Field(..., ge=0, le=MAX_TIMESTAMP_S, description="Unix seconds.")
    end_at: float = Field(..., ge=0, le=MAX_TIMESTAMP_S, description="Unix seconds.")
    reason: str = Field(..., min_length=1, max_length=200, description="Why, e.g. the verification that failed.")

    @model_validator(mode="after")
    def _span(self) -> CreditVoidRequest:
        if self.end_at < self.start_at:
            raise ValueError(f"end_at ({self.end_at}) is before start_at ({self.start_at})")
        return self


class CreditVoidResponse(_Model):
    donor_id: str
    voided_seqs: list[int] = Field(default_factory=list, description="The credit rows voided now.")
    voided_credit: float = 0.0


class LedgerCheck(_Model):
    """The result of checking the ledger's hash chain, as the SQLite file holds it."""

    ok: bool
    rows: int = Field(..., description="Rows checked before the first bad one (all of them when ok).")
    tip: LedgerTip
    first_bad_seq: int | None = Field(None, description="The first row that was edited, removed or rewritten.")
    problem: str | None = None

"""The storage tier's versioned payloads: what clients, the metadata service and the head exchange.

These cross process boundaries (a Ray actor, REST), so they are frozen pydantic models with
JSON forms (bytes travel as base64); a field added later gets a default, as everywhere in
dgpt (``v`` names the payload version). Paths are relative, ``/``-separated, without a
protocol (``data/train.parquet``); ``""`` is the root.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dgpt.storage.codec import Profile

PAYLOAD_VERSION = 1
MAX_PATH_CHARS = 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_bytes="base64", val_json_bytes="base64")


class _Strict(BaseModel):
    # Sent by clients: unknown fields are typos, not silently dropped.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


def check_path(path: str, what: str = "path") -> str:
    """Normalise a storage path (strip slashes) and refuse unsafe ones.

    Raises:
        ValueError: empty component, ``.``/``..``, NUL, or longer than MAX_PATH_CHARS; the
            message quotes the path.
    """
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a string, got {type(path).__name__}")
    clean = path.strip("/")
    if len(clean) > MAX_PATH_CHARS:
        raise ValueError(f"{what} is {len(clean)} characters, more than {MAX_PATH_CHARS}")
    if "\x00" in clean:
        raise ValueError(f"{what} {path!r} contains a NUL character")
    if clean:
        for part in clean.split("/"):
            if part in ("", ".", ".."):
                raise ValueError(f"{what} {path!r} has an empty, '.' or '..' component")
    return clean


class ProfileSpec(_Strict):
    """An erasure-coding profile on the wire (see :class:`dgpt.storage.codec.Profile`)."""

    k: int = Field(..., ge=1, le=199)
    n: int = Field(..., ge=2, le=200)
    repair_at: int = Field(..., ge=1, le=199)

    @classmethod
    def of(cls, profile: Profile) -> ProfileSpec:
        return cls(k=profile.k, n=profile.n, repair_at=profile.repair_at)

    def profile(self) -> Profile:
        return Profile(self.k, self.n, self.repair_at)


class Entry(_Model):
    """One file or directory, as ``ls``/``info`` report it."""

    path: str
    type: Literal["file", "directory"]
    size: int = 0
    created_at: float | None = None
    file_id: str | None = None
    profile: str | None = None


class WritePlan(_Model):
    """Answer to ``begin_write``: where the write stands and the key to seal it with."""

    v: int = PAYLOAD_VERSION
    write_id: str
    file_id: str
    path: str
    profile: ProfileSpec
    segment_bytes: int
    stripe_plain_bytes: int
    file_key: bytes
    expires_at: float


class PieceSpec(_Strict):
    """A sealed piece a client wants placed."""

    index: int = Field(..., ge=0, le=199)
    piece_id: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    piece_bytes: int = Field(..., ge=1)
    leaf_bytes: int = Field(..., ge=1)


class PieceTarget(_Model):
    """Where to upload one piece, with the capability the donor will demand."""

    index: int
    piece_id: str
    donor_id: str
    url: str
    capability: str


class SegmentPlacement(_Model):
    segment: int
    targets: list[PieceTarget]
    profile_warning: str | None = None


class StoredPiece(_Strict):
    """A piece the client uploaded and the donor confirmed."""

    segment: int = Field(..., ge=0)
    index: int = Field(..., ge=0, le=199)
    donor_id: str = Field(..., min_length=1, max_length=200)


class SegmentInfo(_Model):
    segment: int
    offset: int
    plain_bytes: int


class FileLayout(_Model):
    """What a reader needs besides piece locations: sizes, profile, the key."""

    v: int = PAYLOAD_VERSION
    file_id: str
    path: str
    size: int
    profile: ProfileSpec
    stripe_plain_bytes: int
    file_key: bytes
    created_at: float
    segments: list[SegmentInfo]


class PieceLocation(_Model):
    index: int
    piece_id: str
    donor_id: str
    url: str
    capability: str


class SegmentGrant(_Model):
    """Where a segment's readable pieces are, with read capabilities until ``expires_at``."""

    segment: int
    plain_bytes: int
    pieces: list[PieceLocation]
    expires_at: float


class BadPiece(_Strict):
    """A client saw a piece fail its hash check (or vanish) while reading."""

    file_id: str
    segment: int = Field(..., ge=0)
    index: int = Field(..., ge=0, le=199)
    piece_id: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    donor_id: str
    reason: str = Field(..., max_length=500)


class DonorSpec(_Strict):
    """A donor's storage side as the head registers it with the metadata service."""

    donor_id: str = Field(..., min_length=1, max_length=200)
    owner: str = Field(..., min_length=1, max_length=200)
    url: str = Field(..., min_length=1, max_length=500)
    capacity_bytes: int = Field(..., ge=0)
    reliability: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "local://")):
            raise ValueError(f"url must start with http://, https:// or local://, got {v!r}")
        return v.rstrip("/")


DonorStorageState = Literal["online", "offline", "leaving", "gone"]


class DonorStorageView(_Model):
    donor_id: str
    owner: str
    url: str
    state: DonorStorageState
    capacity_bytes: int
    used_bytes: int
    pieces: int
    reliability: float
    audits_passed: int
    audits_failed: int

"""The storage tier's REST payloads (``/api/v1/storage``): entries, durability, status, leave.

File bytes travel as plain request and response bodies (``application/octet-stream``), never
wrapped in JSON; these models are everything else. A field added later gets a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dgpt.sdk.models import PAYLOAD_VERSION


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StorageEntry(_Model):
    """One file or directory of the storage tier."""

    path: str = Field(..., description="Relative, '/'-separated; '' is the root.")
    type: Literal["file", "directory"]
    size: int = Field(0, ge=0, description="Bytes (files).")
    created_at: float | None = Field(None, description="Unix time the file version was committed.")
    file_id: str | None = Field(None, description="Id of this file version.")
    profile: str | None = Field(None, description="Erasure-coding profile, e.g. 'rs-2-4' (k of n).")


#: How safe a file is, worst segment first: ``healthy`` (above the repair threshold),
#: ``repair due`` (at or below it: queued), ``unreadable`` (fewer than k pieces online now,
#: but durable ones may return), ``lost`` (fewer than k durable pieces: the data is gone).
Durability = Literal["healthy", "repair due", "unreadable", "lost"]


class FileDurability(_Model):
    path: str
    file_id: str
    size: int
    profile: str
    k: int
    n: int
    repair_at: int
    segments: int
    min_durable: int = Field(..., description="Fewest durable pieces of any segment (stored, on donors not gone).")
    min_readable: int = Field(..., description="Fewest pieces of any segment on donors online now.")
    losses_tolerated: int = Field(..., description="Pieces the worst segment can still lose (min_durable - k).")
    state: Durability


class StorageDonor(_Model):
    donor_id: str
    owner: str
    url: str
    state: Literal["online", "offline", "leaving", "gone"]
    capacity_bytes: int
    used_bytes: int
    pieces: int
    reliability: float
    audits_passed: int
    audits_failed: int


class StorageStatus(_Model):
    """``dgpt storage status``: durability per file, the repair backlog, the donors."""

    v: int = PAYLOAD_VERSION
    files: list[FileDurability] = Field(default_factory=list)
    repair_backlog: int = Field(0, description="Segments at or below their repair threshold, or with a bad piece.")
    lost_segments: int = Field(0, description="Segments with fewer than k durable pieces.")
    eligible_donors: int = Field(0, description="Online donors with free disk, counted once per owner.")
    profile: str | None = Field(None, description="The profile a write started now gets (None: too few donors).")
    profile_warning: str | None = None
    donors: list[StorageDonor] = Field(default_factory=list)



class StorageLeaveResponse(_Model):
    """A leaving donor's pieces, moved before it is let go."""

    donor_id: str
    moved: int = Field(..., description="Pieces copied to other donors by this call.")
    remaining: int = Field(..., description="Pieces still only on this donor (0: it may go).")
    state: Literal["online", "offline", "leaving", "gone"]
    message: str = ""

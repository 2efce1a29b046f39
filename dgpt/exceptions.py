"""The one exception tree of dgpt; every error a user can hit says what to do next.

    DgptError                    base; ``hint`` is the next step for the user
     +-- ConfigError             a setting, flag or config file value is invalid
     +-- HeadUnreachable         the head's API did not answer
     +-- ApiError                the API answered with an error status
     |    +-- AuthError          401/403: missing or wrong token / API key
     |    +-- NotFound           404: no such donor, job, token
     |    +-- InvalidRequest     400/413/422: the request body or a field is invalid
     |    +-- Conflict           409: the request clashes with current state
     +-- FabricError             starting or stopping a head or local fabric failed
     +-- DonorError              the donor agent cannot do what was asked
     |    +-- ProtectionUnavailable  a cap or the sandbox cannot be enforced on this machine
     +-- RayAdapterError         a call into Ray's private API failed
     +-- PlacementError          the placement policy cannot place the request
     |    +-- InsufficientCapacity
     +-- ServeError              deploying or querying a Serve application failed
     +-- StorageError            the storage tier cannot do what was asked
     |    +-- NotEnoughDonors     too few eligible donors (distinct owners, free space)
     |    +-- PieceCorrupt        a piece failed its hash (Merkle) check
     |    +-- DataUnavailable     fewer than k verified pieces of a segment could be read
     |    +-- StoreFull           a donor's piece store is at its capacity cap
     |    +-- PieceServerUnreachable  a donor's piece server did not answer
     |    +-- WriteConflict       the path is taken, or a write was already committed/aborted
     +-- TrainError              a training job cannot be planned, stored or resumed
     |    +-- CheckpointCorrupt  a checkpoint folder is incomplete or does not match its manifest
     |    +-- CheckpointStoreError  checkpoint storage refused an operation (bad path, missing file)
     +-- OverlayError            setting up or using the WireGuard overlay failed
     +-- VerificationError       a verified task could not be checked (too few owners, no trusted node)
"""

from __future__ import annotations


class DgptError(Exception):
    """Base of every dgpt error. ``hint`` tells the user what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Errors cross process boundaries (Ray actors); keep every field.
        return (type(self), (self.message, self.hint))

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  -> {self.hint}"
        return self.message


class ConfigError(DgptError):
    """A setting (environment variable, TOML value or CLI flag) is invalid."""


class HeadUnreachable(DgptError):
    """The head's HTTP API could not be reached."""


class ApiError(DgptError):
    """The API answered with an error status."""

    def __init__(self, message: str, status_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status_code = status_code

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.message, self.status_code, self.hint))


class AuthError(ApiError):
    """401/403: the join token or API key is missing or wrong."""


class NotFound(ApiError):
    """404: the donor, job or token does not exist."""


class InvalidRequest(ApiError):
    """400/413/422: the request, or one named field of it, is invalid."""


class Conflict(ApiError):
    """409: the request clashes with the current state."""


class FabricError(DgptError):
    """Starting or stopping the head or a local fabric failed."""


class DonorError(DgptError):
    """The donor agent cannot do what was asked."""


class ProtectionUnavailable(DonorError):
    """The kernel cannot enforce a cap (cgroup) or isolate the work (sandbox) on this machine."""


class RayAdapterError(DgptError):
    """A call into Ray's private API (GCS client, DrainNode) failed."""


class PlacementError(DgptError):
    """The placement policy cannot place the request."""


class InsufficientCapacity(PlacementError):
    """No set of donors has room for the request right now."""


class ServeError(DgptError):
    """Deploying or querying a Ray Serve application failed."""


class StorageError(DgptError):
    """The storage tier cannot do what was asked."""


class NotEnoughDonors(StorageError):
    """Too few eligible donors (distinct donors and owners, with free space) for a profile."""


class PieceCorrupt(StorageError):
    """A piece (or one leaf of it) does not match its BLAKE3 Merkle id."""


class DataUnavailable(StorageError):
    """Fewer than k verified pieces of a segment could be fetched: the data cannot be read now."""


class StoreFull(StorageError):
    """A donor's piece store would exceed its capacity cap (``--disk-gb``)."""


class WriteConflict(StorageError):
    """The path already exists, or the write was already committed, aborted or expired."""


class PieceServerUnreachable(StorageError):
    """A donor's piece server did not answer (offline, crashed, or the network is down)."""


class TrainError(DgptError):
    """A training job cannot be planned, stored or resumed as asked."""


class CheckpointCorrupt(TrainError):
    """A checkpoint folder has no valid manifest, or its files do not match it."""


class CheckpointStoreError(TrainError):
    """Checkpoint storage refused an operation: a path outside its root, a missing file."""


class OverlayError(DgptError):
    """Setting up or using the WireGuard overlay (``dgpt.overlay``) failed."""


class VerificationError(DgptError):
    """A verified task (``dgpt.verify``) could not be run or checked as asked."""

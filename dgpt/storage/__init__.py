"""Donor storage tier, exposed as an fsspec filesystem (``dgpt://``).

Files are cut into segments (:mod:`~dgpt.storage.segment`); each segment is encrypted per
stripe (:mod:`~dgpt.storage.crypto`), erasure-coded (:mod:`~dgpt.storage.codec`) into n
pieces named by their BLAKE3 Merkle root (:mod:`~dgpt.storage.merkle`) and spread over donors
of distinct owners (:mod:`~dgpt.storage.placement`). Donors keep pieces in a capped folder
(:mod:`~dgpt.storage.piece_store`) behind an HTTP server that demands capabilities
(:mod:`~dgpt.storage.piece_server`, :mod:`~dgpt.storage.capability`). The head's metadata
service (:mod:`~dgpt.storage.service` over :mod:`~dgpt.storage.metadata`) plans writes and
grants reads; clients move the bytes (:mod:`~dgpt.storage.datapath`, on every core through
:mod:`~dgpt.storage.pool`). :mod:`~dgpt.storage.repair` keeps pieces alive (checker,
repairer, graceful leave, audits, garbage); :mod:`~dgpt.storage.durability` says how alive.
:mod:`~dgpt.storage.fs` is the fsspec filesystem; :mod:`~dgpt.storage.local` runs a tier on
one machine.

Importing this package registers ``dgpt://`` with fsspec (lazily: nothing heavy is imported).
"""

from __future__ import annotations

PROTOCOL = "dgpt"

try:  # fsspec is what the filesystem is for; without it the rest still works
    import fsspec as _fsspec

    _fsspec.register_implementation(PROTOCOL, "dgpt.storage.fs.DonorFileSystem", clobber=True)
except ImportError:  # pragma: no cover
    pass

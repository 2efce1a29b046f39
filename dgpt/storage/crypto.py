"""Keys of the storage tier: the cluster secret, per-donor capability keys, per-file keys.

- The head holds one ``cluster_secret``. Everything else derives from it with HMAC-SHA256
  under distinct labels, so no derived key reveals another:
  ``K_wrap = HMAC(secret, "storage-wrap-v1")`` wraps file keys, and each donor's
  ``K_d = HMAC(secret, "storage:" + donor_id)`` MACs the capabilities that donor accepts (a
  donor knows only its own ``K_d``, so it cannot forge capabilities for another donor).
- Every file version gets a fresh random 256-bit key, stored only wrapped (AES-256-GCM under
  ``K_wrap``, bound to the file id).
- Every stripe is sealed with AES-256-GCM under the file key. The nonce is the stripe's
  position ``(segment, stripe)``: unique because a key seals exactly one file version, and
  files are immutable (an overwrite is a new version with a new key). The position in the
  nonce and the file id as associated data mean a stripe moved to another place or another
  file fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dgpt.exceptions import StorageError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: A cluster secret shorter than this would be guessable offline from one capability.
MIN_SECRET_BYTES = 16
_WRAP_LABEL = b"storage-wrap-v1"
_FINGERPRINT_LABEL = b"storage-fingerprint-v1"
_DONOR_LABEL = b"storage:"
_STRIPE_AAD = b"dgpt-stripe-v1:"
_WRAP_AAD = b"dgpt-file-key-v1:"


def new_secret() -> bytes:
    """A fresh cluster secret."""
    return os.urandom(KEY_BYTES)


def _check_secret(cluster_secret: bytes) -> None:
    if len(cluster_secret) < MIN_SECRET_BYTES:
        raise ValueError(f"cluster secret must be at least {MIN_SECRET_BYTES} bytes, got {len(cluster_secret)}")


def donor_storage_key(cluster_secret: bytes, donor_id: str) -> bytes:
    """``K_d``: the key that MACs capabilities for ``donor_id`` (the donor gets this key only)."""
    _check_secret(cluster_secret)
    if not donor_id:
        raise ValueError("donor_id must not be empty")
    return hmac.new(cluster_secret, _DONOR_LABEL + donor_id.encode(), hashlib.sha256).digest()


def wrapping_key(cluster_secret: bytes) -> bytes:
    """``K_wrap``: the key that wraps per-file keys. Never leaves the metadata service."""
    _check_secret(cluster_secret)
    return hmac.new(cluster_secret, _WRAP_LABEL, hashlib.sha256).digest()


def secret_fingerprint(cluster_secret: bytes) -> str:
    """A short, non-secret name of the cluster secret (to notice a head restarted with another)."""
    _check_secret(cluster_secret)
    return hmac.new(cluster_secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def new_file_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def wrap_file_key(wrap_key: bytes, file_key: bytes, file_id: str) -> bytes:
    """``nonce || AES-256-GCM(file_key)``, bound to ``file_id``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(wrap_key).encrypt(nonce, file_key, _WRAP_AAD + file_id.encode())


def unwrap_file_key(wrap_key: bytes, wrapped: bytes, file_id: str) -> bytes:
    """The file key; raises StorageError if the wrapped key was altered or belongs elsewhere."""
    try:
        return AESGCM(wrap_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _WRAP_AAD + file_id.encode())
    except InvalidTag:
        raise StorageError(
            f"the key of file {file_id} does not unwrap: wrong cluster secret or altered metadata",
            hint="check that the head uses the storage secret the file was written with",
        ) from None


class StripeCipher:
    """Seals and opens the stripes of one file version (AES-256-GCM, positional nonces)."""

    def __init__(self, file_key: bytes, file_id: str) -> None:
        if len(file_key) != KEY_BYTES:
            raise ValueError(f"file key must be {KEY_BYTES} bytes, got {len(file_key)}")
        self._aead = AESGCM(file_key)
        self._aad = _STRIPE_AAD + file_id.encode()
        self.file_id = file_id

    @staticmethod
    def nonce(segment: int, stripe: int) -> bytes:
        return struct.pack(">QI", segment, stripe)

    def seal(self, segment: int, stripe: int, plaintext: bytes | memoryview) -> bytes:
        return self._aead.encrypt(self.nonce(segment, stripe), plaintext, self._aad)

    def decrypt_into(self, segment: int, stripe: int, sealed: bytes | memoryview, out: memoryview) -> None:
        """Open a stripe straight into ``out`` (``len(sealed) - TAG_BYTES`` bytes)."""
        try:
            self._aead.decrypt_into(self.nonce(segment, stripe), sealed, self._aad, out)
        except InvalidTag:
            raise StorageError(
                f"stripe {stripe} of segment {segment} of file {self.file_id} fails authentication "
                "although its pieces matched their ids: the file key or layout is wrong",
            ) from None

    def open(self, segment: int, stripe: int, sealed: bytes | memoryview) -> bytes:
        """The plaintext; raises StorageError if the stripe fails authentication."""
        try:
            return self._aead.decrypt(self.nonce(segment, stripe), sealed, self._aad)
        except InvalidTag:
            raise StorageError(
                f"stripe {stripe} of segment {segment} of file {self.file_id} fails authentication "
                "although its pieces matched their ids: the file key or layout is wrong",
            ) from None

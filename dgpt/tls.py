"""TLS for the control plane: the head's certificate, its fingerprint, and clients that pin it.

The head serves its API over HTTPS when ``Settings.tls_enabled`` (``DGPT_TLS``: ``auto`` turns
it on whenever the API listens beyond loopback). Its certificate is the operator's own
(``DGPT_TLS_CERT_FILE`` / ``DGPT_TLS_KEY_FILE``) or one the head makes on first start and keeps
(``$DGPT_HOME/head/tls/``): a self-signed P-256 certificate valid for ten years, so the pins
handed out with join tokens stay valid across restarts.

Pinning. A donor does not trust whatever certificate answers at the head's address: the join
token carries the head's fingerprint (``dgpt_join_...@sha256:<hex>``, see :func:`pin_token`;
only the part before ``@`` is ever sent). On first contact the donor reads the certificate the
head presents without trusting it, compares its SHA-256 with the pin, keeps it in its state
folder, and from then on talks to a TLS context whose only trust anchor is that certificate
(:class:`HeadTrust`). A certificate that does not match is refused before any secret is sent.
Hostnames are not checked: the pin names the one certificate that may answer, wherever the
donor reaches the head (its LAN address, the overlay, a NAT's public address).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from dgpt.config import Settings
from dgpt.exceptions import ConfigError, DgptError, HeadUnreachable

PIN_PREFIX = "sha256:"
#: Separates a join token's secret from the head's fingerprint it carries.
PIN_SEPARATOR = "@"
_PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CERT_VALID_DAYS = 3650


class PinMismatch(DgptError):
    """The head presented a certificate other than the one pinned: nothing was sent to it."""


def check_pin(value: str, what: str) -> str:
    """``value`` as a normalised pin (``sha256:`` + 64 lowercase hex digits).

    Raises:
        ConfigError: it is not one; the message names ``what``.
    """
    pin = value.strip().lower()
    if not _PIN_RE.match(pin):
        raise ConfigError(f"{what} {value!r} is not a certificate fingerprint",
                          hint="it looks like sha256: followed by 64 hex digits (`dgpt status` on the head prints it)")
    return pin


def fingerprint(cert_pem: str) -> str:
    """The pin of a PEM certificate: SHA-256 of its DER bytes."""
    return PIN_PREFIX + hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem)).hexdigest()


def pin_token(token: str, pin: str | None) -> str:
    """A join token that carries the head's fingerprint (unchanged when ``pin`` is None)."""
    return token if pin is None else f"{token}{PIN_SEPARATOR}{pin}"


def split_token(token: str, what: str = "--token") -> tuple[str, str | None]:
    """``(secret, pin or None)`` of a join token given as ``what``.

    Raises:
        ConfigError: the part after ``@`` is not a fingerprint.
    """
    secret, sep, pin = token.strip().partition(PIN_SEPARATOR)
    if not sep:
        return secret, None
    return secret, check_pin(pin, f"the fingerprint in {what}")


def ensure_certificate(folder: Path, hosts: Sequence[str]) -> tuple[Path, Path]:
    """The head's certificate and key in ``folder``, made on first call (``hosts`` go in its SAN).

    An existing pair is kept as it is, so the fingerprint donors pinned stays valid.
    """
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dgpt.processes import write_secret

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dgpt head"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dgpt")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Its own trust anchor: clients load it as the only CA they trust.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode())
    cert_path.write_text(cert.public_bytes(serialization.Encoding.PEM).decode())
    return cert_path, key_path


def context_for(cert_pem: str) -> ssl.SSLContext:
    """A client TLS context whose one trust anchor is ``cert_pem`` (hostnames not checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cert_pem)
    return ctx


def presented_certificate(url: str, timeout_s: float = 10.0) -> str:
    """The PEM certificate the server at ``url`` presents, read without trusting it.

    Raises:
        HeadUnreachable: nothing answers TLS there.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise HeadUnreachable(f"cannot open TLS to the dgpt head at {host}:{port}: {exc}",
                              hint="check the URL (https://HEAD:PORT) and that the head runs") from None
    if not der:
        raise HeadUnreachable(f"the dgpt head at {host}:{port} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der)


class HeadTrust:
    """What an HTTPS client of the head trusts: a pinned certificate, a CA file, or the system's CAs.

    Args:
        url: the head's URL; with ``http://`` nothing is verified (a loopback-only head).
        pin: the fingerprint the head's certificate must have (from the join token or
            ``DGPT_HEAD_FINGERPRINT``); None: trust ``cache`` if it exists, else ``ca_file``, else
            the system's CAs (an operator's certificate from a public CA).
        cache: where the pinned certificate is kept once seen (a donor's state folder).
        ca_file: a PEM file to trust (the head's own certificate, on the head's machine).
    """

    def __init__(self, url: str, pin: str | None = None, cache: Path | None = None,
                 ca_file: Path | None = None) -> None:
        self.url = url
        self.pin = pin
        self.cache = cache
        self.ca_file = ca_file
        self._ctx: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    @property
    def https(self) -> bool:
        return self.url.startswith("https://")

    def verify(self) -> ssl.SSLContext | bool:
        """For httpx's ``verify``: a context, or True (system CAs) / False (plain HTTP).

        Raises:
            PinMismatch: the head presents a certificate other than the pinned one.
            HeadUnreachable: the pinned certificate is not known yet and the head does not answer.
        """
        if not self.https:
            return False
        with self._lock:
            if self._ctx is None:
                pem = self._pinned_pem() if self.pin else self._known_pem()
                if pem is None:
                    return True
                self._ctx = context_for(pem)
            return self._ctx

    def _known_pem(self) -> str | None:
        for path in (self.cache, self.ca_file):
            if path is not None and path.is_file():
                return path.read_text()
        return None

    def _pinned_pem(self) -> str:
        assert self.pin is not None
        for path in (self.cache, self.ca_file):
            if path is not None and path.is_file():
                pem = path.read_text()
                if fingerprint(pem) == self.pin:
                    return pem
        pem = presented_certificate(self.url)
        seen = fingerprint(pem)
        if seen != self.pin:
            raise PinMismatch(
                f"the dgpt head at {self.url} presents certificate {seen}, but {self.pin} is pinned: "
                "nothing was sent to it",
                hint="someone may be intercepting the connection, or the head's certificate changed; "
                     "ask the operator for a new join token (`dgpt token create`) or fingerprint (`dgpt status`)")
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            self.cache.write_text(pem)
        return pem


def tls_folder(home: Path) -> Path:
    """Where the head keeps the certificate and key it made."""
    return home / "head" / "tls"


def tls_files(settings: Settings) -> tuple[Path, Path] | None:
    """(certificate, key) the head's API serves with; None when TLS is off. The head makes a
    self-signed pair on first start unless the operator gave their own."""
    if not settings.tls_enabled:
        return None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        return settings.tls_cert_file, settings.tls_key_file
    folder = tls_folder(settings.home)
    return folder / "cert.pem", folder / "key.pem"


def head_fingerprint(settings: Settings) -> str | None:
    """The pin of the head's certificate (``sha256:<hex>``), once it exists; None without TLS."""
    files = tls_files(settings)
    if files is None or not files[0].is_file():
        return None
    return fingerprint(files[0].read_text())


def head_trust(settings: Settings) -> HeadTrust:
    """What a client on this machine trusts: the head's own certificate when this DGPT_HOME
    holds it, else the pin in ``DGPT_HEAD_FINGERPRINT``, else the system's CAs."""
    files = tls_files(settings)
    return HeadTrust(settings.local_head_url, pin=settings.head_fingerprint,
                     ca_file=files[0] if files is not None else None)

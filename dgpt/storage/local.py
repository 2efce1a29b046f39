"""A storage tier on one machine: the metadata service over a folder, piece servers as processes.

``open_local_service(folder)`` is what the ``local://`` connector of :mod:`dgpt.storage.fs`
opens: a :class:`~dgpt.storage.service.StorageService` over ``folder/metadata.sqlite`` with
the cluster secret in ``folder/secret`` (created on first use, owner-only) and optional
``folder/options.json`` (:class:`~dgpt.storage.service.StorageOptions`). One instance per
folder per process; several processes may open the same folder (SQLite WAL serialises them).

:class:`PieceServerProcess` runs ``python -m dgpt.storage.piece_server`` as its own process
with its own folder, port and key, the way a donor agent will run its piece server; tests
and local fabrics use it until the agent embeds the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dgpt.exceptions import DgptError
from dgpt.storage.metadata import MetadataStore
from dgpt.storage.models import DonorSpec
from dgpt.storage.service import StorageOptions, StorageService, load_or_create_secret

_SERVICES: dict[Path, StorageService] = {}
_LOCK = threading.Lock()


def open_local_service(folder: Path) -> StorageService:
    """The process-wide metadata service over ``folder`` (created on first use)."""
    folder = folder.expanduser().resolve()
    with _LOCK:
        service = _SERVICES.get(folder)
        if service is None:
            folder.mkdir(parents=True, exist_ok=True)
            options_path = folder / "options.json"
            options = StorageOptions.model_validate_json(options_path.read_text()) if options_path.is_file() else None
            service = StorageService(MetadataStore(folder / "metadata.sqlite"), load_or_create_secret(folder / "secret"),
                                     options)
            _SERVICES[folder] = service
        return service


def write_options(folder: Path, options: StorageOptions) -> None:
    """Record the options every process opening ``folder`` uses."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "options.json.tmp"
    tmp.write_text(options.model_dump_json())
    os.replace(tmp, folder / "options.json")


@dataclass
class PieceServerProcess:
    """A piece server in its own process (its own folder, port and key)."""

    donor_id: str
    owner: str
    root: Path
    capacity_bytes: int
    url: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, service: StorageService, donor_id: str, owner: str, root: Path, capacity_bytes: int,
              port: int, reliability: float = 0.9, register: bool = True, timeout_s: float = 30.0,
              fsync: bool = False) -> PieceServerProcess:
        """Start the process, wait for it to serve, and register it with ``service``.

        Raises:
            DgptError: it did not come up within ``timeout_s`` (its log is in ``root/server.log``).
        """
        root.mkdir(parents=True, exist_ok=True)
        key_file = root / "donor.key"
        fd = os.open(str(key_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(service.donor_key(donor_id).hex())
        argv = [sys.executable, "-m", "dgpt.storage.piece_server", "--root", str(root / "store"),
                "--capacity-bytes", str(capacity_bytes), "--donor-id", donor_id, "--key-file", str(key_file),
                "--port", str(port)] + ([] if fsync else ["--no-fsync"])
        log = open(root / "server.log", "ab")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        url = _await_ready(proc, timeout_s, root / "server.log")
        server = cls(donor_id, owner, root, capacity_bytes, url, proc)
        if register:
            service.register_donor(DonorSpec(donor_id=donor_id, owner=owner, url=url, capacity_bytes=capacity_bytes,
                                             reliability=reliability))
        return server

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the donor vanishes without a word."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


def _await_ready(proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    result: dict[str, str] = {}

    def read() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line:
            result.update(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if "url" not in result:
        proc.kill()
        proc.wait(10)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise DgptError(f"piece server did not start within {timeout_s:.0f}s", hint=f"its log says:\n{tail}")
    return result["url"]

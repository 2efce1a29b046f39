"""Where the head keeps its state under ``DGPT_HOME``: one place, so no path is spelled twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dgpt.tls import tls_folder


def head_paths(home: Path) -> dict[str, Path]:
    """The head's files: SQLite, secrets, pid and address files, its log."""
    head = home / "head"
    return {
        "dir": head,
        "db": head / "registry.sqlite",
        "ray_token": head / "ray_auth_token",
        "api_key": head / "api_key",
        "pid": head / "head.pid",
        "info": head / "head.json",
        "log": home / "logs" / "head.log",
        "control_log": home / "logs" / "control-plane.log",
        # The overlay (dgpt.overlay): the head's WireGuard key, its grants, wireguard-go's log.
        "overlay_key": head / "overlay.key",
        "overlay_db": head / "overlay.sqlite",
        "overlay_log": home / "logs" / "wireguard.log",
        # The storage tier's metadata (dgpt.head.storage_tier): SQLite and the cluster secret.
        "storage": head / "storage",
        # The API's TLS certificate and key when the head made them (dgpt.tls).
        "tls": tls_folder(home),
    }


def ray_temp_dir(home: Path, node: str = "head") -> Path:
    """A short Ray temp folder of its own for one node (the head, or a simulated donor).

    Unix socket paths are limited to 107 bytes, so Ray's temp folder must be short even when
    DGPT_HOME is deep (pytest tmp dirs): one short folder per DGPT_HOME and node. Each node
    of the local fabric gets its own, as it would on separate machines: its own sockets,
    session logs and unpacked runtime environments.
    """
    digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / (f"dgpt-{digest}" if node == "head" else f"dgpt-{digest}-{node}")

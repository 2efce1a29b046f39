"""The donor side of the preflight: answer on the Ray ports while no raylet runs, check the GCS.

Before the head tells a donor to start Ray it checks that it can reach the donor's node
manager and object manager ports. No raylet holds them while the donor waits in standby,
so the agent listens on them itself (accepting and closing connections) and lets them go
just before `ray start`. The agent in turn checks that it reaches the head's GCS port.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Sequence

from dgpt.netaddr import tcp_reachable

log = logging.getLogger("dgpt.donor")


class PortProbe:
    """Listeners on ``ports`` that accept and close every connection, in one thread."""

    def __init__(self, ports: Sequence[int], host: str = "0.0.0.0") -> None:
        self.ports = tuple(ports)
        self.host = host
        self._socks: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def listening(self) -> bool:
        return bool(self._socks)

    def start(self) -> str | None:
        """Listen on every port; a problem (a port taken by another program) with its fix, or None."""
        if self._socks:
            return None
        socks: list[socket.socket] = []
        for port in self.ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, port))
            except OSError as exc:
                s.close()
                for other in socks:
                    other.close()
                if exc.errno == errno.EADDRINUSE:
                    return (f"port {port} is in use on this donor by another program; pick another block of Ray "
                            f"ports with --ray-port-base (or DGPT_RAY_NODE_PORT_BASE)")
                return f"cannot listen on port {port}: {exc.strerror or exc}"
            s.listen(16)
            s.settimeout(0.2)
            socks.append(s)
        self._socks = socks
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="port-probe", daemon=True)
        self._thread.start()
        return None

    def _serve(self) -> None:
        while not self._stop.is_set():
            for s in list(self._socks):
                try:
                    conn, _ = s.accept()
                    conn.close()
                except (TimeoutError, OSError):
                    continue

    def stop(self) -> None:
        """Let the ports go (the raylet takes them next)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        for s in self._socks:
            s.close()
        self._socks = []


def gcs_problem(gcs_address: str) -> str | None:
    """Why this donor cannot reach the head's GCS, with the fix; None when it can."""
    host, _, port = gcs_address.rpartition(":")
    result = tcp_reachable(host, int(port))
    if result.ok:
        return None
    return (f"cannot reach the head's Ray GCS at {gcs_address}: {result.error}; open TCP {port} on the head to this "
            "donor (and the head's node ports), or join through the overlay")

"""A storage tier of real processes for tests: one piece-server process per donor, no Ray.

Each piece server has its own folder, port and key (K_d), the way donor agents will; the
metadata service runs in the test process over a folder (the ``local://`` connector opens the
same instance).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgpt.processes import free_port
from dgpt.storage.datapath import StorageClient
from dgpt.storage.local import PieceServerProcess, open_local_service, write_options
from dgpt.storage.service import StorageOptions, StorageService
from dgpt.storage.transport import HttpTransport

#: Small segments and stripes so kilobyte files span several of each.
TEST_OPTIONS = StorageOptions(segment_bytes=256 * 1024, stripe_plain_bytes=64 * 1024, gc_grace_s=0.0)


@dataclass
class StorageCluster:
    folder: Path
    service: StorageService
    servers: dict[str, PieceServerProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"local://{self.folder / 'meta'}"

    def client(self, **options: Any) -> StorageClient:
        return StorageClient(self.service, HttpTransport(connect_timeout_s=2.0, timeout_s=20.0), io_workers=8,
                             **options)

    def holders(self, path: str) -> list[str]:
        """Donors holding any piece of ``path``."""
        file_id = self.service.info(path).file_id
        assert file_id is not None
        return sorted({p.donor_id for p in self.service.store.pieces(file_id)})

    def piece_file(self, donor_id: str, piece_id: str) -> Path:
        return self.servers[donor_id].store_dir / "pieces" / piece_id[:2] / piece_id

    def stop(self) -> None:
        for server in self.servers.values():  # all at once: each takes a moment to wind down
            if server.alive():
                server.proc.terminate()
        for server in self.servers.values():
            server.stop()


def start_cluster(folder: Path, donors: int, owners: int | None = None, options: StorageOptions = TEST_OPTIONS,
                  capacity_bytes: int = 256 << 20) -> StorageCluster:
    """Start ``donors`` piece-server processes (in parallel) and a metadata service over ``folder``."""
    owners = owners or donors
    write_options(folder / "meta", options)
    service = open_local_service(folder / "meta")
    cluster = StorageCluster(folder, service)

    def one(i: int) -> PieceServerProcess:
        return PieceServerProcess.start(service, f"donor-{i}", f"owner-{i % owners}", folder / f"donor-{i}",
                                        capacity_bytes, free_port())

    with cf.ThreadPoolExecutor(max_workers=donors) as pool:
        for server in pool.map(one, range(donors)):
            cluster.servers[server.donor_id] = server
    return cluster

"""The storage tier's data path against a raw local file copy, side by side in one run.

    python -m benchmarks.storage [--quick] [--out benchmarks/results/storage.json]

In-process, no network: 64 piece stores (one per simulated donor, each its own folder)
behind :class:`~dgpt.storage.transport.LocalTransport`, the real metadata service on a
SQLite file, the real client (sealing on the worker pool). With 64 eligible donors the
service picks its widest default profile, 16-of-48 (3x). Piece stores and the floor's files
live in the same folder (``/dev/shm`` when it exists, so both measure the data path rather
than this host's disk; ``--dir`` to change it); piece stores run without fsync (the floor
does not fsync either).

Rounds alternate floor and dgpt so a shared, noisy host drifts the same for both; the
report gives the median of the rounds and the best round.

1. write: ``StorageClient.write_bytes`` (encrypt, erasure-code, hash, place, store with the
   stores' hash checks, commit) vs writing the same bytes to one local file.
2. read: the file streamed back in 64 MiB reads (``FileReader.read``), every piece
   available (systematic: no decoding), vs the same 64 MiB reads of the local file. Both
   sides allocate each chunk afresh, as a consumer streaming a file does.
3. worst-case read: the first n - k pieces of every segment are unreachable, so every
   stripe is decoded from parity (and the reader has to find that out itself).
4. repair: one 64 MiB segment whose durable pieces fell to the repair threshold; time to
   rebuild the missing pieces and commit them.
5. Ray Data (``--ray-data``, or ``--ray-data-only`` to refresh just that section): a local
   fabric (``dgpt up``: a head and donor agents with piece servers, unsandboxed so the
   baseline's folder is shared), then :mod:`dgpt.storage.pipeline` - read_parquet, a
   transform, a groupby aggregation, write_parquet - on ``dgpt://`` and on the same files in
   a local folder, alternating rounds; the ratio is local time / dgpt time (target >= 0.5).

Targets on a 2-core host: write >= 350 MB/s, worst-case read >= 500 MB/s; Ray Data over
``dgpt://`` >= 0.5x the same pipeline on local files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgpt.exceptions import PieceServerUnreachable
from dgpt.storage import crypto
from dgpt.storage.datapath import StorageClient
from dgpt.storage.metadata import MetadataStore
from dgpt.storage.models import DonorSpec
from dgpt.storage.piece_server import PieceService
from dgpt.storage.piece_store import PieceStore
from dgpt.storage.pool import default_pool
from dgpt.storage.repair import Repairer
from dgpt.storage.service import StorageService
from dgpt.storage.transport import LocalTransport

RESULTS = Path(__file__).resolve().parent / "results" / "storage.json"
#: Reads stream the file in chunks of this size on both sides.
CHUNK = 64 << 20
DONORS = 64  # the widest tier needs 60; the rest leave room to repair a segment whose 16 pieces were lost
TARGETS = {"write_mb_s": 350.0, "worst_read_mb_s": 500.0}


def _say(msg: str) -> None:
    print(f"[storage {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class LossyTransport(LocalTransport):
    """A LocalTransport whose listed pieces are unreachable (their donors are offline)."""

    def __init__(self, base: LocalTransport, lost: set[str]) -> None:
        super().__init__(base.services)
        self.lost = lost

    def get(self, url: str, piece_id: str, capability: str, start: int = 0, end: int | None = None) -> bytes:
        if piece_id in self.lost:
            raise PieceServerUnreachable(f"piece server {url} is not reachable")
        return super().get(url, piece_id, capability, start, end)


def _fabric(root: Path) -> tuple[StorageService, LocalTransport]:
    service = StorageService(MetadataStore(root / "metadata.sqlite"), crypto.new_secret())
    transport = LocalTransport()
    for i in range(DONORS):
        donor_id, url = f"donor-{i:02d}", f"local://donor-{i:02d}"
        store = PieceStore(root / donor_id, 8 << 30, fsync=False)
        transport.services[url] = PieceService(store, donor_id, service.donor_key(donor_id))
        service.register_donor(DonorSpec(donor_id=donor_id, owner=f"owner-{i:02d}", url=url, capacity_bytes=8 << 30,
                                         reliability=0.9))
    return service, transport


def _drain_file(f: Any) -> int:
    total = 0
    while chunk := f.read(CHUNK):
        total += len(chunk)
    return total


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _summary(rates: list[float]) -> dict[str, float]:
    return {"median_mb_s": round(statistics.median(rates), 1), "best_mb_s": round(max(rates), 1),
            "rounds_mb_s": [round(r, 1) for r in rates]}


def ray_data(mb: float, donors: int, active: int, rounds: int) -> dict[str, Any]:
    """The Ray Data pipeline on ``dgpt://`` vs the same pipeline on local files, on a local fabric."""
    import subprocess

    from dgpt.head import fabric
    from dgpt.head.process import shell_env

    home = Path(tempfile.mkdtemp(prefix="dgpt-bench-rd-"))
    settings = fabric.private_settings(home, sandbox="off")
    _say(f"ray data: starting a fabric of {donors} donors ({active} active)")
    try:
        fabric.up(settings, donors, timeout_s=300, min_active=active)
        env = {**os.environ, **shell_env(settings), "DGPT_HOME": str(home)}
        argv = [sys.executable, "-m", "dgpt.storage.pipeline", "--mb", f"{mb:g}", "--files", "16",
                "--rounds", str(rounds), "--local-dir", str(home / "local"), "--prefix", "bench/pipeline"]
        _say("ray data: " + " ".join(argv[1:]))
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("DGPT_PIPELINE ")), None)
        if line is None:
            return {"measured": False, "error": (out.stdout + out.stderr)[-2000:]}
        report = json.loads(line.split(" ", 1)[1])
    finally:
        fabric.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    ratio = report["ratio"]
    return {"measured": True, "mb": mb, "donors": donors, "active_donors": active, "rounds": rounds,
            "rows": report["rows"], "bytes": report["bytes"], "dgpt_s": report["dgpt_s"], "local_s": report["local_s"],
            "dgpt_rounds_s": report["dgpt_rounds_s"], "local_rounds_s": report["local_rounds_s"],
            "dgpt_mb_s": round(report["bytes"] / 1e6 / report["dgpt_s"], 1),
            "local_mb_s": round(report["bytes"] / 1e6 / report["local_s"], 1),
            "ratio": ratio, "target": 0.5, "met": ratio is not None and ratio >= 0.5,
            "rows_per_donor": report["donors"], "results_matched": report["matched"]}


def run(size_mb: int, rounds: int, folder: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dgpt-bench-storage-", dir=folder))
    try:
        return _run(size_mb, rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(size_mb: int, rounds: int, root: Path) -> dict[str, Any]:
    service, transport = _fabric(root)
    profile = service.choose_profile()
    data = os.urandom(size_mb << 20)
    nbytes = len(data)
    floor_path = root / "floor.bin"
    pool = default_pool()
    pool_ok = pool.usable(1)
    _say(f"{size_mb} MiB, profile {profile.name}, {rounds} round(s), pool {'on' if pool_ok else 'off'} "
         f"({pool.workers} workers), folder {root.parent}")

    def floor_write() -> None:
        with open(floor_path, "wb") as f:
            f.write(data)

    def floor_read() -> int:
        with open(floor_path, "rb") as f:
            return _drain_file(f)

    def dgpt_read(client: StorageClient, path: str) -> None:
        reader = client.reader(path)
        for start in range(0, reader.size, CHUNK):
            chunk = reader.read(start, start + CHUNK)
            assert chunk[:16] == data[start : start + 16]

    rates: dict[str, list[float]] = {k: [] for k in ("floor_write", "write", "floor_read", "read", "worst_read")}
    decoded = 0
    loads: list[float] = []
    for r in range(rounds):
        path = f"bench/round-{r}.bin"
        seconds, _ = _timed(floor_write)
        rates["floor_write"].append(nbytes / seconds / 1e6)
        client = StorageClient(service, transport)
        seconds, entry = _timed(lambda: client.write_bytes(path, data))  # noqa: B023
        rates["write"].append(nbytes / seconds / 1e6)
        if r == 0:
            assert StorageClient(service, transport).read_bytes(path) == data, "read mismatch"
        seconds, read_back = _timed(floor_read)
        assert read_back == nbytes
        rates["floor_read"].append(nbytes / seconds / 1e6)
        seconds, _ = _timed(lambda: dgpt_read(StorageClient(service, transport), path))  # noqa: B023
        rates["read"].append(nbytes / seconds / 1e6)
        lost = {p.piece_id for p in service.store.pieces(entry.file_id) if p.index < profile.m}
        worst = StorageClient(service, LossyTransport(transport, lost))
        seconds, _ = _timed(lambda: dgpt_read(worst, path))  # noqa: B023
        decoded = worst.stats.decoded
        rates["worst_read"].append(nbytes / seconds / 1e6)
        if r == 0:
            assert StorageClient(service, LossyTransport(transport, lost)).read_bytes(path) == data, "worst mismatch"
        loads.append(round(os.getloadavg()[0], 2))
        _say(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) + " MB/s")
        service.delete(path)
        floor_path.unlink()

    repair = _repair(service, transport, profile.repair_at)
    components = _components(service, transport, profile)
    out: dict[str, Any] = {
        "profile": profile.name,
        "bytes": nbytes,
        "write": {"dgpt": _summary(rates["write"]), "floor": _summary(rates["floor_write"])},
        "read": {"dgpt": _summary(rates["read"]), "floor": _summary(rates["floor_read"])},
        "worst_read": {"dgpt": _summary(rates["worst_read"]), "floor": _summary(rates["floor_read"]),
                       "missing_pieces_per_segment": profile.m, "segments_decoded": decoded},
        "repair": repair,
        "components": components,
        "load_avg_per_round": loads,
        "ray_data": {"measured": False, "how": "python -m benchmarks.storage --ray-data (or --ray-data-only)"},
    }
    for key, floor_key in (("write", "floor_write"), ("read", "floor_read"), ("worst_read", "floor_read")):
        out[key]["ratio_to_floor"] = round(statistics.median(rates[key]) / statistics.median(rates[floor_key]), 3)
    out["targets"] = {
        "write_mb_s": {"target": TARGETS["write_mb_s"], "median": out["write"]["dgpt"]["median_mb_s"],
                       "met": out["write"]["dgpt"]["median_mb_s"] >= TARGETS["write_mb_s"]},
        "worst_read_mb_s": {"target": TARGETS["worst_read_mb_s"], "median": out["worst_read"]["dgpt"]["median_mb_s"],
                            "met": out["worst_read"]["dgpt"]["median_mb_s"] >= TARGETS["worst_read_mb_s"]},
    }
    out["pool"] = {"used": pool_ok, "workers": pool.workers}
    return out


def _repair(service: StorageService, transport: LocalTransport, repair_at: int) -> dict[str, Any]:
    """Time to rebuild one 64 MiB segment whose durable pieces fell to the repair threshold."""
    client = StorageClient(service, transport)
    data = os.urandom(service.options.segment_bytes)
    entry = client.write_bytes("bench/repair.bin", data)
    rows = service.store.pieces(entry.file_id, 0)
    gone = [r.donor_id for r in rows[: len(rows) - repair_at]]
    for donor_id in gone:
        service.set_donor_state(donor_id, "gone")
    seconds, outcome = _timed(lambda: Repairer(service, client).repair_segment(entry.file_id, 0))
    assert StorageClient(service, transport).read_bytes("bench/repair.bin") == data
    for donor_id in gone:
        service.set_donor_state(donor_id, "online")
    return {"segment_bytes": len(data), "pieces_rebuilt": len(outcome.rebuilt), "seconds": round(seconds, 3),
            "bytes_read": outcome.bytes_read, "bytes_written": outcome.bytes_written,
            "rebuilt_mb_s": _rate(outcome.bytes_written, seconds)}


def _components(service: StorageService, transport: LocalTransport, profile: Any) -> dict[str, Any]:
    """Where a segment's time goes: sealing (inline, 1 and 2 workers), storing, opening."""
    from dgpt.storage.codec import codec_for
    from dgpt.storage.crypto import StripeCipher, new_file_key
    from dgpt.storage.pool import SegmentPool
    from dgpt.storage.segment import STRIPE_PLAIN_BYTES, open_stripes, seal_segment

    seg = memoryview(os.urandom(service.options.segment_bytes))
    key = new_file_key()
    cipher, codec = StripeCipher(key, "bench"), codec_for(profile.k, profile.n)
    out: dict[str, Any] = {"segment_bytes": len(seg)}

    def best(fn: Callable[[], Any], reps: int = 3) -> float:
        return min(_timed(fn)[0] for _ in range(reps))

    out["seal_inline_mb_s"] = _rate(len(seg), best(lambda: seal_segment(cipher, codec, 0, seg)))
    for workers in (1, 2):
        pool = SegmentPool(workers=workers)
        if not pool.usable(1):
            break

        def seal_once(pool: SegmentPool = pool) -> None:
            pool.seal(key, "bench", profile.k, profile.n, 0, seg, STRIPE_PLAIN_BYTES).release()

        out[f"seal_pool_{workers}_workers_mb_s"] = _rate(len(seg), best(seal_once))
        pool.close()
    sealed = seal_segment(cipher, codec, 0, seg)
    stores = [s.store for s in transport.services.values()][: profile.n]

    def store_all() -> None:
        for i, store in enumerate(stores):
            store.put(sealed.piece_ids[i], sealed.pieces[i], sealed.layout.piece_bytes, sealed.layout.leaf_bytes)
        for i, store in enumerate(stores):
            store.delete(sealed.piece_ids[i])

    out["store_n_pieces_mb_s"] = _rate(len(seg), best(store_all))
    layout = sealed.layout
    parity = {i: sealed.piece(i) for i in range(profile.n - profile.k, profile.n)}
    data_pieces = {i: sealed.piece(i) for i in range(profile.k)}
    stripes = range(layout.stripes)
    out["open_inline_from_parity_mb_s"] = _rate(len(seg), best(
        lambda: open_stripes(cipher, codec, layout, 0, stripes, parity)))
    out["open_inline_systematic_mb_s"] = _rate(len(seg), best(
        lambda: open_stripes(cipher, codec, layout, 0, stripes, data_pieces)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 rounds (CI); default 512 MiB, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm") if os.path.isdir("/dev/shm") else None,
                        help="where piece stores and the floor's file live (default /dev/shm)")
    parser.add_argument("--ray-data", action="store_true", help="also run the Ray Data pipeline on a local fabric")
    parser.add_argument("--ray-data-only", action="store_true",
                        help="run only the Ray Data part and update that section of --out")
    parser.add_argument("--ray-data-mb", type=float, default=None, help="its dataset size (default 300, --quick 60)")
    parser.add_argument("--ray-data-donors", type=int, default=4)
    parser.add_argument("--ray-data-active", type=int, default=2)
    args = parser.parse_args(argv)
    rd_mb = args.ray_data_mb or (60.0 if args.quick else 300.0)
    rd_rounds = 1 if args.quick else 2
    if args.ray_data_only:
        report = json.loads(args.out.read_text()) if args.out.is_file() else {}
        report["ray_data"] = ray_data(rd_mb, args.ray_data_donors, args.ray_data_active, rd_rounds)
        report.setdefault("targets", {})["ray_data_ratio"] = {
            "target": 0.5, "median": report["ray_data"].get("ratio"), "met": report["ray_data"].get("met", False)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        _say(f"ray data: {json.dumps(report['ray_data'])}; wrote {args.out}")
        return 0
    # A SIGTERM (a timeout) still removes the piece stores from /dev/shm on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size_mb, rounds = (128, 2) if args.quick else (512, 3)
    folder = args.dir or Path(tempfile.gettempdir())
    meta = {"quick": args.quick, "host_cpus": os.cpu_count(), "python": platform.python_version(),
            "donors": DONORS, "folder": str(folder), "fsync": False,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results = run(size_mb, rounds, folder)
    if args.ray_data:
        results["ray_data"] = ray_data(rd_mb, args.ray_data_donors, args.ray_data_active, rd_rounds)
        results["targets"]["ray_data_ratio"] = {"target": 0.5, "median": results["ray_data"].get("ratio"),
                                                "met": results["ray_data"].get("met", False)}
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    report = {"meta": meta, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key in ("write", "read", "worst_read"):
        _say(f"{key}: dgpt {report[key]['dgpt']['median_mb_s']} MB/s, floor {report[key]['floor']['median_mb_s']} MB/s "
             f"(x{report[key]['ratio_to_floor']})")
    for name, t in report["targets"].items():
        _say(f"target {name} >= {t['target']}: median {t['median']} -> {'met' if t['met'] else 'MISSED'}")
    _say(f"repair of one segment: {report['repair']['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray Data over the storage tier: the reference pipeline, run on ``dgpt://`` and on local files.

    python -m dgpt.storage.pipeline --mb 300 --local-dir /tmp/pipeline-local

It generates a Parquet dataset (``--mb`` of random readings in ``--files`` files, seeded, so
both runs see the same bytes), writes it once to ``dgpt://PREFIX/input`` and once to a local
folder, and runs the same pipeline on each:

1. ``ray.data.read_parquet`` (on ``dgpt://`` with ``filesystem=DonorFileSystem()``);
2. a transform per batch (``z = x * y + sqrt(|x|)``; each row also records the Ray node it
   was transformed on);
3. an aggregation: rows, sum of ``z`` and sum of ``x`` per ``(key, node)`` (the donor's Ray
   node, mapped to its donor id at the end);
4. ``write_parquet`` of the result back to the same filesystem, read back, and reduced to
   one row per ``key`` (count, sum of z, mean of x).

The results of both runs must match (counts exactly, sums to 1e-9 relative). One
``DGPT_PIPELINE {json}`` line reports sizes, times, the ratio, which donors did the work and
whether the results matched. Runs as a Ray job or as a driver (``RAY_ADDRESS``).

Baselines (``--baseline``): ``ray-local`` runs the same Ray Data pipeline on the local folder,
which every node must read and write at the same path (a one-machine fabric whose donors
are not sandboxed: the sandbox hides the owner's folders from the work, by design);
``driver`` computes the same transform and aggregation in this process from the local copy
(works on any fabric; no time ratio). ``dgpt://`` itself needs no shared folder: donors
reach each other's piece servers over the network, sandbox or not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Distinct group keys of the generated data (the aggregation's output has this many rows).
KEYS = 256
#: Bytes one generated row takes in Parquet (random float64s do not compress).
ROW_BYTES = 28


def generate(mb: float, files: int, seed: int, write: Any) -> tuple[int, int]:
    """Generate ``mb`` MB in ``files`` Parquet files; ``write(name, table)`` stores one.

    Returns (rows, bytes of Parquet written).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_total = max(files, int(mb * 1e6 / ROW_BYTES))
    per_file = -(-rows_total // files)
    written = rows = 0
    for i in range(files):
        n = min(per_file, rows_total - i * per_file)
        if n <= 0:
            break
        rng = np.random.default_rng([seed, i])
        table = pa.table({
            "id": np.arange(i * per_file, i * per_file + n, dtype=np.int64),
            "key": rng.integers(0, KEYS, n, dtype=np.int32),
            "x": rng.standard_normal(n),
            "y": rng.standard_normal(n),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="none")
        data = sink.getvalue().to_pybytes()
        write(f"part-{i:04d}.parquet", data)
        written += len(data)
        rows += n
    return rows, written


def _features(batch: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    x, y = batch["x"], batch["y"]
    z = pc.add(pc.multiply(x, y), pc.sqrt(pc.abs(x)))
    # The node id (from the core worker itself); the driver maps ids to donors (node_donors).
    node = ray.get_runtime_context().get_node_id()
    return pa.table({"key": batch["key"], "x": x, "z": z, "donor": pa.array([node] * len(batch), pa.string())})


def node_donors() -> dict[str, str]:
    """Ray node id -> the dgpt donor id it runs for (``head`` for the head)."""
    import ray

    return {n["NodeID"]: (n.get("Labels") or {}).get("dgpt.io/donor-id", "head") for n in ray.nodes()}


def run(input_path: str, output_path: str, filesystem: Any, blocks: int) -> tuple[Any, dict[str, int], float]:
    """The pipeline on one filesystem: (per-key result, rows per donor, seconds).

    ``blocks``: read tasks (one per file): Ray Data would otherwise size blocks by bytes and
    read a small dataset in one task on one donor.
    """
    import ray.data
    from ray.data.aggregate import Count, Sum

    started = time.perf_counter()
    # Ray 2.60's DataSourceV2 parquet reader (ListFiles -> ReadFiles) bundles a small
    # dataset's file manifests into one read task, whatever override_num_blocks says: the
    # whole read then runs on one donor. The V1 reader makes one read task per block asked.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    # SPREAD: the read and transform tasks go round the donors rather than filling the first
    # one with free CPUs (the point is to read pieces on many donors at once).
    ds = ray.data.read_parquet(input_path, filesystem=filesystem, override_num_blocks=blocks,
                               ray_remote_args={"scheduling_strategy": "SPREAD"})
    ds = ds.map_batches(_features, batch_format="pyarrow", scheduling_strategy="SPREAD")
    # The shuffle leaves ~200 tiny blocks; the result is small: one file of it.
    agg = ds.groupby(["key", "donor"]).aggregate(Count(), Sum("z"), Sum("x")).repartition(1)
    agg.write_parquet(output_path, filesystem=filesystem)
    back = ray.data.read_parquet(output_path, filesystem=filesystem).to_pandas()
    seconds = time.perf_counter() - started
    donor_of = node_donors()
    by_donor: dict[str, int] = {}
    for node, rows in back.groupby("donor")["count()"].sum().items():
        donor = donor_of.get(str(node), str(node))
        by_donor[donor] = by_donor.get(donor, 0) + int(rows)
    per_key = back.groupby("key").agg(count=("count()", "sum"), z=("sum(z)", "sum"), x=("sum(x)", "sum")).sort_index()
    per_key["mean_x"] = per_key["x"] / per_key["count"]
    return per_key[["count", "z", "mean_x"]], by_donor, seconds


def run_in_driver(folder: Path) -> Any:
    """The same transform and aggregation in this process (pyarrow), per key."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(folder)
    x = table["x"]
    z = pc.add(pc.multiply(x, table["y"]), pc.sqrt(pc.abs(x)))
    frame = table.select(["key", "x"]).append_column("z", z).to_pandas()
    per_key = frame.groupby("key").agg(count=("x", "size"), z=("z", "sum"), x=("x", "sum")).sort_index()
    per_key["mean_x"] = per_key["x"] / per_key["count"]
    return per_key[["count", "z", "mean_x"]]


def same_results(a: Any, b: Any) -> bool:
    """Counts equal, sums equal up to summation order (1e-9 relative)."""
    return (list(a.index) == list(b.index) and bool((a["count"].to_numpy() == b["count"].to_numpy()).all())
            and bool(np.allclose(a["z"], b["z"], rtol=1e-9, atol=1e-9))
            and bool(np.allclose(a["mean_x"], b["mean_x"], rtol=1e-9, atol=1e-12)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgpt.storage.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300.0, help="size of the generated dataset (MB)")
    parser.add_argument("--files", type=int, default=16, help="Parquet files it is cut into")
    parser.add_argument("--prefix", default="pipeline", help="dgpt:// folder of the run")
    parser.add_argument("--local-dir", type=Path, default=Path("/tmp/dgpt-pipeline-local"),
                        help="local folder of the baseline run (every node must see it)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each pipeline, alternating (times are medians: warm-up hits both alike)")
    parser.add_argument("--baseline", choices=("ray-local", "driver"), default="ray-local",
                        help="the same Ray Data pipeline on local files, or the same computation in this process")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.files < 1 or args.rounds < 1:
        parser.error("--mb must be > 0, --files >= 1 and --rounds >= 1")
    import ray

    from dgpt.storage.fs import DonorFileSystem

    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    fs = DonorFileSystem()
    prefix = args.prefix.strip("/")
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    shutil.rmtree(args.local_dir, ignore_errors=True)
    (args.local_dir / "input").mkdir(parents=True)

    def write_both(name: str, data: bytes) -> None:
        fs.pipe_file(f"{prefix}/input/{name}", data)
        (args.local_dir / "input" / name).write_bytes(data)

    t0 = time.perf_counter()
    rows, nbytes = generate(args.mb, args.files, args.seed, write_both)
    generated_s = time.perf_counter() - t0
    local_times, remote_times = [], []
    for _ in range(args.rounds):
        if args.baseline == "ray-local":
            shutil.rmtree(args.local_dir / "output", ignore_errors=True)
            local, local_donors, seconds = run(str(args.local_dir / "input"), str(args.local_dir / "output"), None,
                                               args.files)
        else:
            t1 = time.perf_counter()
            local, local_donors = run_in_driver(args.local_dir / "input"), {}
            seconds = time.perf_counter() - t1
        local_times.append(seconds)
        if fs.exists(f"{prefix}/output"):
            fs.rm(f"{prefix}/output", recursive=True)
        remote, donors, seconds = run(f"dgpt://{prefix}/input", f"dgpt://{prefix}/output", fs, args.files)
        remote_times.append(seconds)
    local_s, remote_s = statistics.median(local_times), statistics.median(remote_times)
    matched = same_results(local, remote)
    report = {"rows": rows, "bytes": nbytes, "files": args.files, "generate_and_write_s": round(generated_s, 2),
              "dgpt_s": round(remote_s, 2), "local_s": round(local_s, 2),
              "dgpt_rounds_s": [round(t, 2) for t in remote_times], "local_rounds_s": [round(t, 2) for t in local_times],
              "baseline": args.baseline,
              "ratio": round(local_s / remote_s, 3) if remote_s and args.baseline == "ray-local" else None,
              "donors": donors,
              "local_donors": local_donors, "output": fs.ls(f"{prefix}/output", detail=False), "matched": matched}
    print("DGPT_PIPELINE " + json.dumps(report), flush=True)
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())

"""The same digits job with plain Ray Train and no dgpt: fixed workers, periodic checkpoints only.

    eval "$(dgpt env)"
    python examples/train_digits_plain.py --workers 2 --steps 600 --storage-path /shared/ray-results

What a Ray user writes without dgpt: ``num_workers`` fixed, one worker per node
(``STRICT_SPREAD``), a checkpoint every ``--checkpoint-every`` steps to ``--storage-path``
(which every node must reach), Ray's own failure handling. On a dgpt fabric it still runs,
and a drained donor is survived by Ray Train itself: its preemption watcher sees the drain,
the run restarts from the last periodic checkpoint once the drain deadline passes.

``--progress-name`` logs steps to an existing named actor with plain Ray calls (the
benchmark uses it to measure the same things for both scripts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from deployments.digits import workload as w

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = w.Data.from_arrays(config["data"])
    model, optimizer = w.build(config["seed"], config["channels"], config["hidden"])
    model = ray.train.torch.prepare_model(model)
    log = None
    if rank == 0 and config.get("progress"):
        log = ray.get_actor(config["progress"], namespace=config["progress_namespace"])
    attempt = os.urandom(4).hex()

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            files = {n: open(os.path.join(folder, n), "rb").read() for n in ("model.pt", "optimizer.pt")}
            step = json.load(open(os.path.join(folder, "state.json")))["step"]
        w.load_state(model, optimizer, files, device)
    if log:
        log.record.remote({"ev": "attempt", "t": time.time(), "attempt": attempt, "world_size": world,
                           "resume_step": step})
    while step < config["steps"]:
        loss = w.train_step(model, optimizer, data, step, rank, world, device, config["seed"])
        step += 1
        if log:
            log.record.remote({"ev": "step", "t": time.time(), "attempt": attempt, "step": step})
        if step % config["checkpoint_every"] == 0 or step == config["steps"]:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    for name, blob in w.state_files(model, optimizer).items():
                        with open(os.path.join(folder, name), "wb") as f:
                            f.write(blob)
                    with open(os.path.join(folder, "state.json"), "w") as f:
                        json.dump({"step": step}, f)
                ray.train.report({"step": step, "loss": loss},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
            if log:
                log.record.remote({"ev": "checkpoint", "t": time.time(), "attempt": attempt, "step": step,
                                   "kind": "periodic"})
    acc = w.accuracy(model, data, device)
    if log:
        log.record.remote({"ev": "done", "t": time.time(), "attempt": attempt, "step": step})
    return {"accuracy": acc, "step": step, "world_size": world}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default=f"digits-plain-{int(time.time())}")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--storage-path", required=True, help="a folder every node can reach")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=20240501)
    p.add_argument("--progress-name", default=None)
    p.add_argument("--progress-namespace", default="dgpt")
    args = p.parse_args(argv)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deployments.digits import workload as w

    ray.init(logging_level="WARNING")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"data": w.load_data(args.seed).to_arrays(), "seed": args.seed, "steps": args.steps,
                           "checkpoint_every": args.checkpoint_every, "cpus_per_worker": args.cpus_per_worker,
                           "channels": args.channels, "hidden": args.hidden, "progress": args.progress_name,
                           "progress_namespace": args.progress_namespace},
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": args.cpus_per_worker},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name=args.name, storage_path=args.storage_path,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    t0 = time.time()
    result = trainer.fit()
    out = {"ok": result.error is None, "error": None if result.error is None else str(result.error)[:2000],
           "return": result.return_value, "wall_s": round(time.time() - t0, 2)}
    print("PLAIN_TRAIN_RESULT " + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

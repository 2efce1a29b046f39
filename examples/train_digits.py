"""Elastic data-parallel training of a digits CNN on donors with dgpt: survives donors leaving.

    eval "$(dgpt env)"
    python examples/train_digits.py --workers 1 3 --steps 600
    ray job submit --entrypoint-num-cpus 0 -- python examples/train_digits.py --workers 1 3

A plain ``TorchTrainer`` whose configs come from ``dgpt.train.configure`` (elastic bounds,
donors chosen for the horizon, failure budgets, checkpoints on the head's store) and whose
loop uses ``dgpt.train.Checkpointer`` (periodic checkpoints, a just-in-time checkpoint when
a donor drains, verified restore). DDP runs on gloo on CPU donors and NCCL on GPU donors
(``--gpus-per-worker 1``). Prints one ``DGPT_TRAIN_RESULT {json}`` line at the end: held-out
accuracy, attempts, steps lost per interruption, recovery times, goodput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One rank of the run (Ray Train calls it on every worker, again after every restart)."""
    import ray.train
    import ray.train.torch
    import torch

    import dgpt.train
    from deployments.digits import workload as w

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = w.Data.from_arrays(config["data"])
    model, optimizer = w.build(config["seed"], config["channels"], config["hidden"])
    # DDP over gloo (CPU) or NCCL (GPU): Ray Train picks the backend from the workers' devices.
    model = ray.train.torch.prepare_model(model)

    pause = config.get("write_pause")  # tests: stall the first attempt's writer midway

    def after_file(name: str) -> None:
        if pause and ckpt.resume_step == 0 and writing["step"] == pause["step"]:
            time.sleep(pause["seconds"])

    writing = {"step": -1}
    ckpt = dgpt.train.Checkpointer(config["checkpoint_every"], after_file=after_file)
    state = ckpt.restore()
    if state is not None:
        w.load_state(model, optimizer, state.files, device)
    step = ckpt.resume_step
    loss = float("nan")
    while step < config["steps"]:
        loss = w.train_step(model, optimizer, data, step, rank, world, device, config["seed"])
        step += 1
        writing["step"] = step
        ckpt.step_done(step, save=lambda: w.state_files(model, optimizer), metrics={"loss": loss})
    acc = w.accuracy(model, data, device)
    ckpt.finish(step, save=lambda: w.state_files(model, optimizer), metrics={"accuracy": acc, "loss": loss})
    return {"accuracy": acc, "step": step, "world_size": world, "loss": loss}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default=f"digits-{int(time.time())}", help="run name (same name: resume)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 3], help="N, or MIN MAX")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoint-every", type=int, default=50, help="periodic checkpoint interval, steps")
    p.add_argument("--checkpoints-to-keep", type=int, default=3, help="committed checkpoints kept (older ones deleted)")
    p.add_argument("--horizon-s", type=float, default=1800.0, help="how long the run should hold together")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--resize-interval-s", type=float, default=60.0)
    p.add_argument("--max-failures", type=int, default=None, help="default: sized from the fleet")
    p.add_argument("--max-preemption-failures", type=int, default=None, help="default: sized from the fleet")
    p.add_argument("--storage-path", default=None, help="default: the store --checkpoints picks")
    p.add_argument("--checkpoints", choices=("auto", "donors", "head"), default=None,
                   help="where checkpoints go without --storage-path: the donor storage tier, the head, or auto "
                        "(the donor tier once it is durable); default: the head's setting train_checkpoints")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=20240501)
    p.add_argument("--write-pause-at", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-pause-s", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--events", action="store_true", help="include every progress event in the result")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray.train.torch import TorchTrainer

    import dgpt.train
    from deployments.digits import workload as w

    workers = args.workers[0] if len(args.workers) == 1 else (args.workers[0], args.workers[1])
    ray.init(logging_level="WARNING")
    plan = dgpt.train.configure(
        args.name, workers, horizon_s=args.horizon_s, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, resize_interval_s=args.resize_interval_s,
        max_failures=args.max_failures, max_preemption_failures=args.max_preemption_failures,
        storage_path=args.storage_path, checkpoints_to_keep=args.checkpoints_to_keep, checkpoints=args.checkpoints,
    )
    print(plan.describe(), flush=True)
    dgpt.train.open_progress(args.name)
    config = {
        "data": w.load_data(args.seed).to_arrays(), "seed": args.seed, "steps": args.steps,
        "checkpoint_every": args.checkpoint_every, "cpus_per_worker": args.cpus_per_worker,
        "channels": args.channels, "hidden": args.hidden,
        "write_pause": {"step": args.write_pause_at, "seconds": args.write_pause_s} if args.write_pause_at else None,
    }
    trainer = TorchTrainer(train_loop, train_loop_config=config, scaling_config=plan.scaling_config(),
                           run_config=plan.run_config())
    t0 = time.time()
    result = trainer.fit()
    wall_s = time.time() - t0
    events = dgpt.train.read_progress(args.name)
    summary = dgpt.train.summarize(events)
    out = {
        "ok": result.error is None,
        "error": None if result.error is None else str(result.error)[:2000],
        "return": result.return_value,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_s": round(wall_s, 2),
        "attempts": summary.attempts,
        "final_step": summary.final_step,
        "computed_steps": summary.computed_steps,
        "lost_steps": summary.lost_steps,
        "steps_per_s": round(summary.steps_per_s, 3),
        "checkpoints": dict(summary.checkpoints),
        "interruptions": [vars(i) for i in summary.interruptions],
        "plan": {"workers": [plan.bounds.min_workers, plan.bounds.max_workers],
                 "donors": list(plan.placement.donor_ids) if plan.placement else None,
                 "max_failures": plan.max_failures, "max_preemption_failures": plan.max_preemption_failures,
                 "label_selector": dict(plan.label_selector), "checkpoint_store": plan.checkpoint_store,
                 "storage_path": plan.storage_path, "notes": list(plan.notes)},
    }
    if args.events:
        out["events"] = events
    print("DGPT_TRAIN_RESULT " + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

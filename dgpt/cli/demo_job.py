"""The demo's job: real torch training steps as Ray tasks, spread over every donor.

A plain Ray program (it never imports dgpt): `ray job submit -- python -m dgpt.cli.demo_job`.
Each task trains a small regression MLP for a few seconds on the donor it lands on and
reports which donor that was (its ``dgpt.io/*`` node labels). Tasks retry elsewhere if their
donor leaves, so the job completes while donors come and go. One ``DGPT_TASK {json}`` line
per finished task and a closing ``DGPT_RESULT {json}`` line let the demo follow it.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import ray


@ray.remote(num_cpus=1, max_retries=5)
def train_steps(seed: int, seconds: float) -> dict:
    """Train a 2-layer MLP on synthetic data for ``seconds``; returns where and how it went."""
    import torch

    torch.set_num_threads(1)  # one task, one core: the donor's cap is what the task asked for
    torch.manual_seed(seed)
    x = torch.randn(1024, 32)
    y = x @ torch.randn(32, 1) + 0.1 * torch.randn(1024, 1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_first = loss = None
    steps = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if loss_first is None:
            loss_first = loss.item()
    labels = ray.get_runtime_context().get_node_labels()
    return {
        "task": seed,
        "donor_id": labels.get("dgpt.io/donor-id", "head"),
        "device_class": labels.get("dgpt.io/device-class", "head"),
        "steps": steps,
        "loss_first": round(loss_first or 0.0, 4),
        "loss_last": round(loss.item() if loss is not None else 0.0, 4),
        "finished_at": time.time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=36, help="training tasks to run")
    parser.add_argument("--seconds", type=float, default=2.0, help="training time per task")
    args = parser.parse_args()
    if args.tasks < 1 or args.seconds <= 0:
        parser.error("--tasks must be >= 1 and --seconds > 0")

    ray.init()
    # SPREAD: Ray's own scheduler spreads the tasks over the donors.
    pending = [train_steps.options(scheduling_strategy="SPREAD").remote(i, args.seconds) for i in range(args.tasks)]
    per_donor: collections.Counter[str] = collections.Counter()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        per_donor[result["donor_id"]] += 1
        print("DGPT_TASK " + json.dumps(result), flush=True)
    print("DGPT_RESULT " + json.dumps({"tasks": args.tasks, "per_donor": dict(per_donor)}), flush=True)


if __name__ == "__main__":
    main()

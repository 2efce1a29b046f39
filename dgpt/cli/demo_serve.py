"""`dgpt demo`'s inference step: deploy the digits classifier onto donors and query it over HTTP.

Held-out digits from scikit-learn's ``load_digits`` (never seen in training) go to
``POST /digits/predict`` exactly as an inference client sends them; the step prints the
accuracy of the answers and the latency an HTTP client saw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dgpt.cli.progress import stage_progress
from dgpt.config import Settings
from dgpt.serve import deploy as serve_deploy
from dgpt.serve.loadgen import LoadLoop, summarize

DIGITS_CONFIG = Path(__file__).resolve().parents[2] / "deployments" / "digits.yaml"
# The shipped weights record the split they were trained on (data, not an import).
DIGITS_METADATA = DIGITS_CONFIG.parent / "digits" / "weights" / "digits_mlp.json"
DEMO_REQUESTS = 300
# A few clients at once: enough to see batching and both replicas, little enough for a laptop.
DEMO_CONCURRENCY = 4


def held_out_digits() -> tuple[list[list[float]], list[int]]:
    """The held-out images (flat 64 pixels, 0..16) and labels of the shipped model's split."""
    from dgpt.datasets import digits_split

    meta = json.loads(DIGITS_METADATA.read_text())
    split = digits_split(int(meta["seed"]), float(meta["test_fraction"]))
    return split.x_test.tolist(), [int(y) for y in split.y_test]


def run_inference_step(settings: Settings, console: Console, n_requests: int = DEMO_REQUESTS) -> dict[str, Any]:
    """Deploy ``deployments/digits.yaml`` on the up fabric, send held-out digits, print the figures.

    Returns:
        ``{"requests", "failed_requests", "accuracy", "p50_ms", "p99_ms", "throughput_rps",
        "replicas_per_donor", "url"}``.

    Raises:
        ConfigError / ServeError: the config is invalid or the app did not become RUNNING.
    """
    with stage_progress(console, "deploying the digits classifier") as say:
        names = serve_deploy.deploy(settings, DIGITS_CONFIG)

        def on_wait(current: serve_deploy.ServeStatus, elapsed_s: float) -> None:
            app = current.app(names[0])
            replicas = sum(app.replicas_per_donor().values()) if app else 0
            say(f"digits: {app.status if app else 'starting'}, {replicas} replica(s) up ({elapsed_s:.0f}s)",
                min(0.95, elapsed_s / 60))

        current = serve_deploy.wait_running(settings, names, on_wait=on_wait)
        say("digits RUNNING", 1.0)
    app = current.app(names[0])
    assert app is not None  # wait_running returned: the app exists
    url = f"{settings.serve_url}{app.route_prefix}/predict"
    images, labels = held_out_digits()
    bodies = [{"pixels": image} for image in images]

    def is_right(answer: Any, index: int) -> bool:
        return int(answer["predictions"][0]["digit"]) == labels[index]

    console.print(f"sending {n_requests} held-out digits to POST {url} ({DEMO_CONCURRENCY} clients at once)")
    started = time.monotonic()
    loop = LoadLoop(url, bodies, concurrency=DEMO_CONCURRENCY, max_requests=n_requests, check=is_right).start()
    loop.wait(timeout_s=300)
    samples = loop.stop()
    duration_s = time.monotonic() - started
    figures = summarize(samples, duration_s)
    answered = [s for s in samples if s.ok]
    accuracy = sum(1 for s in answered if s.answer) / len(answered) if answered else 0.0
    per_donor = serve_deploy.status(settings).app(names[0])
    result = {
        "url": url,
        "requests": figures["requests"],
        "failed_requests": figures["failed_requests"],
        "accuracy": round(accuracy, 4),
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "throughput_rps": figures["throughput_rps"],
        "replicas_per_donor": per_donor.replicas_per_donor() if per_donor else {},
    }
    table = Table(title="digits classifier on donors (HTTP, end to end)", show_header=False)
    table.add_row("requests", f"{result['requests']} ({result['failed_requests']} failed)")
    table.add_row("accuracy on held-out digits", f"{accuracy:.1%}")
    table.add_row("latency p50 / p99", f"{result['p50_ms']:.1f} ms / {result['p99_ms']:.1f} ms")
    table.add_row("throughput", f"{result['throughput_rps']:.0f} requests/s")
    table.add_row("replicas per donor", " ".join(f"{d}:{n}" for d, n in result["replicas_per_donor"].items()))
    console.print(table)
    console.print(f"try it: curl -s -X POST {url} -H 'content-type: application/json' "
                  f"-d '{{\"pixels\": {json.dumps([int(v) for v in images[0]])}}}'")
    return result

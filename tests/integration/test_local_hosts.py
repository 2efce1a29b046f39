"""Simulated donors behave like separate hosts: each raylet has a Ray temp folder of its own.

A local fabric with one active and two standby donors: an elastic Ray Train job submitted
with a ``working_dir`` grows to three workers as the autoscaler activates both standby donors
at once (their raylets start together, with no host-wide lock), and completes, three times
in a row (the vanished-working-directory race showed only on some runs); two jobs with different ``working_dir``s run side by side on the same donors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dgpt.config import Settings
from dgpt.head import fabric
from dgpt.head.paths import ray_temp_dir
from dgpt.head.process import shell_env
from tests.integration.conftest import fabric_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ELASTIC_JOB = textwrap.dedent('''
    """An elastic data-parallel job: 1 to 3 workers, resized as donors join."""
    import json, os, tempfile
    import ray, ray.train, torch
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer, prepare_model

    MARKER = open("marker.txt").read().strip()  # from this job's working_dir

    def loop(config):
        import sys
        # Ray Train moves workers into the run's folder; the job's working_dir stays on sys.path.
        here = [p for p in sys.path if os.path.isfile(os.path.join(p, "marker.txt"))]
        assert here, f"this job's working_dir is on the worker's sys.path: {sys.path}"
        assert open(os.path.join(here[0], "marker.txt")).read().strip() == MARKER, "the working_dir is this job's"
        os.getcwd()  # raises FileNotFoundError if the folder vanished under the worker
        torch.manual_seed(0)
        model = prepare_model(torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                start = json.load(open(os.path.join(d, "step.json")))["step"]
        ctx = ray.train.get_context()
        for step in range(start, config["steps"]):
            x = torch.randn(32, 8)
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            metrics = {"step": step + 1, "workers": ctx.get_world_size(), "loss": float(loss)}
            if ctx.get_world_rank() == 0:
                with tempfile.TemporaryDirectory() as d:
                    json.dump({"step": step + 1}, open(os.path.join(d, "step.json"), "w"))
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
            import time; time.sleep(0.5)

    trainer = TorchTrainer(
        loop, train_loop_config={"steps": int(os.environ.get("STEPS", "40"))},
        scaling_config=ScalingConfig(num_workers=(1, 3), resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=os.environ["STORAGE"], name=os.environ["RUN_NAME"],
                             failure_config=FailureConfig(max_failures=5)),
    )
    result = trainer.fit()
    history = result.metrics_dataframe
    print("RESULT " + json.dumps({"marker": MARKER, "max_workers": int(history["workers"].max()),
                                  "steps": int(result.metrics["step"])}))
''')


@pytest.fixture(scope="module")
def fab(ray_test_env: None) -> Iterator[Settings]:
    # The jobs keep Ray Train's checkpoints in a folder of this machine that every simulated
    # donor shares (as shared storage would be on separate hosts); the sandbox, tested in
    # test_job_envs.py and test_caps.py, lets work write only its own scratch folder.
    # The head's sandbox shows the job's driver that folder too (sandbox_shared).
    home = Path(tempfile.mkdtemp(prefix="dgpt-lh-"))
    (home / "train-storage").mkdir()
    settings = fabric_settings(home, idle_timeout_s=20.0, sandbox="off", sandbox_shared=str(home / "train-storage"))
    try:
        fabric.up(settings, 3, timeout_s=300, min_active=1)
        yield settings
    finally:
        fabric.down(settings)


def _active(settings: Settings) -> list[str]:
    with fabric.api_client(settings) as c:
        return sorted(d.name for d in c.donors() if d.state == "active")


def _submit(settings: Settings, workdir: Path, run_name: str, steps: int = 40,
            timeout_s: float = 600) -> subprocess.Popen[str]:
    storage = settings.home / "train-storage"
    storage.mkdir(exist_ok=True)
    env = {**os.environ, **shell_env(settings)}
    runtime_env = {"working_dir": str(workdir), "env_vars": {"STORAGE": str(storage), "RUN_NAME": run_name,
                                                            "STEPS": str(steps)}}
    return subprocess.Popen([str(Path(sys.executable).with_name("ray")), "job", "submit", "--entrypoint-num-cpus",
                             "0", "--runtime-env-json", json.dumps(runtime_env), "--", "python", "job.py"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen[str], timeout_s: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out[-4000:]
    assert "FileNotFoundError" not in out, "a worker lost its working directory"
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out[-3000:]
    return json.loads(line[len("RESULT "):])


def _workdir(marker: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="dgpt-wd-"))
    (d / "job.py").write_text(ELASTIC_JOB)
    (d / "marker.txt").write_text(marker)
    return d


def test_each_simulated_donor_has_a_ray_temp_folder_of_its_own(fab: Settings) -> None:
    donors = {d["name"]: d for d in json.loads(fabric.fabric_file(fab).read_text())["donors"]}
    folders = set()
    for name in donors:
        raylets = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet"
                   and f"--temp_dir={ray_temp_dir(fab.home, name)}" in (p.info["cmdline"] or [])]
        if name in _active(fab):
            assert len(raylets) == 1, f"{name}'s raylet runs in its own temp folder"
        folders.add(ray_temp_dir(fab.home, name))
    assert len(folders) == 3 and ray_temp_dir(fab.home) not in folders


@pytest.mark.parametrize("run", range(3))
def test_an_elastic_job_with_a_working_dir_grows_to_three_workers_and_completes(fab: Settings, run: int) -> None:
    wait_for(lambda: len(_active(fab)) == 1, 240, "one active donor, two standby")
    result = _result(_submit(fab, _workdir(f"run-{run}"), f"elastic-{run}"))
    assert result == {"marker": f"run-{run}", "max_workers": 3, "steps": 40}
    logs = [fab.home / "logs" / f"donor-{i}.log" for i in (1, 2, 3)]
    assert not any("raylet exited" in p.read_text() for p in logs), "no raylet died starting with the others"


def test_two_jobs_with_different_working_dirs_run_side_by_side(fab: Settings) -> None:
    a, b = _submit(fab, _workdir("job-a"), "side-a", steps=20), _submit(fab, _workdir("job-b"), "side-b", steps=20)
    results = [_result(a), _result(b)]
    assert [r["marker"] for r in results] == ["job-a", "job-b"]
    assert all(r["steps"] == 20 for r in results)


def test_down_removes_the_donors_temp_folders(fab: Settings) -> None:
    # The module's last test: it stops the module's fabric itself (the fixture's down then finds none).
    folders = [ray_temp_dir(fab.home, f"donor-{i}") for i in (1, 2, 3)]
    assert any(f.is_dir() and any(f.glob("session_*")) for f in folders), "the active donors' raylets ran in them"
    assert fabric.down(fab)["donors"] == 3
    assert not [f for f in folders if f.exists()]

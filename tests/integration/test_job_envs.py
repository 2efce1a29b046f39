"""Jobs on sandboxed donors: each brings its own environment, none reads the owner's files.

Two donors (caps and sandbox ``on``). Two jobs are submitted through dgpt's API at once, each
with its own ``runtime_env``: a ``working_dir`` with the job's script and ``pip`` with a
different version of ``humanize`` (small, pure Python, not installed on this machine: it
comes from the package index pip is configured with). Each job's driver runs on a donor
(the head offers no CPU) and puts one task on every donor; the tasks of both jobs meet on
each donor before they answer, so the two versions demonstrably run side by side on the
same machines. The same script probes the sandbox: a file in the owner's home, a root-only
file outside it, a write outside the scratch folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dgpt.head import fabric
from dgpt.head.fabric import DonorSpec, api_client
from dgpt.head.process import shell_env
from tests.integration.conftest import fabric_settings, wait_for
from tests.integration.test_caps import _protectable

DONORS = [DonorSpec(name="env-a", device_class="desktop", owner="owner-a", cpus=2.0, memory_gb=2.0),
          DonorSpec(name="env-b", device_class="desktop", owner="owner-b", cpus=2.0, memory_gb=2.0)]
VERSIONS = {"old": "4.9.0", "new": "4.10.0"}

pytestmark = [pytest.mark.integration, pytest.mark.skipif(_protectable() is not None, reason=str(_protectable()))]

PROBE = r'''
import errno, importlib.metadata, json, os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

tag, home_file, root_only, outside = sys.argv[1:5]

def attempt(f):
    try:
        f()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

ray.init(log_to_driver=False)
import humanize
out = {
    "tag": tag, "uid": os.getuid(), "python": sys.executable, "driver_node": ray.get_runtime_context().get_node_id(),
    "version": importlib.metadata.version("humanize"), "module": humanize.__file__,
    "home_file": attempt(lambda: open(home_file).read()),
    "home_listing": sorted(os.listdir(os.path.dirname(home_file))) if os.path.isdir(os.path.dirname(home_file)) else None,
    "root_only": attempt(lambda: open(root_only).read()),
    "write_outside": attempt(lambda: open(outside, "w").write("x")),
}

@ray.remote(num_cpus=0.25)
def meet(tag, peers):
    # Both jobs' tasks meet on this donor (its sandbox's /tmp) before answering.
    import humanize, importlib.metadata
    here = "/tmp/dgpt-meet"
    os.makedirs(here, exist_ok=True)
    open(os.path.join(here, tag), "w").close()
    deadline = time.monotonic() + 150
    while not all(os.path.exists(os.path.join(here, p)) for p in peers) and time.monotonic() < deadline:
        time.sleep(0.2)
    met = all(os.path.exists(os.path.join(here, p)) for p in peers)
    return {"node": ray.get_runtime_context().get_node_id(), "version": importlib.metadata.version("humanize"),
            "natural": humanize.naturalsize(1_000_000), "met": met, "pid": os.getpid()}

donors = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Labels"].get("dgpt.io/role") == "donor")
peers = sys.argv[5].split(",")
refs = [meet.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(tag, peers)
        for n in donors]
out["donors"] = donors
out["tasks"] = ray.get(refs, timeout=240)
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture(scope="module")
def jobs(ray_test_env: None) -> Iterator[dict[str, Any]]:
    home = Path(tempfile.mkdtemp(prefix="dgpt-env-"))
    settings = fabric_settings(home, enforce_caps="on", sandbox="on")
    job_dir = home / "job"
    job_dir.mkdir()
    (job_dir / "probe.py").write_text(PROBE)
    # Files of the owner (this machine's user) the work must not read or write.
    owner_home = Path.home()
    home_file = owner_home / f".dgpt-probe-{secrets.token_hex(4)}"
    home_file.write_text("the owner's")
    visible = Path(tempfile.mkdtemp(prefix="dgpt-probe-", dir="/var/lib"))
    os.chmod(visible, 0o755)
    root_only = visible / "root-only"
    root_only.write_text("root's")
    os.chmod(root_only, 0o600)
    try:
        fabric.up(settings, len(DONORS), timeout_s=240, specs=DONORS)
        with api_client(settings) as client:
            submitted = {}
            for tag, version in VERSIONS.items():
                args = " ".join([tag, str(home_file), str(root_only), str(visible / f"written-by-{tag}"),
                                 ",".join(VERSIONS)])
                # `ray job submit` uploads the local working_dir (dgpt's API takes URIs only: a
                # local path there would be read from the head's disk).
                job_id = f"env-{tag}-{secrets.token_hex(4)}"
                out = subprocess.run(
                    [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait", "--submission-id", job_id,
                     "--working-dir", str(job_dir), "--entrypoint-num-cpus", "0.25",
                     "--runtime-env-json", json.dumps({"pip": [f"humanize=={version}"]}), "--", "python", "probe.py",
                     *args.split()],
                    env={**os.environ, **shell_env(settings)}, capture_output=True, text=True, timeout=240)
                assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
                submitted[tag] = job_id
            done = wait_for(lambda: all(client.job(j).status in ("SUCCEEDED", "FAILED", "STOPPED")
                                        for j in submitted.values()), 360, "both jobs to finish", interval_s=2)
            assert done
            results: dict[str, Any] = {}
            for tag, job_id in submitted.items():
                logs = client.job_logs(job_id)
                status = client.job(job_id)
                assert status.status == "SUCCEEDED", f"{tag}: {status.status} {status.message}\n{logs[-3000:]}"
                line = next((x for x in logs.splitlines() if x.startswith("RESULT ")), None)
                assert line is not None, logs[-3000:]
                results[tag] = json.loads(line[len("RESULT "):])
            donors = {d.node_id: d for d in client.donors()}
        yield {"results": results, "donors": donors, "home_file": home_file, "visible": visible}
    finally:
        fabric.down(settings)
        home_file.unlink(missing_ok=True)
        shutil.rmtree(visible, ignore_errors=True)


def test_the_package_is_not_on_this_machine_but_comes_with_each_job() -> None:
    # Nothing but the jobs' own environments provides it.
    gone = subprocess.run([sys.executable, "-c", "import humanize"], capture_output=True, text=True)
    assert gone.returncode != 0 and "No module named 'humanize'" in gone.stderr


def test_two_jobs_with_different_versions_run_side_by_side_on_the_same_donors(jobs: dict[str, Any]) -> None:
    results, donors = jobs["results"], jobs["donors"]
    for tag, version in VERSIONS.items():
        r = results[tag]
        assert r["version"] == version, r  # the driver's own environment
        assert "runtime_resources" in r["module"] and "runtime_resources" in r["python"], r
        assert r["driver_node"] in donors  # the entrypoint ran on a donor, not on the head
        assert {t["version"] for t in r["tasks"]} == {version}  # and so did every task, in the job's env
        assert all(t["met"] for t in r["tasks"]), r["tasks"]  # while the other job's task ran beside it
    old_nodes = sorted(t["node"] for t in results["old"]["tasks"])
    new_nodes = sorted(t["node"] for t in results["new"]["tasks"])
    assert old_nodes == new_nodes == sorted(results["old"]["donors"]) and len(old_nodes) == len(DONORS)
    assert set(old_nodes) <= set(donors)
    # Different processes of different environments on each donor, at the same time.
    for old, new in zip(sorted(results["old"]["tasks"], key=lambda t: t["node"]),
                        sorted(results["new"]["tasks"], key=lambda t: t["node"]), strict=True):
        assert old["node"] == new["node"] and old["pid"] != new["pid"]


def test_a_job_cannot_read_the_owners_files(jobs: dict[str, Any]) -> None:
    home_file: Path = jobs["home_file"]
    assert home_file.read_text() == "the owner's"  # it is there, outside the sandbox
    for tag, r in jobs["results"].items():
        assert r["home_file"] == "ENOENT", r  # the owner's home is hidden, not merely refused
        assert home_file.name not in (r["home_listing"] or []), r
        assert r["root_only"] == "EACCES", r  # visible outside the homes, but the work is not root
        assert r["write_outside"] == "EROFS", r  # the filesystem is read-only but for scratch
        assert r["uid"] == 65534, r
        assert not (jobs["visible"] / f"written-by-{tag}").exists()


"""Fleet simulator: a tiny run writes the JSON with every key and sane values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import fleet_sim

KEYS = (
    "decision_p50_ms",
    "decision_p99_ms",
    "decisions_per_s",
    "work_lost_fraction",
    "mean_job_completion_s",
    "utilization",
)


def test_tiny_run_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "fleet_sim.json"
    assert (
        fleet_sim.main(["--donors", "400", "--hours", "2", "--seed", "3", "--out", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    assert data["timestamp"] and data["params"]["donors"] == 400
    assert set(data["policies"]) == set(fleet_sim.POLICIES)
    for name, metrics in data["policies"].items():
        for key in KEYS:
            assert key in metrics, (name, key)
            assert math.isfinite(metrics[key]), (name, key)
        assert metrics["decisions"] > 0
        assert 0 < metrics["decision_p50_ms"] <= metrics["decision_p99_ms"]
        assert 0 <= metrics["work_lost_fraction"] < 1
        assert 0 < metrics["utilization"] <= 1
        assert metrics["mean_job_completion_s"] > 0
    for base in ("random", "pack-spread"):
        assert set(data["dgpt_vs"][base]) >= {
            "work_lost_fraction",
            "mean_job_completion_s",
            "utilization",
        }


def test_fleet_churn_matches_profile_availability() -> None:
    import numpy as np

    profiles = json.loads(fleet_sim.find_churn_profiles().read_text())
    fleet = fleet_sim.build_fleet(4000, profiles, np.random.default_rng(0))
    expected = sum(
        w * profiles["profiles"][k]["availability"] for k, w in profiles["default_mix"].items()
    )
    # Donors joined at random times over the history window and start up, which biases
    # availability at t=0 upward a little; it must still be in the right neighbourhood.
    assert fleet.up_at_0.mean() == pytest.approx(expected, abs=0.12)
    assert (fleet.end[fleet.up_at_0] > 0).all() and (fleet.start[~fleet.up_at_0] > 0).all()
    assert fleet.gflops.mean() == pytest.approx(16.5, rel=0.1)


def test_profiles_are_found_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "p.json"
    target.write_text("{}")
    monkeypatch.setenv("DGPT_CHURN_PROFILES", str(target))
    assert fleet_sim.find_churn_profiles() == target
    monkeypatch.setenv("DGPT_CHURN_PROFILES", str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit, match="DGPT_CHURN_PROFILES"):
        fleet_sim.find_churn_profiles()


def test_shipped_profiles_match_shared_copy() -> None:
    shipped = Path(fleet_sim.__file__).parent / "data" / "churn-profiles.json"
    assert shipped.is_file()
    for folder in Path(__file__).resolve().parents:
        shared = folder / "shared" / "data" / "churn-profiles.json"
        if shared.is_file():
            assert json.loads(shared.read_text()) == json.loads(shipped.read_text())
            return

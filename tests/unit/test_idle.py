"""The donor's idle detectors with fakes: the owner's load, the allowed-hours window, the pause switch."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from dgpt.donor.idle import HoursDetector, LoadDetector, SwitchDetector, first_reason


def test_load_above_the_threshold_for_three_polls_means_the_owner_is_back() -> None:
    loads = iter([0.9, 0.9, 0.2, 0.9, 0.9, 0.9])
    d = LoadDetector(0.6, read_load=lambda: next(loads))
    seen = [d.owner_active() for _ in range(6)]
    # One or two busy polls are noise (a compile, an update check); three in a row are a person.
    assert seen[:5] == [None] * 5
    assert seen[5] is not None and "0.90/core above 0.6" in seen[5]


def test_the_owner_stays_back_until_the_load_has_been_calm_for_calm_s() -> None:
    load, clock = [0.9], [0.0]
    d = LoadDetector(0.6, read_load=lambda: load[0], patience=1, calm_s=60.0, now=lambda: clock[0])
    assert d.owner_active() is not None
    load[0] = 0.1  # a pause between bursts: still the owner's machine
    for t in (1.0, 30.0, 60.5):
        clock[0] = t
        assert d.owner_active() is not None, f"still back {t - 1.0:.0f} s into the calm"
    load[0] = 0.9  # busy again: the calm starts over
    clock[0] = 70.0
    assert d.owner_active() is not None
    load[0] = 0.1
    for t in (71.0, 100.0):
        clock[0] = t
        assert d.owner_active() is not None
    clock[0] = 131.0
    assert d.owner_active() is None, "idle after 60 s of calm"
    assert d.owner_active() is None


def test_load_at_the_threshold_is_still_idle() -> None:
    d = LoadDetector(0.6, read_load=lambda: 0.6, patience=1)
    assert d.owner_active() is None
    assert LoadDetector(0.6, read_load=lambda: 0.61, patience=1).owner_active() is not None


@pytest.mark.parametrize(("window", "hour", "inside"), [
    ("22-7", 23, True), ("22-7", 3, True), ("22-7", 7, False), ("22-7", 12, False), ("22-7", 22, True),
    ("9-17", 9, True), ("9-17", 16, True), ("9-17", 17, False), ("9-17", 2, False),
])
def test_allowed_hours_wrap_midnight_and_end_exclusive(window: str, hour: int, inside: bool) -> None:
    d = HoursDetector(window, now=lambda: dt.datetime(2026, 12, 1, hour, 30))
    reason = d.owner_active()
    assert (reason is None) == inside
    if not inside:
        assert window in reason  # type: ignore[operator]


@pytest.mark.parametrize("bad", ["7", "25-3", "3-3", "a-b", "1-2-3"])
def test_a_bad_window_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("'", ".")):
        HoursDetector(bad)


def test_the_pause_switch_is_a_file(tmp_path: Path) -> None:
    switch = SwitchDetector(tmp_path / "paused")
    assert switch.owner_active() is None
    (tmp_path / "paused").write_text("1")
    assert switch.owner_active() == "paused by the owner"
    (tmp_path / "paused").unlink()
    assert switch.owner_active() is None


def test_the_first_detector_with_a_reason_wins(tmp_path: Path) -> None:
    (tmp_path / "paused").write_text("1")
    detectors = [LoadDetector(0.6, read_load=lambda: 0.0), SwitchDetector(tmp_path / "paused")]
    assert first_reason(detectors) == "paused by the owner"
    assert first_reason([LoadDetector(0.6, read_load=lambda: 0.0)]) is None


def test_the_agent_gives_its_load_detector_the_configured_calm(tmp_path) -> None:
    from dgpt.donor.agent import AgentConfig, DonorAgent
    from dgpt.ray_node import NodePorts
    from dgpt.sdk.models import DeviceProfile, DonorCaps

    cfg = AgentConfig(head_url="http://127.0.0.1:9", join_token="t", name="d", device_class="desktop", owner="o",
                      state_dir=tmp_path, caps=DonorCaps(cpus=1, memory_bytes=2**30),
                      profile=DeviceProfile(cpus=2, memory_bytes=2**32, cpu_gflops=1.0),
                      ports=NodePorts(6380, "10002-10999"), load_threshold=0.5, load_calm_s=7.0)
    (detector,) = [d for d in DonorAgent(cfg).detectors if isinstance(d, LoadDetector)]
    assert (detector.threshold, detector.calm_s) == (0.5, 7.0)

"""Device profiling: GPUs through NVML without torch, a real CPU benchmark."""

from __future__ import annotations

import sys
import types

import pytest

from dgpt.donor import profile


def _fake_nvml(names: list[str], cores: int = 16896, mhz: int = 1980) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
    calls: list[str] = []
    nvml.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(names)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: names[h].encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetNumGpuCores = lambda h: cores  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, kind: mhz  # type: ignore[attr-defined]
    nvml.calls = calls  # type: ignore[attr-defined]
    return nvml


def test_gpus_come_from_nvml_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _fake_nvml(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch at all: import fails
    monkeypatch.setattr(profile, "_nvidia_present", lambda: True)
    gpus, gflops = profile.gpus_and_gflops(0.01)
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2 and gpus[0].memory_bytes == 80 * 2**30
    assert gflops == pytest.approx(2 * 16896 * 1.98, rel=1e-3)  # the datasheet estimate
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_no_driver_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile, "_nvidia_present", lambda: False)
    assert profile.gpus_and_gflops(0.01) == ([], 0.0)


def test_nvml_that_cannot_start_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = _fake_nvml(["x"])

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    nvml.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert profile.nvml_gpus() == []


def test_cpu_benchmark_measures_something() -> None:
    assert profile.cpu_gflops(seconds=0.05) > 0.1

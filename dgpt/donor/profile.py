"""Measuring a donor device: cores, memory, GPUs, a short matmul benchmark, free disk."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import psutil

from dgpt.sdk.models import DeviceProfile, GpuInfo

# Large enough to leave the cache-bound regime, small enough that one run takes milliseconds.
_MATMUL_N = 256
# A short benchmark: donors should join fast, and idle capacity is what we measure anyway.
_BENCH_SECONDS = 0.3


def cpu_gflops(seconds: float = _BENCH_SECONDS, n: int = _MATMUL_N) -> float:
    """Sustained float32 matmul GFLOPS on the CPU (numpy/BLAS), measured for ``seconds``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread start and page faults are not the device's speed
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    return round(2 * n**3 * runs / elapsed / 1e9, 2)


def _nvidia_present() -> bool:
    # Importing torch costs seconds; only do it where an NVIDIA driver is visible.
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def gpus_and_gflops(seconds: float = _BENCH_SECONDS) -> tuple[list[GpuInfo], float]:
    """CUDA GPUs (via torch) and the first one's matmul GFLOPS; ([], 0) without CUDA."""
    if not _nvidia_present():
        return [], 0.0
    try:
        import torch
    except ImportError:
        return [], 0.0
    if not torch.cuda.is_available():
        return [], 0.0
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(name=props.name, memory_bytes=int(props.total_memory)))
    n = 2048
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    a @ b
    torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        runs += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return gpus, round(2 * n**3 * runs / elapsed / 1e9, 1)


def measure(state_dir: Path, bench_seconds: float = _BENCH_SECONDS) -> DeviceProfile:
    """Profile this device."""
    gpus, gpu_gflops = gpus_and_gflops(bench_seconds)
    state_dir.mkdir(parents=True, exist_ok=True)
    return DeviceProfile(
        cpus=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        memory_bytes=int(psutil.virtual_memory().total),
        gpus=gpus,
        cpu_gflops=cpu_gflops(bench_seconds),
        gpu_gflops=gpu_gflops,
        disk_free_bytes=int(shutil.disk_usage(state_dir).free),
        platform=f"{platform.system()} {platform.machine()} python {platform.python_version()}",
        hostname=socket.gethostname(),
    )

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
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def nvml_gpus() -> list[tuple[GpuInfo, float]]:
    """CUDA GPUs through NVML (the driver's own library, no CUDA toolkit or torch needed).

    Returns:
        ``(gpu, estimated FP32 GFLOPS)`` per GPU: cores x 2 FLOPs x max SM clock, the
        datasheet figure (0 when the driver does not say); [] without NVML or a GPU.
    """
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, or no GPU: NVML says so by failing to start
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            try:
                cores = pynvml.nvmlDeviceGetNumGpuCores(handle)
                mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
                gflops = 2.0 * cores * mhz / 1000.0
            except Exception:  # older drivers lack the core count
                gflops = 0.0
            out.append((GpuInfo(name=name or "NVIDIA GPU", memory_bytes=memory), gflops))
    finally:
        pynvml.nvmlShutdown()
    return out


def _torch_gflops(seconds: float) -> float:
    """Measured fp16 matmul GFLOPS of GPU 0 through torch, or 0 without a CUDA torch."""
    try:
        import torch
    except ImportError:
        return 0.0
    if not torch.cuda.is_available():
        return 0.0
    n = 2048
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    a @ b
    torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return round(2 * n**3 * runs / elapsed / 1e9, 1)


def _torch_gpus() -> list[GpuInfo]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [GpuInfo(name=torch.cuda.get_device_properties(i).name,
                    memory_bytes=int(torch.cuda.get_device_properties(i).total_memory))
            for i in range(torch.cuda.device_count())]


def gpus_and_gflops(seconds: float = _BENCH_SECONDS) -> tuple[list[GpuInfo], float]:
    """CUDA GPUs and the first one's GFLOPS; ([], 0) without an NVIDIA driver.

    GPUs are found through NVML, so a donor needs no CUDA build of torch to offer its GPU;
    torch is only the fallback (and, when it has CUDA, measures the speed for real).
    """
    if not _nvidia_present():
        return [], 0.0
    found = nvml_gpus()
    gpus = [g for g, _ in found] or _torch_gpus()
    if not gpus:
        return [], 0.0
    measured = _torch_gflops(seconds)
    return gpus, measured or (round(found[0][1], 1) if found else 0.0)


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

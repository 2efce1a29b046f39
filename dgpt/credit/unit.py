"""BOINC's credit unit and the weights that turn a donor's resource-seconds into credit.

    credit = cpu_s * w_cpu + gpu_s * w_gpu + memory_byte_s * w_memory
    w_cpu = (cpu_gflops / cpus) * 200 / 86400      (the benchmark runs on all of the device's cores)
    w_gpu = gpu_gflops * 200 / 86400               (the benchmark measures one GPU)
    w_memory = 0

BOINC's cobblestone: a device that sustains 1 GFLOPS earns 200 credits per day of work. A
donor whose profile measured ``cpu_gflops`` over its ``cpus`` cores earns, for one CPU-second of
work, that core's share of a GFLOPS-day. Memory is metered and shown but earns nothing: BOINC
credits floating-point work, and memory a task reserves is not work done (a weight of 0 keeps
the formula, and the ledger records every weight it used, so a later weighting stays auditable).
"""

from __future__ import annotations

from dataclasses import dataclass

from dgpt.sdk.models import DeviceProfile

#: BOINC's unit: credits for one day of a device sustaining 1 GFLOPS.
CREDITS_PER_GFLOPS_DAY = 200.0
SECONDS_PER_DAY = 86_400.0
#: Credits per GFLOPS-second.
CREDITS_PER_GFLOPS_S = CREDITS_PER_GFLOPS_DAY / SECONDS_PER_DAY


@dataclass(frozen=True)
class ResourceSeconds:
    """What a raylet ran for a while: CPU-seconds, GPU-seconds, byte-seconds of memory."""

    cpu_s: float = 0.0
    gpu_s: float = 0.0
    memory_byte_s: float = 0.0

    def __add__(self, other: ResourceSeconds) -> ResourceSeconds:
        return ResourceSeconds(self.cpu_s + other.cpu_s, self.gpu_s + other.gpu_s,
                               self.memory_byte_s + other.memory_byte_s)

    @property
    def empty(self) -> bool:
        return self.cpu_s <= 0 and self.gpu_s <= 0 and self.memory_byte_s <= 0


@dataclass(frozen=True)
class Weights:
    """Credits per resource-second of one donor (see the module docstring)."""

    cpu: float
    gpu: float
    memory: float = 0.0


def weights_for(profile: DeviceProfile) -> Weights:
    """A donor's weights from its benchmarked profile (0 GFLOPS measured earns nothing)."""
    per_core = profile.cpu_gflops / profile.cpus if profile.cpus else 0.0
    return Weights(cpu=per_core * CREDITS_PER_GFLOPS_S, gpu=profile.gpu_gflops * CREDITS_PER_GFLOPS_S, memory=0.0)


def credit_of(used: ResourceSeconds, w: Weights) -> float:
    """The credit of ``used`` at weights ``w``: the one formula, used by the ledger and its checks."""
    return used.cpu_s * w.cpu + used.gpu_s * w.gpu + used.memory_byte_s * w.memory

"""Donor caps: what an owner offers, checked against what the device has."""

from __future__ import annotations

from dgpt.exceptions import ConfigError
from dgpt.sdk.models import DeviceProfile, DonorCaps

GIB = 2**30


def build_caps(
    profile: DeviceProfile,
    cpus: float | None = None,
    memory_gb: float | None = None,
    gpus: int | None = None,
    disk_gb: float | None = None,
) -> DonorCaps:
    """Caps from the owner's flags; unset ones take a share of the device.

    Defaults: all cores, half the memory (the owner keeps the rest), all GPUs, no disk.

    Raises:
        ConfigError: a cap exceeds the device or is not positive; names the flag.
    """
    if cpus is not None and not 0 < cpus <= profile.cpus:
        raise ConfigError(f"--cpus {cpus:g} must be > 0 and at most the device's {profile.cpus} cores")
    total_gb = profile.memory_bytes / GIB
    if memory_gb is not None and not 0.0625 <= memory_gb <= total_gb:
        raise ConfigError(f"--memory-gb {memory_gb:g} must be between 0.0625 and the device's {total_gb:.1f} GiB")
    if gpus is not None and not 0 <= gpus <= len(profile.gpus):
        raise ConfigError(
            f"--gpus {gpus} must be between 0 and the {len(profile.gpus)} CUDA GPU(s) this device has",
            hint="a GPU donor needs a CUDA driver and torch with CUDA" if gpus and not profile.gpus else None,
        )
    disk_free_gb = profile.disk_free_bytes / GIB
    if disk_gb is not None and not 0 <= disk_gb <= disk_free_gb:
        raise ConfigError(f"--disk-gb {disk_gb:g} must be between 0 and the {disk_free_gb:.1f} GiB free")
    return DonorCaps(
        cpus=float(cpus if cpus is not None else profile.cpus),
        memory_bytes=int((memory_gb if memory_gb is not None else total_gb / 2) * GIB),
        gpus=gpus if gpus is not None else len(profile.gpus),
        disk_bytes=int((disk_gb or 0) * GIB),
    )


def parse_labels(text: str | None) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` into a dict.

    Raises:
        ConfigError: a pair is malformed or a key/value is not a valid Ray label.
    """
    from dgpt.sdk.models import check_label_key, check_label_value

    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--labels entry {part!r} must look like key=value")
        try:
            out[check_label_key(key.strip())] = check_label_value(value.strip())
        except ValueError as exc:
            raise ConfigError(f"--labels: {exc}") from None
    return out

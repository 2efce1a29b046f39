"""GPU donors: the CUDA profile, GPU caps and the dgpt.io/gpu label. Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_profile_measures_cuda_gpus(tmp_path) -> None:
    from dgpt.donor.caps import build_caps
    from dgpt.donor.profile import measure
    from dgpt.head.store import donor_labels, donor_resources

    profile = measure(tmp_path, bench_seconds=0.2)
    assert len(profile.gpus) == torch.cuda.device_count()
    assert profile.gpus[0].memory_bytes > 2**30 and profile.gpu_gflops > profile.cpu_gflops
    caps = build_caps(profile, gpus=1)
    assert donor_resources(caps)["GPU"] == 1.0
    assert donor_labels("d-1", "gpu-rig", "o", profile, caps)["dgpt.io/gpu"] != "none"

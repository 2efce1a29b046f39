"""Unit tests never start Ray: ray.init raises here."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; put this test in tests/integration/")

    monkeypatch.setattr(ray, "init", refuse)

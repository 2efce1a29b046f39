"""The Ray Data pipeline's pieces that need no Ray: generation, the driver baseline, the comparison, ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dgpt.exceptions import ApiError
from dgpt.head.storage_api import parse_range
from dgpt.storage.pipeline import KEYS, generate, run_in_driver, same_results


def _write_to(folder: Path):  # noqa: ANN202
    folder.mkdir(parents=True, exist_ok=True)
    return lambda name, data: (folder / name).write_bytes(data)


def test_generation_is_seeded_and_sized(tmp_path: Path) -> None:
    rows, nbytes = generate(2.0, 3, 7, _write_to(tmp_path / "a"))
    rows_b, nbytes_b = generate(2.0, 3, 7, _write_to(tmp_path / "b"))
    assert (rows, nbytes) == (rows_b, nbytes_b) and rows == int(2e6 / 28)
    assert 1.8e6 < nbytes < 2.6e6
    for name in ("part-0000.parquet", "part-0002.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert pq.read_table(tmp_path / "a")["id"].to_pylist() == list(range(rows))


def test_driver_baseline_matches_numpy_and_the_comparison_catches_a_change(tmp_path: Path) -> None:
    generate(1.0, 2, 3, _write_to(tmp_path / "in"))
    got = run_in_driver(tmp_path / "in")
    t = pq.read_table(tmp_path / "in").to_pandas()
    z = t["x"] * t["y"] + np.sqrt(np.abs(t["x"]))
    assert list(got.index) == list(range(KEYS))
    for key in (0, 17, KEYS - 1):
        sel = t["key"] == key
        assert got.loc[key, "count"] == sel.sum()
        assert np.isclose(got.loc[key, "z"], z[sel].sum()) and np.isclose(got.loc[key, "mean_x"], t["x"][sel].mean())
    assert same_results(got, got.copy())
    changed = got.copy()
    changed.loc[5, "count"] += 1
    assert not same_results(got, changed)
    off = got.copy()
    off.loc[9, "z"] *= 1 + 1e-6
    assert not same_results(got, off)


@pytest.mark.parametrize(("header", "span"), [
    (None, None), ("bytes=0-99", (0, 100)), ("bytes=10-", (10, 1000)), ("bytes=-100", (900, 1000)),
    ("bytes=990-5000", (990, 1000)),
])
def test_ranges(header: str | None, span: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "items=0-1", "bytes=5-2", "bytes=a-b", "bytes=0-1,4-5"])
def test_bad_ranges_are_416(header: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_range(header, 1000)
    assert info.value.status_code == 416

"""``dgpt://`` against real piece servers: fsspec's own conformance suite, pickling, pyarrow.

fsspec ships abstract tests (copy, get, put, open, pipe) that every filesystem should pass;
they run here against DonorFileSystem backed by four piece-server processes.
"""

from __future__ import annotations

import os
import pickle

import fsspec
import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from dgpt.storage.fs import DonorFileSystem, pyarrow_filesystem
from tests.integration.storage_cluster import start_cluster

# Small test fabrics get small profiles, which warn on every write; the warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:profile rs-:UserWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("fsspec"), donors=4)  # rs-2-of-4
    yield c
    c.stop()


@pytest.fixture(scope="module")
def donor_fs(cluster):
    return DonorFileSystem(cluster.url)


class DonorFixtures(AbstractFixtures):
    @pytest.fixture
    def fs(self, donor_fs):
        return donor_fs

    @pytest.fixture
    def fs_join(self):
        return lambda *parts: "/".join(parts)

    @pytest.fixture
    def fs_path(self):
        return "abstract"


class TestDonorCopy(AbstractCopyTests, DonorFixtures):
    pass


class TestDonorGet(AbstractGetTests, DonorFixtures):
    pass


class TestDonorPut(AbstractPutTests, DonorFixtures):
    pass


class TestDonorOpen(AbstractOpenTests, DonorFixtures):
    pass


class TestDonorPipe(AbstractPipeTests, DonorFixtures):
    pass


def test_the_instance_is_deterministic_and_pickles(cluster, donor_fs):
    # Same arguments, same instance and token; the arguments are all a pickle carries.
    again = DonorFileSystem(cluster.url)
    assert again is donor_fs and again._fs_token == donor_fs._fs_token
    assert DonorFileSystem(cluster.url + "x")._fs_token != donor_fs._fs_token
    assert donor_fs.storage_args == (cluster.url,) and donor_fs.storage_options == {}
    clone = pickle.loads(pickle.dumps(donor_fs))
    assert clone._fs_token == donor_fs._fs_token and clone.storage_args == donor_fs.storage_args
    by_name = fsspec.filesystem("dgpt", metadata=cluster.url)
    assert by_name is fsspec.filesystem("dgpt", metadata=cluster.url)
    # An instance built elsewhere (no cache) from the same arguments reads the same files.
    fresh = DonorFileSystem(cluster.url, skip_instance_cache=True)
    donor_fs.pipe_file("pickle/x", b"abc")
    assert fresh.cat_file("pickle/x") == b"abc" == clone.cat_file("dgpt://pickle/x") == by_name.cat_file("pickle/x")


def test_open_by_url_and_range_reads(cluster, donor_fs):
    data = os.urandom(900_000)  # 4 segments of 256 KiB
    with fsspec.open("dgpt://ranges/big.bin", "wb", metadata=cluster.url) as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
    assert donor_fs.info("dgpt://ranges/big.bin")["size"] == len(data)
    with donor_fs.open("ranges/big.bin", "rb", block_size=50_000) as f:
        f.seek(262_140)
        assert f.read(10) == data[262_140:262_150]  # across a segment boundary
        f.seek(-7, 2)
        assert f.read() == data[-7:]
    assert donor_fs.cat_file("ranges/big.bin", 123_456, 234_567) == data[123_456:234_567]
    assert donor_fs.cat_file("ranges/big.bin", -5) == data[-5:]
    assert donor_fs.ukey("ranges/big.bin") == donor_fs.info("ranges/big.bin")["file_id"]


def test_a_writer_that_fails_leaves_nothing(donor_fs):
    with pytest.raises(RuntimeError):
        with donor_fs.open("fail/partial.bin", "wb") as f:
            f.write(os.urandom(600_000))
            raise RuntimeError("boom")
    assert not donor_fs.exists("fail/partial.bin")
    f = donor_fs.open("fail/dropped.bin", "wb")
    f.write(os.urandom(300_000))
    del f  # dropped without close(): abandoned, not committed
    assert not donor_fs.exists("fail/dropped.bin")


def test_append_mv_and_errors(donor_fs):
    donor_fs.pipe_file("misc/a.txt", b"hello ")
    with donor_fs.open("misc/a.txt", "ab") as f:
        f.write(b"world")
    assert donor_fs.cat_file("misc/a.txt") == b"hello world"
    donor_fs.mv("misc/a.txt", "misc/b.txt")
    assert not donor_fs.exists("misc/a.txt") and donor_fs.cat_file("misc/b.txt") == b"hello world"
    with pytest.raises(FileNotFoundError):
        donor_fs.cat_file("misc/none")
    with pytest.raises(FileNotFoundError):
        donor_fs.ls("misc/none")
    with pytest.raises(IsADirectoryError):
        donor_fs.open("misc", "wb")
    with pytest.raises(FileExistsError):
        donor_fs.mkdir("misc/b.txt")
    with pytest.raises(OSError):
        donor_fs.rmdir("misc")  # not empty
    donor_fs.rm("misc", recursive=True)
    assert not donor_fs.exists("misc")


def test_pyarrow_wrapper_writes_and_reads_parquet(donor_fs):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pafs = pyarrow_filesystem(donor_fs)
    table = pa.table({"x": list(range(50_000)), "y": [f"row-{i}" for i in range(50_000)]})
    pafs.create_dir("tables")
    pq.write_table(table, "tables/t.parquet", filesystem=pafs)
    assert pq.read_table("tables/t.parquet", filesystem=pafs).equals(table)
    info = pafs.get_file_info("tables/t.parquet")
    assert info.size == donor_fs.size("tables/t.parquet") > 0
    # Column projection reads only byte ranges of the file.
    assert pq.read_table("tables/t.parquet", filesystem=pafs, columns=["x"]).column("x").to_pylist()[:3] == [0, 1, 2]

"""Long reads through memory maps: the pages read leave the resident set, the data stays right."""

import sys

import numpy as np
import pytest

from datamodels_ml import mapped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident pages read from /proc")


def _rss_file_kb():
    got = mapped.resident_file_bytes()
    if got is None:
        pytest.skip("no RssFile in /proc/self/status")
    return got // 1024


def _file(tmp_path, mb=16):
    a = np.arange(mb * 2**18, dtype=np.float32)  # mb MB
    a.tofile(tmp_path / "a.bin")
    return a


def test_reading_a_whole_map_then_releasing_it_leaves_no_resident_pages(tmp_path):
    a = _file(tmp_path)
    m = np.memmap(tmp_path / "a.bin", dtype=np.float32, mode="r")
    before = _rss_file_kb()
    assert float(np.asarray(m).sum(dtype=np.float64)) == float(a.sum(dtype=np.float64))
    assert _rss_file_kb() - before > 12 << 10  # the 16 MB read are resident
    assert mapped.release(m)
    assert _rss_file_kb() - before < 2 << 10
    assert np.array_equal(m[:1000], a[:1000])  # faulted back in from the page cache


def test_page_release_counts_what_each_read_took(tmp_path):
    a = _file(tmp_path)
    m = np.memmap(tmp_path / "a.bin", dtype=np.float32, mode="r")
    pages = mapped.PageRelease(m, every=4 << 20)
    before = _rss_file_kb()
    step = 2**18  # 1 MB of float32
    for s in range(0, a.size, step):
        assert np.array_equal(m[s:s + step], a[s:s + step])
        pages.read(step * 4)
    assert _rss_file_kb() - before < 6 << 10  # at most the last 4 MB between releases


def test_private_maps_and_plain_arrays_are_never_released(tmp_path):
    _file(tmp_path, mb=1)
    private = np.memmap(tmp_path / "a.bin", dtype=np.float32, mode="c")
    private[0] = -1.0  # a change that lives only in this process's copy
    assert not mapped.release(private)
    assert private[0] == -1.0
    assert not mapped.release(np.zeros(3))
    assert mapped.PageRelease(np.zeros(3), private).arrays == []

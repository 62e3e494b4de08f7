"""Freed blocks kept in the heap (glibc): a freed large block stays resident for reuse, goes back
to the system on release with the C library's settings; opting out leaves them alone."""

import ctypes
import ctypes.util
import sys

import pytest

from datamodels_ml import heap
from datamodels_ml.procfs import kb_field

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def _resident_after_free(mb=256):
    """Resident bytes still held after a ``mb`` MB block was written and freed (C ``malloc``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = kb_field("/proc/self/status", "VmRSS")
    block = libc.malloc(mb * 2**20)
    ctypes.memset(block, 1, mb * 2**20)
    libc.free(block)
    return kb_field("/proc/self/status", "VmRSS") - before


def test_a_freed_block_stays_for_reuse_while_kept_and_goes_back_on_release(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    assert _resident_after_free() < 64 * 2**20  # the C library's own settings: unmapped on free
    if not heap.keep_freed_blocks():
        pytest.skip("not glibc")
    try:
        assert _resident_after_free() > 200 * 2**20  # kept in the heap, its pages in place
    finally:
        before = kb_field("/proc/self/status", "VmRSS")
        heap.release()
    assert before - kb_field("/proc/self/status", "VmRSS") > 200 * 2**20  # handed back
    assert _resident_after_free() < 64 * 2**20  # and the settings are the library's again


def test_opting_out_leaves_the_c_library_alone(monkeypatch):
    monkeypatch.setenv(heap.ENV, "system")
    assert heap.available() is False and heap.keep_freed_blocks() is False
    heap.release()  # nothing to undo
    assert _resident_after_free() < 64 * 2**20

"""Large freed blocks kept in this process's heap, so that the solver's temporaries reuse memory
that is already mapped instead of faulting fresh pages in at every write.

glibc's ``malloc`` serves every request above 32 MB (its largest ``mmap`` threshold) with a new
``mmap`` and unmaps it again on ``free``. A screened path at p = 50k makes tens of ``[p, T]``
temporaries per point (the working-set masks, the warm start, the gradient's bookkeeping), about
300 MB each: every one is faulted in page by page at its first write, the kernel zeroing each
4 KB page. On the AMD EPYC measured, ``abs`` of a 50,000 x 1469 float32 matrix took 94 ms into a
new tensor and 18 ms into an existing one. :func:`keep_freed_blocks` turns ``mmap`` off for this
process's later requests (``M_MMAP_MAX`` = 0: every block comes from the heap) and lets the heap
keep up to ``RETAIN`` free bytes at its top (``M_TRIM_THRESHOLD``), so a freed block serves the
next request that fits it; :func:`release` goes back to the C library's settings and hands the
free pages back to the system (``malloc_trim``). The regression keeps freed blocks for one target
block at a time, from its path's start to the end of its refit, on the CPU; not while the
block's targets are read, whose large read batches and ``X'Y`` products, kept, spread over the
heap (see ``regression.block_fit``). At p = 50k, 10k + 2k models, 2000 targets, the regression
took 249-277 s instead of 331-397 s. What the heap keeps counts in the resident set,
and torch's 64-byte aligned requests do not always fit a freed block of the same size (glibc then
extends the heap): 2.5 MB more per target at the peak there (5.66 MB instead of 3.1 MB), so the
memory plan counts ``regression.memory.HEAP_COLUMNS`` more per target while keeping applies.
(Kept within each path point only, released after every λ: 304 s there, 0.15 GB more at the peak.)

glibc only (Linux): elsewhere, or where ``DATAMODELS_MALLOC=system`` is set, both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["available", "keep_freed_blocks", "release", "trim", "RETAIN", "ENV"]

ENV = "DATAMODELS_MALLOC"  # "system": leave the C library's allocation settings alone
RETAIN = 512 * 2**20  # free bytes the heap may keep at its top (above the largest temporary at p = 50k)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)
_MMAP_MAX_DEFAULT, _TRIM_DEFAULT = 65536, 128 * 1024  # glibc's defaults
_STATE: dict[str, object] = {"libc": None, "kept": False}


def _glibc():
    """glibc's handle, or None (another C library, another system, or opted out)."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return None
    if _STATE["libc"] is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _STATE["libc"] = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _STATE["libc"] = False
    return _STATE["libc"] or None


def available() -> bool:
    """Whether :func:`keep_freed_blocks` can apply here (glibc, not opted out)."""
    return _glibc() is not None


def keep_freed_blocks() -> bool:
    """From now on serve large blocks from the heap and keep freed ones for reuse (see the
    module's docstring). Returns whether the setting took effect."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, RETAIN))
    _STATE["kept"] = ok
    return ok


def release() -> None:
    """Back to the C library's own settings (large blocks mapped and unmapped one by one) and the
    heap's free pages handed back to the system. Nothing to do unless :func:`keep_freed_blocks`
    took effect."""
    if _STATE["kept"]:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
            libc.malloc_trim(0)
        _STATE["kept"] = False


def trim() -> None:
    """Hand the heap's free pages back to the system now (``malloc_trim``): after the blocks that
    were allocated while keeping are freed. Nothing to do where :func:`available` is false."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

"""Long reads through memory-mapped files, without the file piling up in the resident set.

Every page of a map that a read touches counts in the process's resident memory (RSS) until it is
unmapped, although the kernel keeps it in its page cache either way and could drop it at once. A
regression reads a 9 GB ``.beton`` once per target block, and ``write_dataset`` reads the whole
store: their RSS would carry those files, and RSS is what a memory plan, a job scheduler or a
container limit sees. :class:`PageRelease` counts the bytes read and, every ``every`` bytes,
releases the map's pages (``madvise(MADV_DONTNEED)``). On a shared file map (numpy's ``r`` and
``r+`` modes) nothing is lost: the next read faults the pages back in from the page cache, and
written pages stay in it until written back. Copy-on-write maps (``c``), whose changes live only in
the process, are never released.
"""

from __future__ import annotations

import mmap
from typing import Any

from datamodels_ml.procfs import kb_field

__all__ = ["PageRelease", "release", "resident_file_bytes"]

EVERY = 2**28  # bytes read between releases (256 MB)


def _map_of(arr: Any) -> mmap.mmap | None:
    """The ``mmap`` under a numpy memmap (or the map itself), None for anything else or a private map."""
    if isinstance(arr, mmap.mmap):
        return arr
    if getattr(arr, "mode", None) == "c":
        return None
    m = getattr(arr, "_mmap", None)
    return m if isinstance(m, mmap.mmap) else None


def release(arr: Any) -> bool:
    """Release the resident pages of the map under ``arr`` now. False where there is nothing to do
    (not a shared map, a closed one, or no ``MADV_DONTNEED`` on this system)."""
    m = _map_of(arr)
    if m is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        m.madvise(mmap.MADV_DONTNEED)
    except (ValueError, OSError):  # closed, or refused: the pages simply stay
        return False
    return True


class PageRelease:
    """Count the bytes read from the maps under ``arrays``; every ``every`` bytes, release their
    pages. Each process counts for itself (a forked reader releases its own view)."""

    def __init__(self, *arrays: Any, every: int | None = None):
        self.arrays = [a for a in arrays if _map_of(a) is not None]
        self.every = EVERY if every is None else every
        self.count = 0

    def read(self, nbytes: int) -> None:
        if not self.arrays:
            return
        self.count += nbytes
        if self.count >= self.every:
            self.count = 0
            for a in self.arrays:
                release(a)


def resident_file_bytes() -> int | None:
    """Bytes of file-backed pages resident in this process (``RssFile`` of ``/proc/self/status``;
    None where the system does not say): what :func:`release` gives back."""
    return kb_field("/proc/self/status", "RssFile")

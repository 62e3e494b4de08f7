"""Opening a store's files safely: never through a symbolic link where the tool writes, and never
mapping an array whose size is not exactly what its header and the spec say.

* ``open_in_store`` / ``make_store_dir``: every file and folder the tool creates or writes inside a
  store (``.lock``, ``workers/<i>/``, ``workers/<i>/output.log``, the arrays, temporary files) is
  reached component by component from the store's own directory with ``O_NOFOLLOW``, so a link
  planted there (to a user's file elsewhere) is refused in one line instead of written through, and
  a link swapped in after a check cannot redirect the write. Only regular files are opened (a FIFO
  in their place cannot hang the tool).
* ``map_array``: a ``.npy`` file is checked against its header and the spec (shape, dtype, and its
  size to the byte) and mapped with Python's ``mmap``, which never grows a file. numpy's ``r+``
  memmap zero-extends a short file: a truncated array would then pass for rows of zeros.
* ``create_array``: a new array file written through the same safe open (header, size, blocks).
* ``flush_rows`` / ``fdatasync``: getting rows to disk before their completion flags.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
from pathlib import Path

import numpy as np

from datamodels_ml.errors import UserError
from datamodels_ml.store.layout import read_header_from, reserve_fd

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _link_error(path: Path) -> UserError:
    return UserError(f"{path} is a symbolic link: refusing to write through it (remove the link: the "
                     "tool never writes through one)")


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_dir(name: str, dir_fd: int, shown: Path, create: bool) -> int:
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=dir_fd)  # the umask applies, as for every folder we make
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            if _is_link(name, dir_fd):
                raise _link_error(shown) from None
            raise UserError(f"{shown} is not a directory; the store needs it to be one") from None
        raise


def _walk(store: Path, parts: tuple[str, ...], create: bool) -> int:
    """A descriptor of ``store/parts...`` reached without following a link below ``store``."""
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)  # the store's own path is the user's to choose
    shown = store
    for part in parts:
        shown = shown / part
        try:
            inner = _open_dir(part, fd, shown, create)
        finally:
            os.close(fd)
        fd = inner
    return fd


def make_store_dir(store: str | Path, relative: str | Path) -> Path:
    """Create ``store/relative`` (and the folders above it, inside the store) as real directories;
    a symbolic link or a file on the way is a ``UserError`` naming it. Returns the path."""
    store = Path(store)
    os.close(_walk(store, Path(relative).parts, create=True))
    return store / relative


def open_in_store(store: str | Path, relative: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of ``store/relative`` (a regular file) without following any link below ``store``.

    A link is a ``UserError`` naming it; other failures are ``OSError`` as from ``os.open``.
    ``O_TRUNC`` takes effect only once the file is known to be a regular file.
    """
    store = Path(store)
    parts = Path(relative).parts
    path = store.joinpath(*parts)
    dir_fd = _walk(store, parts[:-1], create=False)
    try:
        fd = os.open(parts[-1], (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and _is_link(parts[-1], dir_fd):
            raise _link_error(path) from None
        raise
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a regular file; the store needs it to be one")
        os.set_blocking(fd, True)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_not_links(store: Path, names: list[str]) -> None:
    """Refuse a store whose top-level ``names`` (those that exist) include a symbolic link."""
    for name in names:
        if (store / name).is_symlink():
            raise _link_error(store / name)


def map_array(store: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, *,
              writable: bool) -> tuple[np.memmap, mmap.mmap, int]:
    """Map ``store/<key>.npy`` after checking it against ``shape`` and ``dtype`` (the spec's) and its
    size against its header; return the array, its map and the header's length.

    Writable maps are opened without following links; read-only ones may be links (nothing is
    written). Every mismatch is a ``UserError`` naming the file; nothing is written to the file.
    """
    file = store / f"{key}.npy"
    if not file.is_file() and not file.is_symlink():
        raise UserError(f"store at {store} is missing {file.name}")
    try:
        if writable:
            fd = open_in_store(store, file.name, os.O_RDWR)
        else:
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UserError(f"{file} is not a regular file; the store needs it to be one")
    except OSError as exc:
        raise UserError(f"cannot open {file}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            found_shape, found_dtype, offset = read_header_from(fh, file)
        if found_dtype != dtype:
            raise UserError(f"{file}: the spec gives key '{key}' dtype {_name(dtype)} but the file holds "
                            f"{_name(found_dtype)}; the spec and the store disagree")
        if found_shape != shape:
            raise UserError(f"{file}: shape {found_shape} does not match the spec's {shape}")
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.fstat(fd).st_size
        if size < expected:
            raise UserError(f"{file} is truncated: {size} bytes, but its header ({list(shape)} {_name(dtype)}) "
                            f"needs {expected}; restore it from a copy or recreate the store (init force=true)")
        if size > expected:
            raise UserError(f"{file} has {size} bytes, but its header ({list(shape)} {_name(dtype)}) needs "
                            f"{expected}: it is not a store array as written; restore it or recreate the store")
        # Python's mmap refuses a length past the end of the file: it never grows one
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)
    # a numpy memmap over this map, as np.memmap builds one (flush, filename, offset and mode work)
    arr = np.ndarray.__new__(np.memmap, shape, dtype=dtype, buffer=mm, offset=offset, order="C")
    arr._mmap, arr.offset, arr.mode, arr.filename = mm, offset, "r+" if writable else "r", os.path.abspath(file)
    return arr, mm, offset


def _name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return name if np.dtype(dtype).isnative or np.dtype(dtype).itemsize == 1 else np.dtype(dtype).str


def create_array(store: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Write ``store/name`` as a new zero-filled ``.npy`` file (numpy's format, all blocks
    allocated) without following a link; a stale file of that name (a temporary one) is replaced."""
    header = io.BytesIO()
    meta = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(header, meta)
    except ValueError:  # a header past 64 KiB needs format 2.0
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, meta)
    (store / name).unlink(missing_ok=True)  # removes a link itself, never its target
    fd = open_in_store(store, name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, header.getvalue())
        os.ftruncate(fd, len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        reserve_fd(fd, store / name)
    finally:
        os.close(fd)


def flush_rows(mm: mmap.mmap, offset: int, row_bytes: int, index: int) -> None:
    """msync only the pages of ``mm`` that hold row ``index`` (rows of ``row_bytes`` after ``offset``)."""
    if row_bytes == 0:
        return
    page = mmap.ALLOCATIONGRANULARITY
    start = offset + index * row_bytes
    aligned = (start // page) * page
    mm.flush(aligned, start + row_bytes - aligned)


def fdatasync(store: Path, name: str) -> None:
    """Sync ``store/name``'s data (all dirty pages, whichever process wrote them) to disk."""
    fd = open_in_store(store, name, os.O_RDWR)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)

"""What a store directory holds on disk, before any row is read: its spec, its size, its space.

* ``spec_from_headers``: a store made by the original MadryLab tools has no ``spec.json``; its spec
  is read back from the ``.npy`` headers (``_completed.npy`` gives ``num_models``, every other
  ``<key>.npy`` a key with its per-model shape and dtype), so such a store opens as it is.
* ``store_bytes`` / ``check_free_space``: a store is sized before it is created, and refused with
  one line when the file system cannot hold it.
* ``reserve_fd``: the arrays are memmapped, and a write into a sparse file on a full disk kills the
  writer with SIGBUS instead of raising; ``posix_fallocate`` gives every file its blocks up front
  (contents unchanged, so it is safe on a store that already holds rows).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from datamodels_ml.errors import UserError
from datamodels_ml.store.spec import Field, Spec, check_key

COMPLETED = "_completed"
SPEC_FILE = "spec.json"

# numpy's header for these arrays is at most a few hundred bytes; 4 KiB per file covers it.
_HEADER_ALLOWANCE = 4096


def read_header(file: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (nothing else is read)."""
    try:
        with open(file, "rb") as fh:
            shape, dtype, _ = read_header_from(fh, file)
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    return shape, dtype


def read_header_from(fh, file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length (where the data starts) of the ``.npy`` file open as ``fh``."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:  # 2.0 and 3.0 share the 4-byte header length
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise UserError(f"{file}: not a numpy .npy file ({exc})") from None
    if fortran:
        raise UserError(f"{file}: Fortran-ordered arrays are not supported in a store")
    return tuple(int(d) for d in shape), np.dtype(dtype), fh.tell()


def has_store_files(path: Path, keys: list[str] | None = None) -> list[Path]:
    """The store array files already in ``path``: ``_completed.npy`` and ``<key>.npy`` for ``keys``
    (every ``*.npy`` when ``keys`` is None)."""
    if not path.is_dir():
        return []
    if keys is None:
        return sorted(f for f in path.glob("*.npy") if f.is_file())
    return [f for f in (path / f"{k}.npy" for k in [COMPLETED, *keys]) if f.is_file()]


def spec_from_headers(path: Path) -> Spec:
    """The spec of a store without ``spec.json`` (original layout), from its ``.npy`` headers."""
    completed = path / f"{COMPLETED}.npy"
    if not completed.is_file():
        raise UserError(f"no store at {path} (neither {SPEC_FILE} nor {COMPLETED}.npy); "
                        "create it with init or train spec=...")
    shape, dtype = read_header(completed)
    if len(shape) != 1 or dtype != np.dtype(bool):
        raise UserError(f"{completed}: expected a 1-D boolean array, found shape {list(shape)} {dtype}")
    num_models = shape[0]
    schema: dict[str, Field] = {}
    for file in sorted(path.glob("*.npy")):
        key = file.stem
        if key.startswith("_") or key.startswith("."):
            continue
        check_key(key)
        kshape, kdtype = read_header(file)
        if not kshape or kshape[0] != num_models:
            raise UserError(f"{file}: first dimension {list(kshape[:1])} does not match the {num_models} models "
                            f"of {completed.name}")
        if kdtype.kind not in "biuf" or kdtype.hasobject:
            raise UserError(f"{file}: dtype {kdtype} is not a fixed-size numeric or boolean dtype")
        schema[key] = Field(shape=kshape[1:], dtype=kdtype)
    if not schema:
        raise UserError(f"store at {path} has {COMPLETED}.npy but no <key>.npy arrays")
    return Spec(num_models=num_models, schema=schema)


def store_bytes(spec: Spec) -> int:
    """Bytes the store's arrays take on disk (headers included)."""
    total = spec.num_models + _HEADER_ALLOWANCE  # _completed.npy
    for fld in spec.schema.values():
        total += spec.num_models * int(np.prod(fld.shape, dtype=np.int64)) * fld.dtype.itemsize + _HEADER_ALLOWANCE
    return int(total)


def human_bytes(n: float) -> str:
    """``4012192`` -> ``'4.0 MB'`` (powers of 1000), for every size a message shows."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_free_space(path: Path, need: int, *, what: str, hint: str, reclaimed: int = 0) -> None:
    """Refuse, with one line, writing ``need`` bytes where the file system at ``path`` has less free
    (counting ``reclaimed`` bytes that the write frees by replacing an old file)."""
    free = shutil.disk_usage(_existing_parent(Path(path))).free + reclaimed
    if need > free:
        raise UserError(f"{what} needs {human_bytes(need)} but only {human_bytes(free)} is free there; {hint}")


def check_free_space(path: Path, spec: Spec, *, reclaimed: int = 0) -> int:
    """Refuse a store that the file system at ``path`` cannot hold; return its size."""
    need = store_bytes(spec)
    require_free_space(path, need, what=f"the store at {path} for {spec.num_models} models", reclaimed=reclaimed,
                       hint="free space, use another disk, or lower num_models in the spec")
    return need


def reserve_fd(fd: int, file: Path) -> None:
    """Give the file open as ``fd`` all of its blocks now (``posix_fallocate``), so later memmap
    writes cannot hit a full disk. Raises ``UserError`` naming ``file`` when the space is not
    there; the file's size and contents are unchanged."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = os.fstat(fd).st_size
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (95, 22):  # EOPNOTSUPP / EINVAL: a file system without fallocate
            return
        raise UserError(f"cannot reserve {human_bytes(size)} for {file}: {exc.strerror or exc}") from None


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a store: ours (``spec.json``) or the original's (``_completed.npy``)."""
    p = Path(path)
    return (p / SPEC_FILE).is_file() or (p / f"{COMPLETED}.npy").is_file()

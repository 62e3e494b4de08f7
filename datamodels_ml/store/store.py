"""The store: one memmapped ``<key>.npy`` per spec key, ``_completed.npy`` and a copy of the spec.

Layout and formats are the original library's, so stores are interchangeable with its tools.
Writing a model's row is crash-safe: every array is validated first, the rows are written and
flushed, and only then is ``_completed[index]`` set and flushed. A crash at any point leaves the
row either complete with full data or not marked complete.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datamodels_ml.errors import UserError
from datamodels_ml.files import atomic_write_text
from datamodels_ml.store.lock import creation_lock
from datamodels_ml.store.spec import Spec, load_spec
from datamodels_ml.store.safe_open import (check_not_links, create_array, fdatasync, flush_rows, make_store_dir,
                                       map_array, open_in_store)
from datamodels_ml.store.layout import (COMPLETED, SPEC_FILE, check_free_space, has_store_files, is_store,
                                        reserve_fd, spec_from_headers, store_bytes)

FAILURES_FILE = "_failures.json"
WORKERS_DIR = "workers"
LOCK_FILE = ".lock"  # lock.py's; the store refuses it as a link before any lock is taken


class RowError(ValueError):
    """A model's outputs do not fit the spec (keys, shapes or dtypes); the message names the key."""


def _same_spec(a: Spec, b: Spec) -> bool:
    return a.to_json() == b.to_json()


def create_store(path: str | Path, spec: Spec, *, force: bool = False, write_spec: bool = False) -> "Store":
    """Create the store at ``path``; a no-op when a store with the same spec is already there.

    Existing array files are never overwritten without ``force``: a store with another spec, or
    one in the original layout (no ``spec.json``) whose headers differ from ``spec``, is an error.
    An original-layout store with the same spec is adopted as it is (``spec.json`` is written only
    when ``write_spec``). With ``force`` only the store's own files are replaced, nothing else in
    the directory. The space is checked and reserved first, so a full disk is one clear error.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"store path exists and is not a directory: {path}")
    if is_store(path):  # complete, or in the original layout (half-made files are looked at under the lock)
        existing = _existing_spec(path, spec)
        if existing is not None:
            if not force:
                return _adopt(path, existing, spec, write_spec=write_spec)
            return _create(path, spec, existing)  # the caller holds the store's lock
    # A new store: one creator at a time, so that two commands started together on it never
    # replace each other's files (the second one's flags would go to files the first one replaced)
    check_free_space(path, spec)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the store directory {path}: {exc.strerror or exc}") from None
    with creation_lock(path, "creating the store"):
        existing = _existing_spec(path, spec)
        if existing is not None:  # made meanwhile by another command: never replaced, even with force
            return _adopt(path, existing, spec, write_spec=write_spec)
        return _create(path, spec, None)


def _adopt(path: Path, existing: Spec, spec: Spec, *, write_spec: bool) -> "Store":
    """The store already at ``path``, when its spec is ``spec``."""
    if not _same_spec(existing, spec):
        raise UserError(
            f"a store with a different spec already exists at {path} "
            f"({_spec_diff(existing, spec)}); use another store or force=true to replace it"
        )
    if write_spec and not (path / SPEC_FILE).is_file():
        atomic_write_text(path / SPEC_FILE, json.dumps(spec.to_json(), indent=2) + "\n")
    return Store(path)


def _create(path: Path, spec: Spec, existing: Spec | None) -> "Store":
    """Write the arrays of ``spec`` at ``path`` (replacing those of ``existing``), then its spec file."""
    # checked before anything is removed: a store that cannot be created leaves the old one whole
    check_free_space(path, spec, reclaimed=store_bytes(existing) if existing is not None else 0)
    if existing is not None:  # force: remove only the store's own files
        for key in list(existing.schema) + list(spec.schema) + [COMPLETED]:
            (path / f"{key}.npy").unlink(missing_ok=True)
        (path / FAILURES_FILE).unlink(missing_ok=True)
        (path / SPEC_FILE).unlink(missing_ok=True)
    arrays = {key: (spec.num_models, *field.shape) for key, field in spec.schema.items()}
    dtypes = {key: field.dtype for key, field in spec.schema.items()}
    arrays[COMPLETED] = (spec.num_models,)
    dtypes[COMPLETED] = np.dtype(bool)
    created: list[Path] = []
    try:
        for key, shape in arrays.items():
            tmp = path / f".{key}.npy.tmp-{os.getpid()}"
            try:
                create_array(path, tmp.name, shape, dtypes[key])  # never through a link planted there
                os.replace(tmp, path / f"{key}.npy")
                created.append(path / f"{key}.npy")
            except (OSError, ValueError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise UserError(f"cannot create {path / (key + '.npy')}: {why}") from None
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        for file in created:  # a half-made store would block the next init: remove what this call made
            file.unlink(missing_ok=True)
        raise
    # The spec is written last: its presence marks a fully created store.
    atomic_write_text(path / SPEC_FILE, json.dumps(spec.to_json(), indent=2) + "\n")
    return Store(path)


def _existing_spec(path: Path, spec: Spec) -> Spec | None:
    """The spec of the store already at ``path`` (``spec.json`` or the original layout's headers);
    None when there is none. Stray array files of ``spec``'s keys without a store around them are
    refused: they may be somebody's data."""
    if (path / SPEC_FILE).is_file():
        return load_spec(path / SPEC_FILE)
    if (path / f"{COMPLETED}.npy").is_file():
        return spec_from_headers(path)
    stray = has_store_files(path, list(spec.schema))
    if stray:
        raise UserError(f"{stray[0]} already exists and is not part of a store (no {SPEC_FILE} or "
                        f"{COMPLETED}.npy beside it); move it away or use another store directory")
    return None


def _spec_diff(old: Spec, new: Spec) -> str:
    if old.num_models != new.num_models:
        return f"num_models {old.num_models} there, {new.num_models} requested"
    for key in sorted(set(old.schema) | set(new.schema)):
        if key not in old.schema:
            return f"key '{key}' not in the existing store"
        if key not in new.schema:
            return f"key '{key}' not in the requested spec"
        if old.schema[key] != new.schema[key]:
            a, b = old.schema[key], new.schema[key]
            return f"key '{key}': {list(a.shape)} {a.dtype} there, {list(b.shape)} {b.dtype} requested"
    return "specs differ"


def _fits(arr: np.ndarray, dtype: np.dtype) -> bool:
    """Whether ``arr`` can be stored as ``dtype`` without loss.

    Safe casts always fit. Float to a narrower float fits (the spec chose the precision) unless a
    finite value overflows. Anything else fits only if every value survives the round trip exactly
    (0/1 integers into bool, small integers into uint8, 2.0 into int).
    """
    if arr.dtype == dtype or np.can_cast(arr.dtype, dtype, casting="safe"):
        return True
    if arr.dtype.kind not in "biuf":
        return False
    with np.errstate(all="ignore"):
        cast = arr.astype(dtype)
        if arr.dtype.kind == "f" and dtype.kind == "f":
            return bool(np.all(np.isfinite(cast) | ~np.isfinite(arr)))
        return bool(np.array_equal(cast.astype(arr.dtype), arr))


class Store:
    """An existing store directory, its arrays mapped once checked (``store.safe_open.map_array``).

    Every array's header must match the spec (shape, dtype) and its size must be exactly what its
    header says: a truncated file is refused in one line, never zero-extended. A writable store
    holding a symbolic link where the tool writes (an array, ``.lock``, ``workers``) is refused.
    """

    def __init__(self, path: str | Path, *, writable: bool = True):
        self.path = Path(path)
        spec_file = self.path / SPEC_FILE
        if spec_file.is_file():
            self.spec = load_spec(spec_file)
            self.original_layout = False
        else:  # the original library's layout: the spec is in the .npy headers
            self.spec = spec_from_headers(self.path)
            self.original_layout = True
        self.writable = writable
        keys = [*self.spec.schema, COMPLETED]
        if writable:
            check_not_links(self.path, [f"{k}.npy" for k in keys] + [LOCK_FILE, WORKERS_DIR])
            self._check_writable()
        self._arrays: dict[str, np.memmap] = {}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # key -> (its map, header length), to flush rows
        for key in keys:
            shape = (self.num_models,) + (() if key == COMPLETED else self.spec.schema[key].shape)
            dtype = np.dtype(bool) if key == COMPLETED else self.spec.schema[key].dtype
            arr, mm, offset = map_array(self.path, key, shape, dtype, writable=writable)
            self._arrays[key], self._maps[key] = arr, (mm, offset)

    def _check_writable(self) -> None:
        """access(2) answers for permissions and for a read-only file system alike, root included."""
        for file in [self.path, *(self.path / f"{k}.npy" for k in [*self.spec.schema, COMPLETED])]:
            if file.exists() and not os.access(file, os.W_OK):
                read_only = bool(os.statvfs(file).f_flag & os.ST_RDONLY)
                why = os.strerror(30 if read_only else 13)  # EROFS / EACCES
                raise UserError(f"store {self.path} is not writable ({why}: {file})")

    def reserve_space(self) -> None:
        """Allocate every array file's blocks now (see ``store.layout.reserve``); contents unchanged."""
        for key in [*self.spec.schema, COMPLETED]:
            fd = open_in_store(self.path, f"{key}.npy", os.O_RDWR)
            try:
                reserve_fd(fd, self.path / f"{key}.npy")
            finally:
                os.close(fd)

    # -- reading -------------------------------------------------------------------------------
    @property
    def num_models(self) -> int:
        return self.spec.num_models

    def array(self, key: str) -> np.memmap:
        """The memory-mapped array of ``key`` (shape ``(num_models, *shape)``)."""
        if key not in self._arrays:
            raise UserError(f"key '{key}' is not in the store at {self.path} (keys: {', '.join(self.spec.schema)})")
        return self._arrays[key]

    def _flush(self, key: str, index: int) -> None:
        mm, offset = self._maps[key]
        arr = self._arrays[key]
        flush_rows(mm, offset, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize, index)

    @property
    def completed(self) -> np.ndarray:
        """Boolean ``[num_models]``: which rows hold a finished model."""
        return np.asarray(self.array(COMPLETED), dtype=bool)

    def completed_indices(self) -> np.ndarray:
        return np.flatnonzero(self.completed)

    def missing_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.completed)

    def make_logdir(self, index: int) -> Path:
        """Create ``workers/<index>`` as a real folder of the store (a link on the way is a
        ``UserError`` naming it) and return it."""
        return make_store_dir(self.path, Path(WORKERS_DIR) / str(index))

    # -- writing -------------------------------------------------------------------------------
    def check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < self.num_models:
            raise UserError(f"index {index!r} out of range: the store holds models 0..{self.num_models - 1}")
        return int(index)

    def validate_row(self, outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check a main's return value against the schema; return arrays cast to the schema dtypes.

        Raises ``RowError`` naming the key when keys, shapes or dtypes do not fit.
        """
        if not isinstance(outputs, Mapping):
            raise RowError(f"main must return a dict from spec keys to arrays, got {type(outputs).__name__}")
        missing = sorted(set(self.spec.schema) - set(outputs))
        extra = sorted(set(outputs) - set(self.spec.schema))
        if missing:
            raise RowError(f"main's result is missing key '{missing[0]}' (spec keys: {', '.join(self.spec.schema)})")
        if extra:
            raise RowError(f"main returned key '{extra[0]}', which is not in the spec (spec keys: {', '.join(self.spec.schema)})")
        rows: dict[str, np.ndarray] = {}
        for key, field in self.spec.schema.items():
            value = outputs[key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            try:
                arr = np.asarray(value)
            except Exception as exc:  # noqa: BLE001 - ragged lists and the like
                raise RowError(f"key '{key}': cannot be read as an array ({exc})") from None
            if arr.shape != field.shape:
                raise RowError(f"key '{key}': shape {list(arr.shape)} does not match the spec's {list(field.shape)}")
            if not _fits(arr, field.dtype):
                raise RowError(f"key '{key}': dtype {arr.dtype} cannot be stored as {field.dtype} without loss")
            rows[key] = np.array(arr, dtype=field.dtype, order="C")
        return rows

    def write_row(self, index: int, outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``outputs`` then write them as row ``index``, flush, and mark the row complete."""
        index = self.check_index(index)
        rows = self.write_data(index, outputs)
        for key in rows:
            self._flush(key, index)
        self.array(COMPLETED)[index] = True
        self._flush(COMPLETED, index)
        return rows

    def write_data(self, index: int, outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate and write row ``index`` without flushing or marking it complete (see ``commit``)."""
        index = self.check_index(index)
        rows = self.validate_row(outputs)
        for key, value in rows.items():
            self.array(key)[index] = value
        return rows

    def commit(self, indices: list[int]) -> None:
        """Mark rows written by ``write_data`` (in any process) complete: a group commit.

        Every data file is synced to disk once (all dirty pages, whichever process wrote them),
        then the flags are set and synced. Rows reach the disk before their flags do, so even an OS
        crash cannot leave a row marked complete with partial data.
        """
        if not indices:
            return
        for key in self.spec.schema:
            fdatasync(self.path, f"{key}.npy")
        done = self.array(COMPLETED)
        for index in indices:
            done[self.check_index(index)] = True
        fdatasync(self.path, f"{COMPLETED}.npy")

    # -- bookkeeping ---------------------------------------------------------------------------
    def write_failures(self, failures: dict[int, str]) -> None:
        atomic_write_text(self.path / FAILURES_FILE, json.dumps({str(k): v for k, v in sorted(failures.items())}, indent=1))

    def read_failures(self) -> dict[int, str] | None:
        file = self.path / FAILURES_FILE
        if not file.is_file():
            return None
        try:
            return {int(k): v for k, v in json.loads(file.read_text()).items()}
        except (ValueError, json.JSONDecodeError):
            return None


def compress_ranges(indices: np.ndarray, limit: int = 20) -> str:
    """``[0,1,2,5,7,8]`` -> ``'0-2, 5, 7-8'`` (at most ``limit`` ranges, then '...')."""
    parts: list[str] = []
    idx = [int(i) for i in indices]
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
        if len(parts) == limit and i < len(idx):
            parts.append("...")
            break
    return ", ".join(parts)


def nonfinite_counts(store: Store, *, chunk_bytes: int = 1 << 26) -> dict[str, int]:
    """Per floating-point key, how many completed rows hold a NaN or an infinity (read in chunks)."""
    done = store.completed
    counts: dict[str, int] = {}
    for key, fld in store.spec.schema.items():
        if fld.dtype.kind != "f":
            continue
        arr = store.array(key)
        row_bytes = max(1, int(np.prod(fld.shape, dtype=np.int64)) * fld.dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        bad = 0
        for start in range(0, store.num_models, step):
            rows = np.asarray(arr[start:start + step]).reshape(min(step, store.num_models - start), -1)
            bad += int((~np.isfinite(rows).all(axis=1) & done[start:start + step]).sum())
        if bad:
            counts[key] = bad
    return counts


def status_report(store: Store) -> str:
    """Human-readable completed/total, missing indices, NaN/inf rows and the last train's failures."""
    done = store.completed
    missing = np.flatnonzero(~done)
    layout = " (original layout: spec read from the .npy headers)" if store.original_layout else ""
    lines = [f"store: {store.path}{layout}", f"completed: {int(done.sum())}/{store.num_models} (num_models of the spec)"]
    lines.append("missing: none" if missing.size == 0 else f"missing ({missing.size}): {compress_ranges(missing)}")
    from datamodels_ml.store.train_record import last_train

    last = last_train(store.path)
    if last is not None and last["n"] < store.num_models:  # what the last train asked for, too
        below = np.flatnonzero(~done[: last["n"]])
        lines.append(f"last train: n={last['n']} of num_models={store.num_models}: {last['n'] - below.size}/"
                     f"{last['n']} complete, " + ("none missing below n" if below.size == 0 else
                                                  f"missing below n ({below.size}): {compress_ranges(below)}"))
    bad = nonfinite_counts(store)
    if bad:
        lines.append("completed rows with NaN/inf: " + ", ".join(f"{k} {n}" for k, n in bad.items())
                     + " (write_dataset drops them)")
    failures = store.read_failures()
    if failures is None:
        lines.append("failures of the last train: unknown (no train recorded)")
    elif not failures:
        lines.append("failures of the last train: none")
    else:
        lines.append(f"failures of the last train ({len(failures)}):")
        for idx, err in list(failures.items())[:20]:
            lines.append(f"  {idx}: {err.strip().splitlines()[-1] if err.strip() else 'failed'}")
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more")
    return "\n".join(lines)


__all__ = ["Store", "create_store", "status_report", "compress_ranges"]

"""Reading the regression dataset: a ``.beton`` written by ``write_dataset``, as the solver's batches.

Everything goes through ``beton.BetonFile`` (FFCV's file format read directly, so FFCV itself is
never imported): ``BetonBatches`` is a solver batch source over a subset of the rows and a slice of
the target columns, ``read_beton`` reads rows into numpy, ``beton_info`` and ``read_manifest``
describe a file (the manifest is the sidecar ``out + ".json"`` that ``write_dataset`` writes), and
``finite_rows`` finds the rows whose targets hold NaN or inf (which ``write_dataset`` never writes,
but a ``.beton`` written by other tools may hold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from datamodels_ml.dataset.beton import BetonFile
from datamodels_ml.errors import UserError

MANIFEST_SUFFIX = ".json"
FIELDS = ("mask", "targets", "idx")


def manifest_path(out: str | Path) -> Path:
    """The sidecar manifest of a ``.beton``: ``out + ".json"``."""
    return Path(str(out) + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class BetonInfo:
    """What a ``.beton`` holds: its rows, features and targets, and the store index of each row."""

    path: str
    num_rows: int
    n_features: int
    n_targets: int
    x_dtype: np.dtype
    idx: np.ndarray  # [num_rows] store index of each row


def open_beton(path: str | Path) -> BetonFile:
    """The file as a :class:`BetonFile`; a ``UserError`` when it is missing, not FFCV, or lacks our fields."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset not found: {path} (write it with write_dataset)")
    try:
        file = BetonFile(path)
    except (ValueError, OSError) as exc:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable FFCV file ({exc})") from None
    names = file.field_names
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise UserError(f"{path} has no field '{missing[0]}' (fields: {', '.join(names)}; expected mask, targets, idx)")
    kinds = {"mask": file.fields["mask"].is_array, "targets": file.fields["targets"].is_array,
             "idx": file.fields["idx"].type_name == "IntField"}
    wrong = [name for name, ok in kinds.items() if not ok]
    if wrong:
        f = file.fields[wrong[0]]
        expected = "an IntField" if wrong[0] == "idx" else "an NDArrayField"
        raise UserError(f"{path}: field '{f.name}' is a {f.type_name}, expected {expected} (as write_dataset writes)")
    return file


def _info(file: BetonFile) -> BetonInfo:
    idx = file.scalar("idx")
    if len(np.unique(idx)) != len(idx):
        raise UserError(f"{file.path}: the idx field holds duplicate store indices")
    mask, targets = file.fields["mask"], file.fields["targets"]
    return BetonInfo(file.path, file.num_rows, mask.size, targets.size, np.dtype(mask.dtype), idx)


def beton_info(path: str | Path) -> BetonInfo:
    """Read a ``.beton``'s header; a ``UserError`` when it is missing or lacks the mask/targets/idx fields."""
    return _info(open_beton(path))


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The sidecar manifest written with a ``.beton`` (None when absent or unreadable)."""
    file = manifest_path(path)
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _target_range(info: BetonInfo, start: int, end: int | None) -> tuple[int, int]:
    end = info.n_targets if end is None or end == -1 else end
    if not 0 <= start <= end <= info.n_targets:
        raise UserError(f"target range [{start}, {end}) is not inside the {info.n_targets} targets of {info.path}")
    return start, end


_SCAN_BYTES = 2**26  # targets read at a time by finite_rows: 64 MB


def finite_rows(path: str | Path, start: int = 0, end: int | None = None) -> np.ndarray:
    """Boolean ``[num_rows]``: True where the targets ``[start:end)`` of the row are all finite."""
    file = open_beton(path)
    field = file.fields["targets"]
    start, end = _target_range(_info(file), start, end)
    finite = np.ones(file.num_rows, dtype=bool)
    if field.dtype.kind not in "fc" or end == start:  # integers are always finite
        return finite
    step = max(1, _SCAN_BYTES // ((end - start) * field.dtype.itemsize))
    for at in range(0, file.num_rows, step):
        rows = np.arange(at, min(at + step, file.num_rows))
        finite[rows] = np.isfinite(file.read("targets", rows, start, end)).all(axis=1)
    return finite


class BetonBatches:
    """A solver batch source over rows ``rows`` of a ``.beton``, read directly (see ``beton``).

    Iterating yields ``(X_b [b, p], Y_b [b, T] float32, rows_b [b] int64)`` torch tensors where
    ``rows_b`` are positions 0..n_rows-1 in ``rows`` and ``Y_b`` holds only the columns
    ``[target_start:target_end)`` of the targets (the only ones read; an empty range reads X only).
    With ``shuffle`` the order is random, seeded, and different each epoch; without, rows come in
    file order. The last batch may be short. The next batch is read in a background thread while
    the consumer works on the current one. ``num_workers`` is accepted for compatibility (FFCV's
    loader threads) and unused.
    """

    def __init__(self, path: str | Path, rows: Sequence[int] | None = None, *, batch_size: int,
                 num_workers: int = 1, shuffle: bool = True, seed: int = 0, target_start: int = 0,
                 target_end: int | None = None, info: BetonInfo | None = None):
        self.file = open_beton(path)
        self.info = info or _info(self.file)
        rows = np.arange(self.info.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            raise UserError("no rows selected from the dataset")
        if rows.min() < 0 or rows.max() >= self.info.num_rows or len(np.unique(rows)) != rows.size:
            raise UserError(f"rows must be distinct positions in 0..{self.info.num_rows - 1}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.target_start, self.target_end = _target_range(self.info, target_start, target_end)
        self.store_indices = self.info.idx[rows]
        self.n_rows = int(rows.size)
        self.n_features = self.info.n_features
        self.n_targets = self.target_end - self.target_start
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._file_order = np.argsort(rows, kind="stable")

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def _read(self, positions: np.ndarray) -> tuple[Any, Any, Any]:
        import torch

        positions = positions[np.argsort(self.rows[positions], kind="stable")]  # file order within the batch
        rows = self.rows[positions]
        x = self.file.read("mask", rows)
        y = self.file.read("targets", rows, self.target_start, self.target_end)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(positions)

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        order = self._rng.permutation(self.n_rows) if self.shuffle else self._file_order
        starts = range(0, self.n_rows, self.batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="beton-read") as pool:
            ahead = pool.submit(self._read, order[:self.batch_size])
            for s in starts:
                batch = ahead.result()
                if s + self.batch_size < self.n_rows:
                    ahead = pool.submit(self._read, order[s + self.batch_size:s + 2 * self.batch_size])
                yield batch


def read_beton(path: str | Path, rows: Sequence[int] | None = None, *, target_start: int = 0,
               target_end: int | None = None, batch_size: int = 1024,
               num_workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a ``.beton`` as numpy ``(x [n, p], y [n, T] float32, idx [n] store indices)``, in ``rows`` order.

    ``batch_size`` and ``num_workers`` are accepted for compatibility and unused.
    """
    file = open_beton(path)
    info = _info(file)
    rows = np.arange(info.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= info.num_rows):
        raise UserError(f"rows must be positions in 0..{info.num_rows - 1}")
    start, end = _target_range(info, target_start, target_end)
    return file.read("mask", rows), file.read("targets", rows, start, end), info.idx[rows].copy()

"""The regression dataset: a store's completed rows as an FFCV ``.beton``, and the batches read from it.

Writing (``write_dataset``): the fields are the original library's, ``mask`` (the x key, its dtype,
flattened to one dimension), ``targets`` (the y key as float32, flattened) and ``idx`` (the model's
index in the store). Only completed models are written (or the models flagged in another per-model
array, ``completed_name``, or every model, ``ignore_completed``); rows whose targets hold NaN or inf
are left out with a warning. ``y_slice`` keeps one index of a y with more than one dimension per
model. The original's ``--cfg.data_dir ...`` spelling maps onto these keys (``ALIASES``). A sidecar
``out + ".json"`` manifest records what went in (store, keys, written indices, the selection) so a
pipeline can skip a stage that already ran; an existing ``out`` or manifest is replaced only with
``force``. Both are written next to ``out`` under temporary names and moved into place together once
complete, so a failed write never destroys an existing file; FFCV's writer processes, their failures
and the temporary files of writes that died are ``dataset.writer``'s.

Reading is ``dataset.reader`` (``BetonBatches``, ``read_beton``, ``beton_info``, ``read_manifest``,
re-exported here).
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import MISSING

from datamodels_ml.dataset import writer as beton_writer
from datamodels_ml.cpus import allotment
from datamodels_ml.errors import UserError
from datamodels_ml.mapped import PageRelease
from datamodels_ml.dataset.reader import manifest_path
from datamodels_ml.store.layout import read_header

MANIFEST_VERSION = 1


@dataclass
class WriteDatasetConfig:
    ALIASES = {  # the original write_dataset's options (--cfg.data_dir=DIR ...), mapped onto ours by the CLI
        "cfg.data_dir": "store", "cfg.out_path": "out", "cfg.x_name": "x_name", "cfg.y_name": "y_name",
        "cfg.completed_name": "completed_name", "cfg.ignore_completed": "ignore_completed", "cfg.y_slice": "y_slice"}

    store: str = field(default=MISSING, metadata={"help": "store directory (its completed models are written)"})
    out: str = field(default=MISSING, metadata={"help": "FFCV file to write, e.g. data/digits/reg_data.beton"})
    x_name: str = field(default="masks", metadata={"help": "store key of the covariates (boolean or 0/1 masks)"})
    y_name: str = field(default="margins", metadata={"help": "store key of the outputs to predict (the targets)"})
    completed_name: str = field(default="_completed", metadata={
        "help": "per-model array (<store>/<name>.npy, boolean or 0/1) whose nonzero rows are written"})
    ignore_completed: bool = field(default=False, metadata={"help": "write every model's row, completed or not"})
    y_slice: int = field(default=-1, metadata={
        "help": "keep index y_slice of y's first per-model axis, e.g. one checkpoint of [checkpoints, T] (-1: all)"})
    force: bool = field(default=False, metadata={"help": "overwrite an existing out file"})
    num_workers: int = field(default=0, metadata={"help": "FFCV writer processes (0: min(4, CPU cores))"})
    chunk: int = field(default=2048, metadata={"help": "rows read at a time while checking the data"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def indices_hash(indices: Sequence[int]) -> str:
    """A short, order-independent digest of a set of store indices."""
    arr = np.sort(np.asarray(indices, dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


# -- writing -------------------------------------------------------------------------------------
class _Rows:
    """The indexable dataset FFCV's writer reads: row j -> (mask, targets, idx) of model ``keep[j]``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, keep: np.ndarray):
        self.x, self.y, self.keep = x, y, keep
        self.pages = PageRelease(x, y)  # the store's pages read leave each writer's resident set

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, j: int) -> tuple[np.ndarray, np.ndarray, int]:
        i = int(self.keep[j])
        mask = np.ascontiguousarray(np.asarray(self.x[i]).reshape(-1))
        targets = np.ascontiguousarray(np.asarray(self.y[i], dtype=np.float32).reshape(-1))
        self.pages.read(mask.nbytes + targets.nbytes)
        return mask, targets, i


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"out {out} is a directory; give a file path such as {out / 'reg_data.beton'}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; use force=true to overwrite it")
    manifest = manifest_path(out)
    if manifest.is_dir():
        raise UserError(f"{manifest} (the manifest write_dataset writes beside {out.name}) is a directory; "
                        "choose another out")
    if manifest.exists() and not force:
        raise UserError(f"{manifest} (the manifest write_dataset writes beside {out.name}) already exists; "
                        "use force=true to overwrite it")


def _per_model(name: str, role: str, arr: np.ndarray) -> int:
    """Number of values per model once flattened; say so when the key is not 1-D per model."""
    shape = tuple(arr.shape[1:])
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        raise UserError(f"{role} '{name}' holds no values per model (shape {list(shape)})")
    if len(shape) != 1:
        print(f"note: {role} '{name}' has per-model shape {list(shape)}; flattened to [{size}]", file=sys.stderr)
    return size


def _scan(x: np.ndarray, y: np.ndarray, rows: np.ndarray, x_name: str, chunk: int,
          progress: bool) -> np.ndarray:
    """Check the x values are 0/1 and return a boolean ``[len(rows)]``: targets all finite."""
    from datamodels_ml.progress import bar

    finite = np.ones(len(rows), dtype=bool)
    check_x = x.dtype != np.bool_
    pages = PageRelease(x, y)  # the pass reads the whole store: its pages leave the resident set
    with bar("write_dataset: checking rows", total=len(rows), unit="model", enabled=progress) as shown:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            if check_x:
                xs = np.asarray(x[part]).reshape(len(part), -1)
                bad = ~((xs == 0) | (xs == 1))
                if bad.any():
                    r, c = np.argwhere(bad)[0]
                    raise UserError(f"x '{x_name}' must be boolean or hold only 0 and 1 (training-set masks), "
                                    f"but model {int(part[r])} holds {xs[r, c].item()!r} (dtype {x.dtype})")
            ys = np.asarray(y[part], dtype=np.float32).reshape(len(part), -1)
            finite[start:start + len(part)] = np.isfinite(ys).all(axis=1)
            pages.read((xs.nbytes if check_x else 0) + ys.nbytes)
            shown.update(len(part))
    return finite


@dataclass
class _Inputs:
    """A store's x and y arrays, checked for shape and dtype, and the indices of the rows to write."""

    store: Any
    x: np.ndarray
    y: np.ndarray
    completed: np.ndarray  # the selected rows: completed ones, those of completed_name, or all
    n_features: int
    n_targets: int
    what: str = "completed"  # how the rows were selected, for messages: "completed" or "selected"


def _slice_y(y: np.ndarray, y_name: str, y_slice: int) -> np.ndarray:
    """``y[:, y_slice]`` (the original's ``y_slice``: one index of y's first per-model axis); -1: all of y."""
    if y_slice == -1:
        return y
    if y.ndim < 2:
        raise UserError(f"y_slice={y_slice}: y '{y_name}' holds one value per model, there is nothing to slice")
    if not 0 <= y_slice < y.shape[1]:
        raise UserError(f"y_slice={y_slice} is outside y '{y_name}' (per-model shape {list(y.shape[1:])}: "
                        f"give 0..{y.shape[1] - 1}, or -1 for all of it)")
    return y[:, y_slice]


def _rows_to_write(store: Any, completed_name: str, ignore_completed: bool) -> np.ndarray:
    """The store indices to write: every model, the completed ones, or those flagged in ``completed_name``."""
    from datamodels_ml.store.layout import COMPLETED

    if ignore_completed:
        return np.arange(store.num_models)
    if completed_name == COMPLETED:
        rows = store.completed_indices()
        if rows.size == 0:
            raise UserError(f"no completed model in the store at {store.path}: train some models first")
        return rows
    file = store.path / f"{completed_name}.npy"
    if not completed_name or "/" in completed_name or os.sep in completed_name or not file.is_file():
        raise UserError(f"completed_name '{completed_name}': no file {file} (give the name of a per-model "
                        "array of the store, without .npy)")
    shape, dtype = read_header(file)  # the header alone first: an object array is never unpickled
    if shape != (store.num_models,) or dtype.kind not in "biu":
        raise UserError(f"completed_name '{completed_name}': {file} must hold one boolean or 0/1 flag per model "
                        f"(shape [{store.num_models}]), found shape {list(shape)} {dtype}")
    try:
        flags = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"completed_name '{completed_name}': cannot read {file} ({exc})") from None
    rows = np.flatnonzero(flags)
    if rows.size == 0:
        raise UserError(f"completed_name '{completed_name}': no model is flagged in {file}")
    return rows


def _open_inputs(store_path: str | Path, x_name: str, y_name: str, completed_name: str = "_completed",
                 ignore_completed: bool = False, y_slice: int = -1) -> _Inputs:
    """Every check that needs no pass over the data (cheap: run before MLflow or FFCV start)."""
    from datamodels_ml.store.layout import COMPLETED
    from datamodels_ml.store.store import Store

    store = Store(store_path, writable=False)
    x = store.array(x_name)
    y = _slice_y(store.array(y_name), y_name, y_slice)
    if x.shape[0] != y.shape[0]:
        raise UserError(f"x '{x_name}' has {x.shape[0]} rows but y '{y_name}' has {y.shape[0]}; "
                        "they must hold one row per model")
    completed = _rows_to_write(store, completed_name, ignore_completed)
    if x.dtype.kind not in "biuf":
        raise UserError(f"x '{x_name}' must be boolean or 0/1-valued, got dtype {x.dtype}")
    what = "completed" if completed_name == COMPLETED and not ignore_completed else "selected"
    return _Inputs(store, x, y, completed, _per_model(x_name, "x", x), _per_model(y_name, "y", y), what)


def _select_rows(inputs: _Inputs, x_name: str, y_name: str, chunk: int,
                 progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the completed rows: check x is 0/1, split rows into kept and non-finite."""
    if chunk < 1:
        raise UserError(f"chunk must be >= 1, got {chunk}")
    completed = inputs.completed
    finite = _scan(inputs.x, inputs.y, completed, x_name, chunk, progress)
    keep, dropped = completed[finite], completed[~finite]
    if dropped.size:
        print(f"warning: left out {dropped.size} of {completed.size} {inputs.what} models whose '{y_name}' "
              f"holds NaN or inf", file=sys.stderr)
    if keep.size == 0:
        raise UserError(f"every {inputs.what} model's '{y_name}' holds NaN or inf: nothing to write")
    return keep, dropped


def _prepare(store_path: str | Path, out: str | Path, x_name: str, y_name: str, force: bool, chunk: int,
             progress: bool, num_workers: int, **select: Any) -> tuple[Path, _Inputs, np.ndarray, np.ndarray]:
    """Every check and the one pass over the rows, before anything is written.

    ``select``: ``completed_name``, ``ignore_completed``, ``y_slice`` (see ``WriteDatasetConfig``).
    """
    out = Path(out)
    _check_out(out, force)
    inputs = _open_inputs(store_path, x_name, y_name, **select)
    keep, dropped = _select_rows(inputs, x_name, y_name, chunk, progress)
    for name in (out, manifest_path(out)):  # what a killed write left behind frees its space first
        for tmp in beton_writer.remove_stale(name):
            print(f"note: removed {tmp}, left by a write_dataset that did not finish", file=sys.stderr)
    _check_space(out, inputs, keep.size, num_workers)
    return out, inputs, keep, dropped


def _row_bytes(inputs: _Inputs) -> int:
    """Bytes of one row's arrays in the file (``mask`` and ``targets``; ``idx`` is in the metadata)."""
    return inputs.n_features * np.dtype(inputs.x.dtype).itemsize + 4 * inputs.n_targets


def _check_space(out: Path, inputs: _Inputs, rows: int, num_workers: int) -> None:
    """Refuse up front a write the disk cannot hold (the old file stays until the new one is complete,
    so its space is not counted as free)."""
    from datamodels_ml.store.layout import require_free_space

    workers = beton_writer.writer_count(num_workers, rows, allotment())
    need = beton_writer.bytes_needed(rows, _row_bytes(inputs), 32, workers)
    require_free_space(out.parent, need, what=f"writing {rows} models to {out}",
                       hint="free space or write the .beton to another disk (out=...)")


def write_beton(store_path: str | Path, out: str | Path, *, x_name: str = "masks", y_name: str = "margins",
                force: bool = False, num_workers: int = 0, chunk: int = 2048, progress: bool = True,
                completed_name: str = "_completed", ignore_completed: bool = False,
                y_slice: int = -1) -> dict[str, Any]:
    """Write the completed rows of a store to an FFCV file; return the manifest (also written beside it).

    No MLflow here (``write_dataset`` adds it), so other stages and tests can call it directly.
    """
    select = {"completed_name": completed_name, "ignore_completed": ignore_completed, "y_slice": y_slice}
    out, inputs, keep, dropped = _prepare(store_path, out, x_name, y_name, force, chunk, progress, num_workers,
                                          **select)
    return _write(out, inputs, keep, dropped, x_name, y_name, num_workers, select, progress=progress)


def _write(out: Path, inputs: _Inputs, keep: np.ndarray, dropped: np.ndarray, x_name: str, y_name: str,
           num_workers: int, select: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """The .beton and its manifest, each written under a temporary name and moved into place together
    once both are complete (a failure replaces neither)."""
    from ffcv.fields import IntField, NDArrayField

    from datamodels_ml.progress import bar

    fields = {
        "mask": NDArrayField(dtype=np.dtype(inputs.x.dtype), shape=(inputs.n_features,)),
        "targets": NDArrayField(dtype=np.dtype(np.float32), shape=(inputs.n_targets,)),
        "idx": IntField(),
    }
    workers = beton_writer.writer_count(num_workers, keep.size, allotment())
    manifest = _manifest(out, inputs, keep, dropped, x_name, y_name, select)
    tmp, lock = beton_writer.claim_temp(out)
    tmp_manifest = beton_writer.temp_name(manifest_path(out))
    try:
        with bar("write_dataset: writing rows", total=keep.size, unit="row", enabled=progress) as shown:
            beton_writer.write_rows(out, tmp, fields, _Rows(inputs.x, inputs.y, keep), workers=workers,
                                    row_bytes=_row_bytes(inputs), shown=shown)
        try:
            tmp_manifest.write_text(json.dumps(manifest) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {manifest_path(out)}: {exc.strerror or exc}; nothing was replaced") from None
        os.replace(tmp, out)
        os.replace(tmp_manifest, manifest_path(out))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        os.close(lock)
    return manifest


def _manifest(out: Path, inputs: _Inputs, keep: np.ndarray, dropped: np.ndarray, x_name: str, y_name: str,
              select: dict[str, Any]) -> dict[str, Any]:
    """What went into the .beton (written beside it as ``out + ".json"``)."""
    store, x, y, completed = inputs.store, inputs.x, inputs.y, inputs.completed
    n_features, n_targets = inputs.n_features, inputs.n_targets
    return {
        "format_version": MANIFEST_VERSION,
        "beton": str(out.resolve()),
        "store": str(store.path.resolve()),
        "x_name": x_name,
        "y_name": y_name,
        "x_dtype": np.dtype(x.dtype).name,
        "x_shape": list(x.shape[1:]),
        "y_shape": list(y.shape[1:]),
        "num_rows": int(keep.size),
        "num_features": n_features,
        "num_targets": n_targets,
        "num_completed": int(np.count_nonzero(store.completed)),
        "num_selected": int(completed.size),  # rows considered: completed, flagged in completed_name, or all
        **select,
        "indices_hash": indices_hash(keep),
        "indices": [int(i) for i in keep],
        "dropped": [int(i) for i in dropped],
    }


def write_dataset(cfg: WriteDatasetConfig) -> int:
    """Write a store's completed models to an FFCV .beton (fields mask, targets, idx) plus a manifest."""
    # Every cheap check before MLflow starts: a refused command is quick and leaves no run behind.
    select = {"completed_name": cfg.completed_name, "ignore_completed": cfg.ignore_completed, "y_slice": cfg.y_slice}
    from datamodels_ml.dataset.reuse import current_manifest

    if not cfg.force and (done := current_manifest(cfg.store, cfg.out, cfg.x_name, cfg.y_name, select)):
        print(f"{cfg.out} already holds the completed models of {cfg.store} ({done['num_rows']} rows) with these "
              "keys: kept, nothing written (force=true writes it again)")
        return 0
    out, inputs, keep, dropped = _prepare(cfg.store, cfg.out, cfg.x_name, cfg.y_name, cfg.force, cfg.chunk,
                                          cfg.progress, cfg.num_workers, **select)
    from datamodels_ml.tracking import runs as tracking

    params = {"store": cfg.store, "out": cfg.out, "x_name": cfg.x_name, "y_name": cfg.y_name, "force": cfg.force,
              **select}
    with tracking.run("write_dataset", name=f"write_dataset-{len(keep)}", params=params,
                      tags={"rows": len(keep), "x_name": cfg.x_name, "y_name": cfg.y_name}):
        manifest = _write(out, inputs, keep, dropped, cfg.x_name, cfg.y_name, cfg.num_workers, select,
                          progress=cfg.progress)
        tracking.log_metrics({"rows_written": manifest["num_rows"], "rows_dropped": len(manifest["dropped"])})
        small = {k: v for k, v in manifest.items() if k not in ("indices", "dropped")}
        tracking.set_tags({"indices_hash": manifest["indices_hash"]})
        tracking.log_dict(small, "manifest.json")
    print(f"wrote {manifest['num_rows']} models to {cfg.out} (mask [{manifest['num_features']}] "
          f"{manifest['x_dtype']}, targets [{manifest['num_targets']}] float32"
          + (f"; left out {len(manifest['dropped'])} with NaN/inf targets)" if manifest["dropped"] else ")"))
    return 0

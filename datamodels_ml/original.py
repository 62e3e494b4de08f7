"""Results of the original MadryLab tools: a ``datamodels.pt`` that holds only ``weight``, ``bias``, ``lam``.

The original fits on masks standardized with the population mean and std of the rows it fitted
last: its final refit runs on the first ``num_train + num_val`` rows of the ``.beton`` (train rows
first, then validation rows, in file order), and it saves neither the mean/std nor which models
those rows were. Both are recovered here from the original regression config (``data.data_path``,
``data.num_train``, ``data.num_val``, the target slice) and the ``.beton`` it names, so the
result is scored, served and compared like one of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

ORIGINAL_KEYS = ("weight", "bias", "lam")
_CHUNK_ROWS = 4096


def is_original(data: Any) -> bool:
    """A dict with the original's three keys and without our standardization."""
    return isinstance(data, dict) and all(k in data for k in ORIGINAL_KEYS) and "mean" not in data


def read_original_config(path: str | Path) -> dict[str, Any]:
    """``data.*`` of an original regression config (YAML, fastargs sections)."""
    from datamodels_ml.files import read_yaml

    doc = read_yaml(path, "original regression config")
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise UserError(f"{path}: no 'data' section (expected the original regression config)")
    for key in ("data_path", "num_train", "num_val"):
        if key not in data:
            raise UserError(f"{path}: missing data.{key}")
    return {"data_path": str(data["data_path"]), "num_train": int(data["num_train"]), "num_val": int(data["num_val"]),
            "target_start_ind": int(data.get("target_start_ind", 0) or 0),
            "target_end_ind": int(data.get("target_end_ind", -1) if data.get("target_end_ind") is not None else -1)}


def standardization(beton: str | Path, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean [p], std [p], store indices [n_rows])`` of the first ``n_rows`` rows of ``beton``,
    with the original's population std, read in chunks."""
    from datamodels_ml.dataset.reader import beton_info, read_beton

    info = beton_info(beton)
    if n_rows > info.num_rows:
        raise UserError(f"the original config fitted on {n_rows} rows but {beton} holds only {info.num_rows}")
    total = np.zeros(info.n_features, dtype=np.float64)
    squares = np.zeros(info.n_features, dtype=np.float64)
    idx = np.empty(n_rows, dtype=np.int64)
    for start in range(0, n_rows, _CHUNK_ROWS):
        rows = np.arange(start, min(n_rows, start + _CHUNK_ROWS))
        x, _, store_idx = read_beton(beton, rows, target_end=1)
        x = x.astype(np.float64)
        total += x.sum(0)
        squares += (x * x).sum(0)
        idx[rows] = store_idx
    mean = total / n_rows
    std = np.sqrt(np.maximum(squares / n_rows - mean * mean, 0.0))
    return mean, std, idx


def complete_original(data: dict[str, Any], config: str | Path, *, source: str,
                      beton: str | Path | None = None) -> dict[str, Any]:
    """Our datamodels dict from an original one plus the config (and ``.beton``) it was fitted with."""
    from datamodels_ml.dataset.reader import read_manifest

    cfg = read_original_config(config)
    beton = Path(beton or cfg["data_path"])
    if not beton.is_file():
        raise UserError(f"the .beton of {source} not found: {beton} (from {config}); give original_beton=PATH")
    weight = np.asarray(data["weight"].detach().cpu() if hasattr(data["weight"], "detach") else data["weight"])
    n_fit = cfg["num_train"] + cfg["num_val"]
    mean, std, idx = standardization(beton, n_fit)
    if weight.ndim != 2 or weight.shape[0] != mean.shape[0]:
        raise UserError(f"{source}: weight has shape {list(weight.shape)} but {beton} has {mean.shape[0]} features")
    start = cfg["target_start_ind"]
    end = cfg["target_end_ind"] if cfg["target_end_ind"] != -1 else start + weight.shape[1]
    if end - start != weight.shape[1]:
        raise UserError(f"{source}: {weight.shape[1]} targets but {config} slices targets {start}..{end - 1}")
    manifest = read_manifest(beton) or {}
    return {**data, "mean": mean, "std": std, "train_indices": idx[:cfg["num_train"]],
            "val_indices": idx[cfg["num_train"]:], "target_start": start, "target_end": end,
            "x_name": manifest.get("x_name"), "y_name": manifest.get("y_name"), "store": manifest.get("store"),
            "data_path": str(beton), "origin": "original"}

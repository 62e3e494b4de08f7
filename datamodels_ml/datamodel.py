"""Fitted datamodels as an object: load ``datamodels.pt``, predict outputs from masks, rank training examples.

``datamodels.pt`` (written by ``regress``) holds, per target, a linear model fitted on standardized
masks: ``pred = ((x - mean) / std) @ weight + bias``. ``Datamodels`` folds the standardization into
raw-scale weights once (``weights_raw_scale``), so predicting is one matrix product on raw 0/1 masks,
and the raw-scale weight of training example ``i`` reads as "the change in the output when example
``i`` is in the training set".

Memory: the weights keep the file's float32 (no float64 copy of ``[p, T]``), and the raw-scale
weights are held as a sparse float64 matrix while at most ``SPARSE_DENSITY`` of them are non-zero
(datamodels are: ~0.3% at p = 50k), so loading costs about the file's size.

Features with ``std == 0`` (a training example that was in every or no training subset) carry no
information; their standardized value is taken as 0 whatever the mask says (``regress`` itself
stores ``std = 1`` for them, and the lasso gives them no weight).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

REQUIRED_KEYS = ("weight", "bias", "mean", "std")
FORMAT_VERSION = 1
SPARSE_DENSITY = 0.1  # raw-scale weights held sparse up to this fraction of non-zeros


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_tensors(path: str | os.PathLike, *, what: str = "a datamodels file") -> Any:
    """``torch.load`` with ``weights_only=True`` only: tensors, numbers, strings, lists and dicts.

    A file that needs anything else (pickled classes or functions, which run code as they load) is
    refused with one line; nothing in it is executed. Every file this project reads that a user may
    have received goes through here.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # the safe unpickler met no class or function: a corrupt file
            raise UserError(f"{path}: cannot read as {what} (not a valid torch file)") from None
        raise UserError(f"{path}: refused to load: it holds Python objects beyond tensors, numbers, strings, "
                        f"lists and dicts, which could run code when unpickled (only safe files are read; "
                        f"re-create it with regress)") from None
    except Exception as exc:  # noqa: BLE001 - not a torch file at all
        raise UserError(f"{path}: cannot read as {what} ({type(exc).__name__}: {exc})") from None


_PREDICT_ROWS = 256  # masks converted to float64 at a time by predict

@dataclass(frozen=True)
class TopK:
    """The training examples that move one target's prediction the most.

    ``target`` is relative to the fitted slice (0 .. n_targets-1); ``absolute_target`` is its index in
    the store's y output. Indices are feature indices (training examples), weights are on the raw
    scale (the effect of including the example), most positive first / most negative first. Only
    non-zero weights are listed, so there may be fewer than ``k`` of each.
    """

    target: int
    absolute_target: int
    positive_indices: np.ndarray
    positive_weights: np.ndarray
    negative_indices: np.ndarray
    negative_weights: np.ndarray


@dataclass
class Datamodels:
    """One sparse linear model per target, from raw masks ``[n, n_features]`` to outputs ``[n, n_targets]``."""

    weight: np.ndarray  # [n_features, n_targets], standardized scale
    bias: np.ndarray  # [n_targets]
    mean: np.ndarray  # [n_features]
    std: np.ndarray  # [n_features]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        src = str(self.path) if self.path else "datamodels"
        w = np.asarray(self.weight)
        self.weight = w if w.dtype in (np.float32, np.float64) else w.astype(np.float64)  # the file's float32 kept
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(self.std, dtype=np.float64).reshape(-1)
        if self.weight.ndim != 2:
            raise UserError(f"{src}: 'weight' must be 2-D [n_features, n_targets], got shape {list(self.weight.shape)}")
        p, t = self.weight.shape
        for name, arr, n in (("bias", self.bias, t), ("mean", self.mean, p), ("std", self.std, p)):
            if arr.shape != (n,):
                raise UserError(f"{src}: '{name}' has {arr.shape[0]} entries, expected {n} to match 'weight' {[p, t]}")
        inv_std = np.divide(1.0, self.std, out=np.zeros_like(self.std), where=self.std > 0)
        rows, cols = np.nonzero(self.weight)
        if rows.size <= SPARSE_DENSITY * self.weight.size:
            from scipy.sparse import csc_matrix

            vals = self.weight[rows, cols].astype(np.float64) * inv_std[rows]
            self._w_raw = csc_matrix((vals, (rows, cols)), shape=self.weight.shape)
            self._w_raw.eliminate_zeros()  # a constant feature's weight (its 1/std is 0)
        else:
            self._w_raw = self.weight.astype(np.float64) * inv_std[:, None]
        self._b_raw = self.bias - np.asarray(self._w_raw.T @ self.mean).reshape(-1)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "datamodels") -> "Datamodels":
        """Build from the dict ``regress`` saves (tensors or arrays)."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a datamodels file (expected a dict, got {type(data).__name__})")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        from datamodels_ml.original import is_original

        if missing and is_original(data):
            raise UserError(f"{source} was written by the original tools (weight, bias, lam only): give "
                            f"original_config=<the regression config it was fitted with> to recover its "
                            f"standardization from the .beton that config names")
        if missing:
            raise UserError(f"{source}: not a datamodels file (missing key '{missing[0]}'; "
                            f"expected {', '.join(REQUIRED_KEYS)})")
        arrays = {k: _numpy(data[k]) for k in REQUIRED_KEYS}
        meta = {k: v for k, v in data.items() if k not in REQUIRED_KEYS}
        return cls(**arrays, meta=meta, path=Path(source) if source != "datamodels" else None)

    @classmethod
    def load(cls, path: str | os.PathLike, *, original_config: str | os.PathLike | None = None,
             original_beton: str | os.PathLike | None = None) -> "Datamodels":
        """Read ``datamodels.pt``; a missing file or a dict without the needed keys is a ``UserError``.

        A file of the original tools (``weight``, ``bias``, ``lam`` only) needs ``regression.original_config``,
        the regression config it was fitted with (see ``original``); ``original_beton`` overrides the
        ``.beton`` that config names (when it has moved).
        """
        path = Path(path)
        if path.is_dir() and (path / "datamodels.pt").is_file():
            path = path / "datamodels.pt"
        if not path.is_file():
            raise UserError(f"datamodels file not found: {path}")
        data = load_tensors(path)
        if original_config:
            from datamodels_ml.original import complete_original, is_original

            if not is_original(data):
                raise UserError(f"original_config is for results of the original tools, but {path} already "
                                f"holds its standardization (mean, std): leave original_config out")
            data = complete_original(data, original_config, source=str(path), beton=original_beton)
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write as ``datamodels.pt`` (tensors and plain values only: loadable with weights_only)."""
        import torch

        def plain(v: Any) -> Any:
            return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v

        data = {k: plain(v) for k, v in self.meta.items()}
        data.update({k: torch.from_numpy(getattr(self, k).astype(np.float32)) for k in REQUIRED_KEYS})
        torch.save(data, path)

    # -- shape and provenance ------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.weight.shape[1])

    @property
    def target_start(self) -> int:
        """First target of the fitted slice in the store's y output (0 when not recorded)."""
        return int(self.meta.get("target_start") or 0)

    @property
    def target_end(self) -> int:
        """End (exclusive) of the fitted slice in the store's y output."""
        end = self.meta.get("target_end")
        return int(end) if end is not None else self.target_start + self.n_targets

    @property
    def x_name(self) -> str | None:
        return self.meta.get("x_name") or None

    @property
    def y_name(self) -> str | None:
        return self.meta.get("y_name") or None

    @property
    def store(self) -> str | None:
        return self.meta.get("store") or None

    def indices(self, key: str) -> np.ndarray:
        """``train_indices`` / ``val_indices`` as int64 store indices (empty when not recorded)."""
        value = self.meta.get(key)
        return np.zeros(0, dtype=np.int64) if value is None else _numpy(value).astype(np.int64).reshape(-1)

    # -- use -----------------------------------------------------------------------------------
    def weights_raw_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W [n_features, n_targets], b [n_targets])`` with ``predict(x) == x @ W + b`` on raw masks
        (float64; ``W`` dense, made on each call when the weights are held sparse)."""
        w = self._w_raw
        return (w.toarray() if hasattr(w, "toarray") else w), self._b_raw

    def nnz(self) -> np.ndarray:
        """``[n_targets]`` non-zero raw-scale weights per target."""
        w = self._w_raw
        return np.diff(w.indptr) if hasattr(w, "indptr") else (w != 0).sum(axis=0)

    def predict(self, masks: Any) -> np.ndarray:
        """Predicted outputs ``[n, n_targets]`` (float64) for raw masks ``[n, n_features]`` (bool or 0/1)."""
        x = _numpy(masks)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise UserError(f"masks have shape {list(x.shape)}; expected [n, {self.n_features}] "
                            f"(one column per training example)")
        out = np.empty((x.shape[0], self.n_targets))
        for r in range(0, x.shape[0], _PREDICT_ROWS):  # a float64 copy of a few rows at a time, not of all masks
            xr = x[r : r + _PREDICT_ROWS].astype(np.float64)
            if hasattr(self._w_raw, "indptr"):  # sparse: (W' x')'
                out[r : r + _PREDICT_ROWS] = (self._w_raw.T @ xr.T).T
            else:
                np.matmul(xr, self._w_raw, out=out[r : r + _PREDICT_ROWS])
        return out + self._b_raw

    def top_k(self, target: int, k: int = 5) -> TopK:
        """The ``k`` most positive and ``k`` most negative raw-scale weights of ``target`` (slice-relative)."""
        if not 0 <= int(target) < self.n_targets:
            raise UserError(f"target {target} out of range: the datamodels cover targets 0..{self.n_targets - 1} "
                            f"(store targets {self.target_start}..{self.target_end - 1})")
        if k <= 0:
            raise UserError(f"k must be positive, got {k}")
        w = self._w_raw[:, int(target)]
        w = w.toarray().reshape(-1) if hasattr(w, "toarray") else w
        order = np.argsort(-w, kind="stable")
        pos = order[: k][w[order[: k]] > 0]
        order_neg = np.argsort(w, kind="stable")
        neg = order_neg[: k][w[order_neg[: k]] < 0]
        return TopK(int(target), self.target_start + int(target), pos, w[pos], neg, w[neg])


__all__ = ["Datamodels", "TopK", "REQUIRED_KEYS"]

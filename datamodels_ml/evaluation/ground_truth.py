"""Ground truth for the LDS, out to other attribution tools and back in: the ``export_lds`` command.

The retrained models of a store are a benchmark for any attribution method: their masks (which
training examples each saw) and outputs (one per target). ``export_lds`` writes the held-out models
(with ``datamodels=``: the completed models its regression did not use) or every completed model in
the layouts the tools read:

* ``npz``: ``ground_truth.npz`` with ``masks`` [models, train] bool, ``outputs`` [models, targets]
  float32 and ``indices`` (store rows);
* ``trak``: ``mask.npy`` and ``val_margins.npy``, the two arrays of TRAK's LDS example
  (``preds = masks @ scores``, Spearman per column);
* ``kronfluence``: ``masks.pt`` and ``margins.pt``, numpy arrays saved with ``torch.save``, as
  kronfluence's ``evaluate_lds.py`` examples read them (``torch.from_numpy(torch.load(...))``);
* ``dattri``: ``target_values_lds.pt`` [subsets, test] and ``indices_lds.pt`` [subsets, subset size],
  the tuple ``dattri.metric.lds(score, (target_values, indices))`` takes (its benchmark files' names).
  dattri's values are higher-is-better (it flips losses); margins already are. Its ``lds`` needs equal
  subset sizes; with random masks they differ, and ``indices_lds.pt`` is then a list of one index
  tensor per model (sum ``score[ix]`` per model yourself).

Each export also writes ``ground_truth.json`` (store, rows, keys, sizes), which the tools ignore and
``evaluate ground_truth=DIR`` reads back to check shapes; files of those layouts written by the tools'
own scripts (no JSON) are read too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from datamodels_ml.errors import UserError

FORMATS = ("npz", "trak", "kronfluence", "dattri")
FILES = {"npz": ("ground_truth.npz",), "trak": ("mask.npy", "val_margins.npy"),
         "kronfluence": ("masks.pt", "margins.pt"), "dattri": ("target_values_lds.pt", "indices_lds.pt")}
META = "ground_truth.json"


@dataclass
class GroundTruth:
    """Masks and outputs of retrained models; ``indices`` are their store rows (-1 when unknown)."""

    masks: np.ndarray
    outputs: np.ndarray
    indices: np.ndarray
    meta: dict = field(default_factory=dict)


# -- which models ----------------------------------------------------------------------------------
def from_store(store: str, *, datamodels: str = "", x_name: str = "", y_name: str = "") -> GroundTruth:
    """The held-out models of ``datamodels`` in ``store`` (all completed models without it)."""
    from datamodels_ml.store.store import Store

    if not os.path.isdir(store):
        raise UserError(f"store not found: {store}")
    st = Store(store, writable=False)
    idx = st.completed_indices()
    which = "completed"
    meta: dict = {}
    if datamodels:
        from datamodels_ml.datamodel import Datamodels

        dm = Datamodels.load(datamodels)
        x_name, y_name = x_name or dm.x_name or "", y_name or dm.y_name or ""
        used = np.union1d(dm.indices("train_indices"), dm.indices("val_indices"))
        if used.size == 0:
            raise UserError(f"{datamodels} does not record which models its regression used (train_indices)")
        idx = np.setdiff1d(idx, used)
        which = "heldout"
        meta["datamodels"] = str(dm.path)
    x_name, y_name = x_name or "masks", y_name or "margins"
    for key in (x_name, y_name):
        if key not in st.spec.schema:
            raise UserError(f"the store at {st.path} has no key '{key}' (it has: {', '.join(st.spec.schema)})")
    if idx.size == 0:
        raise UserError(f"no {which} models to export in {st.path}")
    x, y = st.array(x_name), st.array(y_name)
    if x.ndim != 2:
        raise UserError(f"'{x_name}' in {st.path} has shape {list(x.shape[1:])} per model: masks are 1-D")
    outputs = np.asarray(y[idx], dtype=np.float32).reshape(idx.size, -1)
    finite = np.isfinite(outputs).all(axis=1)
    if not finite.all():
        print(f"note: left out {int((~finite).sum())} models whose '{y_name}' holds NaN or inf")
        idx, outputs = idx[finite], outputs[finite]
    masks = np.asarray(x[idx]).astype(bool)
    meta.update({"store": str(st.path), "models": which, "x_name": x_name, "y_name": y_name,
                 "n_train": int(masks.shape[1]), "n_targets": int(outputs.shape[1]),
                 "indices": [int(i) for i in idx]})
    return GroundTruth(masks, outputs, idx, meta)


# -- writing ---------------------------------------------------------------------------------------
def write(gt: GroundTruth, out: str | os.PathLike, fmt: str, *, force: bool = False) -> list[Path]:
    """Write ``gt`` in layout ``fmt`` under ``out``; existing files of those names only with ``force``."""
    import torch

    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out {out} exists and is not a directory")
    paths = [out / name for name in (*FILES[fmt], META)]
    clash = [p for p in paths if p.exists()]
    if clash and not force:
        raise UserError(f"{clash[0]} exists: give force=true to replace it, or another out directory")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        np.savez(paths[0], masks=gt.masks, outputs=gt.outputs, indices=gt.indices)
    elif fmt == "trak":
        np.save(paths[0], gt.masks)
        np.save(paths[1], gt.outputs)
    elif fmt == "kronfluence":
        torch.save(gt.masks, paths[0])
        torch.save(gt.outputs, paths[1])
    else:
        torch.save(torch.from_numpy(gt.outputs), paths[0])
        rows = [torch.from_numpy(np.flatnonzero(m).astype(np.int64)) for m in gt.masks]
        equal = len({r.numel() for r in rows}) == 1
        torch.save(torch.stack(rows) if equal else rows, paths[1])
        if not equal:
            print("note: the models' subsets differ in size, so indices_lds.pt is a list of index tensors, one per "
                  "model (dattri's lds() wants equal sizes: sum score[ix] per model yourself)")
    paths[-1].write_text(json.dumps({"format": fmt, **gt.meta}, indent=1) + "\n")
    return paths


# -- reading ---------------------------------------------------------------------------------------
def detect(directory: Path) -> str:
    found = [fmt for fmt, names in FILES.items() if all((directory / n).is_file() for n in names)]
    if len(found) != 1:
        raise UserError(f"{directory} holds {'no' if not found else 'several'} ground-truth layout"
                        f"{'s' if found else ''} ({', '.join(found) or 'none of ' + ', '.join(FORMATS)}): "
                        f"give format={'|'.join(found or FORMATS)}")
    return found[0]


def _masks_from_indices(indices, n_train: int, path: Path) -> np.ndarray:
    rows = [np.asarray(ix, dtype=np.int64).reshape(-1) for ix in indices]
    top = max((int(r.max()) for r in rows if r.size), default=-1)
    if not n_train:
        raise UserError(f"{path} lists training indices but not the training-set size: keep {META} next to it, or "
                        "evaluate with scores= or datamodels= (their row count is the size)")
    if top >= n_train:
        raise UserError(f"{path} uses training index {top}, beyond the {n_train} training examples")
    masks = np.zeros((len(rows), n_train), dtype=bool)
    for i, r in enumerate(rows):
        masks[i, r] = True
    return masks


def read(directory: str | os.PathLike, fmt: str = "auto", *, n_train: int = 0) -> GroundTruth:
    """Ground truth from ``directory`` in layout ``fmt`` (``auto``: by the files present)."""
    from datamodels_ml.evaluation.scores import as_array, load_torch

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"ground_truth directory not found: {directory}")
    if fmt == "auto":
        fmt = detect(directory)
    if fmt not in FORMATS:
        raise UserError(f"format must be one of auto, {', '.join(FORMATS)}, got '{fmt}'")
    missing = [n for n in FILES[fmt] if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory} has no {missing[0]}: not ground truth in the {fmt} layout")
    meta = {}
    if (directory / META).is_file():
        try:
            meta = json.loads((directory / META).read_text())
        except ValueError as exc:
            raise UserError(f"{directory / META}: not valid JSON ({exc})") from None
    n_train = int(meta.get("n_train") or n_train)
    a, b = directory / FILES[fmt][0], directory / FILES[fmt][-1]
    try:
        if fmt == "npz":
            with np.load(a, allow_pickle=False) as z:
                masks, outputs = z["masks"], z["outputs"]
                indices = z["indices"] if "indices" in z else None
        elif fmt == "trak":
            masks, outputs, indices = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False), None
        elif fmt == "kronfluence":
            masks, outputs, indices = as_array(load_torch(a, "masks")), as_array(load_torch(b, "margins")), None
        else:
            outputs = as_array(load_torch(a, "dattri target values"))
            masks, indices = _masks_from_indices(load_torch(b, "dattri indices"), n_train, b), None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{directory}: cannot read the {fmt} ground truth ({exc})") from None
    masks, outputs = np.asarray(masks), np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise UserError(f"{directory}: masks of shape {list(masks.shape)} and outputs of shape "
                        f"{list(outputs.shape)} do not describe the same models ([models, train], [models, targets])")
    if n_train and masks.shape[1] != n_train:
        raise UserError(f"{directory}: masks have {masks.shape[1]} training examples but {META} records {n_train}")
    if indices is None:
        indices = np.asarray(meta.get("indices") or np.full(masks.shape[0], -1), dtype=np.int64)
    finite = np.isfinite(outputs).all(axis=1)
    if not finite.all():
        print(f"note: left out {int((~finite).sum())} models whose outputs hold NaN or inf")
        masks, outputs, indices = masks[finite], outputs[finite], indices[finite]
    return GroundTruth(masks.astype(bool), outputs, indices, {"format": fmt, **meta})


# -- the export_lds command ------------------------------------------------------------------------
@dataclass
class ExportConfig:
    store: str = field(default=MISSING, metadata={"help": "store of the retrained models"})
    out: str = field(default=MISSING, metadata={"help": "directory to write the ground truth to"})
    format: str = field(default="npz", metadata={"help": f"layout: {' | '.join(FORMATS)}"})
    datamodels: str = field(default="", metadata={
        "help": "datamodels.pt: export only the models its regression did not use (default: every completed model)"})
    x_name: str = field(default="", metadata={"help": "mask key (default: from datamodels.pt, else masks)"})
    y_name: str = field(default="", metadata={"help": "output key (default: from datamodels.pt, else margins)"})
    force: bool = field(default=False, metadata={"help": "replace files of the same names in out"})


def export_lds(cfg: ExportConfig) -> int:
    """Write retrained models' masks and outputs as LDS ground truth for dattri, TRAK, kronfluence or numpy."""
    from datamodels_ml.tracking import runs as tracking

    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got '{cfg.format}'")
    gt = from_store(cfg.store, datamodels=cfg.datamodels, x_name=cfg.x_name, y_name=cfg.y_name)
    params = {"store": cfg.store, "out": cfg.out, "format": cfg.format, "datamodels": cfg.datamodels,
              "models": gt.meta["models"], "x_name": gt.meta["x_name"], "y_name": gt.meta["y_name"]}
    with tracking.run("export_lds", name=f"export_lds-{cfg.format}-{gt.indices.size}", params=params):
        paths = write(gt, cfg.out, cfg.format, force=cfg.force)
        tracking.log_metrics({"n_models": gt.indices.size, "n_train": gt.masks.shape[1],
                              "n_targets": gt.outputs.shape[1]})
    print(f"exported {gt.indices.size} {gt.meta['models']} models x {gt.masks.shape[1]} training examples x "
          f"{gt.outputs.shape[1]} targets ({cfg.format}): {', '.join(str(p) for p in paths)}")
    return 0


__all__ = ["FORMATS", "GroundTruth", "from_store", "write", "read", "detect", "ExportConfig", "export_lds"]

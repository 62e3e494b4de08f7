"""The ``regress`` output directory: what it holds, when it is ours, when it is current, and writing it.

``cfg.out_dir`` holds ``datamodels.pt``, ``config.yaml``, ``path.png``, ``targets.csv`` and
``manifest.json`` (the rerun key of the inputs, the summary, the split), plus, while a fit is under
way, ``.blocks/`` (finished target blocks, see ``regression.target_blocks``), and ``.lock``, held by ``regress`` for its
whole run (``lock.out_dir_lock``). A directory is *ours* when it holds a regression manifest, a block
directory of ours, or the lock file of a regress (taken only in an empty directory or one of ours).
``cfg.force=true`` replaces only these files: each is written to a temporary file first, then all
are renamed into place, the manifest last, so a failed write (a full disk) replaces none. Anything
else in the directory is never touched, and a non-empty directory that is not ours is refused even
with force.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from datamodels_ml.datamodel import FORMAT_VERSION
from datamodels_ml.errors import UserError
from datamodels_ml.files import torch_save
from datamodels_ml.store.lock import LOCK_FILE, recorded_command

RESULTS_FILE = "datamodels.pt"
MANIFEST_FILE = "manifest.json"
OUTPUT_FILES = ("datamodels.pt", "config.yaml", "path.png", "targets.csv", MANIFEST_FILE)
# Keys that do not change the fitted result: left out of the rerun key.
# output-only keys, and the kernels (exact: every kernel gives the same statistics)
NOT_FINGERPRINTED = ("cfg.force", "cfg.num_workers", "cfg.progress", "cfg.out_dir", "cfg.target_block", "gpus",
                     "cfg.kernels")


def config_dict(cfg) -> dict[str, Any]:
    """The merged config as a plain nested dict."""
    import dataclasses

    return dataclasses.asdict(cfg)


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Scalar summaries of a fit: mean best val MSE, non-zeros at the selected λ, val R², time."""
    nnz = result["nnz"].gather(0, result["best_index"][None]).squeeze(0).numpy()
    r2 = result["val_r2"].numpy()
    return {
        "best_val_mse": float(np.mean(result["best_val_mse"].numpy())),
        "mean_nnz_at_best": float(np.mean(nnz)),
        "mean_val_r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
        "epochs": float(result["epochs"]),
        "fit_seconds": float(result["fit_seconds"]),
    }


# -- rerun keys ------------------------------------------------------------------------------------
def _beton_identity(path: str, manifest: dict | None) -> dict[str, Any]:
    st = os.stat(path)
    out = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if manifest:
        out.update({k: manifest.get(k) for k in ("store", "x_name", "y_name", "num_rows", "indices_hash")})
    return out


def rerun_key(cfg) -> dict[str, Any]:
    """What decides the result of a regression: the config (less output-only keys) and the beton."""
    from datamodels_ml.config import to_flat_dict
    from datamodels_ml.dataset.reader import read_manifest

    flat = {k: v for k, v in to_flat_dict(cfg).items() if k not in NOT_FINGERPRINTED}
    data = cfg.data.data_path
    beton = _beton_identity(data, read_manifest(data)) if os.path.isfile(data) else None
    return json.loads(json.dumps({"config": flat, "beton": beton}))


def read_regress_manifest(out: Path) -> dict[str, Any] | None:
    """``out/manifest.json`` when it is a regression manifest (ours), else None."""
    try:
        doc = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "format_version" in doc and "inputs" in doc else None


def is_up_to_date(cfg) -> bool:
    """True when ``cfg.out_dir`` already holds a regression of the same data with the same config."""
    out = Path(cfg.cfg.out_dir)
    recorded = read_regress_manifest(out)
    return bool(recorded) and (out / RESULTS_FILE).is_file() and recorded.get("inputs") == rerun_key(cfg)


def is_ours(out: Path) -> bool:
    """True when ``out`` holds a regression written by this tool (its manifest, or its blocks), or
    is one that a regress has locked (the lock file that regress writes, however far it got)."""
    from datamodels_ml.regression.target_blocks import BlockStore

    return (read_regress_manifest(out) is not None or BlockStore(out).is_ours()
            or recorded_command(out / LOCK_FILE) == "regress")


def check_out_dir(cfg) -> Path:
    """Refuse an ``out_dir`` that we may not write into (see the module docstring)."""
    out = Path(cfg.cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"cfg.out_dir {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not is_ours(out):
        raise UserError(f"cfg.out_dir {out} is not empty and holds no regression of ours (no {MANIFEST_FILE} "
                        f"written by regress): choose another cfg.out_dir; cfg.force=true never replaces such a directory")
    if not cfg.cfg.force and (out / RESULTS_FILE).exists():
        raise UserError(f"cfg.out_dir {out} already holds a fit with other settings or data: give this one its own "
                        f"cfg.out_dir=..., or cfg.force=true to replace it")
    return out


# -- writing ---------------------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    """The temporary file beside ``path`` (same suffix) that is renamed into place."""
    return path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"


def targets_csv(result: dict[str, Any]) -> str:
    lam = result["lam"].numpy()
    lam_max = result["lam_path"][0].numpy()
    best = result["best_index"]
    nnz = result["nnz"].gather(0, best[None]).squeeze(0).numpy()
    lines = ["target,lam,lam_ratio,best_val_mse,nnz_at_best,val_r2"]
    for j in range(lam.shape[0]):
        ratio = lam[j] / lam_max[j] if lam_max[j] > 0 else float("nan")
        lines.append(f"{result['target_start'] + j},{lam[j]:.6g},{ratio:.6g},{result['best_val_mse'][j].item():.6g},"
                     f"{int(nnz[j]) if math.isfinite(nnz[j]) else ''},{result['val_r2'][j].item():.6g}")
    return "\n".join(lines) + "\n"


def path_curves(result: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Per λ index, the means over ALL targets: λ/λ_max, val MSE, train MSE, nnz. A target past its
    early stop counts with its values at its selected λ, so the curves compare across runs (a mean
    over the targets still on the path falls as the hard ones stop, and ranks paths wrongly)."""
    best = result["best_index"].numpy().astype(np.int64)
    curves = []
    for key in ("val_mse", "train_mse", "nnz"):
        values = result[key].numpy().astype(np.float64)
        if not values.size:
            curves.append(np.array([]))
            continue
        at_best = values[np.clip(best, 0, values.shape[0] - 1), np.arange(values.shape[1])]
        filled = np.where(np.isnan(values), at_best[None, :], values)
        with warnings.catch_warnings():  # a target whose selected value is NaN stays out
            warnings.simplefilter("ignore", RuntimeWarning)
            curves.append(np.nanmean(filled, axis=1))
    return (result["lam_ratio"].numpy().mean(axis=1), *curves)


def selected_lam_ratios(result: dict[str, Any]) -> np.ndarray:
    """Each target's selected λ as a fraction of its λ_max (the ticks of ``path.png``)."""
    lam, lam_max = result["lam"].numpy().astype(np.float64), result["lam_path"][0].numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam_max > 0, lam / lam_max, np.nan)


def write_results(result: dict[str, Any], cfg, out: Path, *, run_id: str | None = None) -> None:
    """Write our output files into ``out``: each to a temporary file first, then all renamed into
    place, the manifest last. A failed write (a full disk) replaces nothing: ``UserError``."""
    from omegaconf import OmegaConf

    from datamodels_ml.figures import path_figure, save_figure

    fig = path_figure(*path_curves(result), selected=selected_lam_ratios(result), title=f"{result['y_name'] or 'targets'} "
                      f"[{result['target_start']}:{result['target_end']}], {cfg.cfg.method}")
    manifest = {"format_version": FORMAT_VERSION, "inputs": rerun_key(cfg), "config": config_dict(cfg),
                "summary": summary(result), "train_indices": result["train_indices"].tolist(),
                "val_indices": result["val_indices"].tolist(), "mlflow_run_id": run_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    writers: dict[str, Callable[[Path], Any]] = {
        RESULTS_FILE: lambda tmp: torch_save(result, tmp),
        "config.yaml": lambda tmp: tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg))),
        "targets.csv": lambda tmp: tmp.write_text(targets_csv(result)),
        "path.png": lambda tmp: save_figure(fig, str(tmp)),
        MANIFEST_FILE: lambda tmp: tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n"),
    }
    out.mkdir(parents=True, exist_ok=True)
    staged = [(_temporary(out / name), out / name) for name in writers]
    try:
        for (tmp, final), write in zip(staged, writers.values()):
            try:
                write(tmp)
            except OSError as exc:
                raise UserError(f"cannot write {final}: {exc.strerror or exc}; nothing in {out} was replaced (its "
                                f"fitted target blocks are kept: rerun to write the results without fitting "
                                f"again)") from None
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


__all__ = ["RESULTS_FILE", "MANIFEST_FILE", "OUTPUT_FILES", "rerun_key", "is_up_to_date",
           "is_ours", "check_out_dir", "write_results", "summary", "config_dict", "path_curves"]

"""``evaluate scores=FILE``: any attribution method scored on the retrained models, as datamodels are.

The held-out models are the ones ``evaluate`` uses for datamodels: with ``datamodels=`` those its
regression did not use (so both are scored on the very same models), with ``heldout_store=`` every
completed model of that store, with ``store=`` alone every completed model of the store, and with
``ground_truth=DIR`` the models exported there (``export_lds``, or the tools' own files). The
prediction for a held-out model is ``mask @ scores``.

Only differences between models matter to the LDS: ``mask @ scores`` has no intercept, and a
per-target offset changes no rank correlation (nor a Pearson correlation), so the LDS and the mean
Pearson need no offset. R² needs the output's scale and an offset: it is reported only with
``scale=true`` (the scores are in the output's units, e.g. a linear surrogate's weights), after the
per-target offset that best fits the held-out models (one number per target; it moves no rank).

Also here: the bootstrap interval every evaluation prints and logs (``lds_low``, ``lds_high``), and
the held-out set read from a ``ground_truth`` directory for datamodels.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

OFFSET_NOTE = ("note: predictions are mask @ scores with no intercept; a per-target offset changes no rank "
               "correlation (LDS) nor Pearson, so none is needed for them")


def _heldout(cfg: Any, n_train: int):
    """Held-out models for a score matrix (module docstring): (HeldOut, target_start, where, pending warning)."""
    from datamodels_ml.evaluation import ground_truth
    from datamodels_ml.evaluation.heldout import MIN_HELDOUT, HeldOut, heldout_from_ground_truth, load_heldout

    if cfg.ground_truth:
        held = heldout_from_ground_truth(cfg.ground_truth, cfg.format, n_train=n_train, source=f"scores {cfg.scores}")
        return held, 0, f"the ground truth in {cfg.ground_truth}", None
    if cfg.datamodels:
        from datamodels_ml.datamodel import Datamodels

        dm = Datamodels.load(cfg.datamodels)
        store = cfg.store or dm.store or ""
        held = load_heldout(dm, store=store, heldout_store=cfg.heldout_store, x_name=cfg.x_name, y_name=cfg.y_name,
                            source=str(dm.path), warn=False)
        later = None if cfg.heldout_store else (dm, str(dm.path))  # the fingerprint warning, after the shape checks
        return held, dm.target_start, f"the held-out models of {dm.path} in {held.store}", later
    store = cfg.heldout_store or cfg.store
    if not store:
        raise UserError("no held-out models: give datamodels=PATH (its held-out models), heldout_store=DIR, store=DIR "
                        "or ground_truth=DIR")
    gt = ground_truth.from_store(store, x_name=cfg.x_name, y_name=cfg.y_name)
    if gt.indices.size < MIN_HELDOUT:
        raise UserError(f"only {gt.indices.size} completed models in {store}; at least {MIN_HELDOUT} are needed")
    held = HeldOut(gt.meta["store"], gt.indices, gt.masks, gt.outputs.astype(np.float64), gt.meta["x_name"],
                   gt.meta["y_name"], (gt.outputs.shape[1],))
    return held, 0, f"the completed models of {gt.meta['store']}", None


def method_name(cfg: Any) -> str:
    if cfg.method:
        return cfg.method
    path = Path(cfg.scores)
    return "trak" if (path / "experiments.json").is_file() else path.stem


def _write_per_target(path: Path, scores, pred: np.ndarray, actual: np.ndarray, target_start: int, scale: bool) -> None:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["target", "spearman", "pearson", "r2", "actual_mean", "actual_std", "pred_std"])
        for t in range(scores.n_targets):
            out.writerow([target_start + t, f"{scores.spearman_t[t]:.6g}", f"{scores.pearson_t[t]:.6g}",
                          f"{scores.r2_t[t]:.6g}" if scale else "", f"{actual[:, t].mean():.6g}",
                          f"{actual[:, t].std():.6g}", f"{pred[:, t].std():.6g}"])


def run_method(cfg: Any, *, quiet: bool = False):
    """Score the matrix in ``cfg.scores`` on held-out models; print, write and log like ``evaluate``."""
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.evaluation.bootstrap import interval_metrics, interval_report
    from datamodels_ml.evaluation.outputs import check_out, finished, format_scores, write_and_log
    from datamodels_ml.evaluation.metrics import score
    from datamodels_ml.evaluation.scores import check_shapes, read_scores

    if cfg.out:
        check_out(cfg.out)
    start = time.perf_counter()
    method = method_name(cfg)
    raw = read_scores(cfg.scores, fmt=cfg.scores_format, key=cfg.key, experiment=cfg.experiment,
                      transpose=cfg.transpose, sign=float(cfg.sign))
    held, target_start, where, later = _heldout(cfg, raw.shape[0])
    mat = check_shapes(raw, held.masks.shape, held.actual.shape, source=str(cfg.scores), where=where,
                       target_start=target_start, all_targets=int(np.prod(held.y_shape)))
    if later:
        from datamodels_ml.evaluation.heldout import open_store, warn_unchecked_masks

        warn_unchecked_masks(open_store(held.store, "store"), *later)
    pred = held.masks.astype(np.float64) @ mat
    if cfg.scale:  # the per-target offset that fits best; it moves no rank
        pred = pred + (held.actual - pred).mean(axis=0)
    s = score(pred, held.actual)
    metrics = {k: v for k, v in s.metrics().items() if cfg.scale or k not in ("r2", "mse")}
    if not quiet:
        text = format_scores(s).splitlines()
        if not cfg.scale:
            text = [ln for ln in text if not ln.startswith(("mean R^2", "MSE"))]
            text.append("R^2, MSE:            not reported (scores are not in the output's units; scale=true "
                        "adds the best per-target offset)")
        print(f"method: {method}\n" + "\n".join(text))
        print(OFFSET_NOTE)
    iv = interval_report(pred, held.actual, cfg, quiet=quiet)
    metrics.update(interval_metrics(iv))

    params = {"scores": str(cfg.scores), "method": method, "transpose": cfg.transpose, "sign": cfg.sign,
              "scale": cfg.scale, "datamodels": cfg.datamodels, "store": cfg.store, "heldout_store": cfg.heldout_store,
              "ground_truth": cfg.ground_truth, "n_features": mat.shape[0], "target_start": target_start,
              "target_end": target_start + mat.shape[1]}
    tags = {"method": method, "heldout_models": s.n_models, "targets": f"{target_start}:{target_start + mat.shape[1]}"}
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.run("evaluate", name=f"evaluate-{method}", params=params, tags=tags) as active:
        out = Path(cfg.out) if cfg.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = write_and_log(out, metrics, params, held, pred, s,
                              lambda path: _write_per_target(path, s, pred, held.actual, target_start, cfg.scale))
        run_id = active.info.run_id
    return finished(s, held, files, run_id, None, start, iv, out=cfg.out, quiet=quiet)


__all__ = ["run_method", "OFFSET_NOTE"]

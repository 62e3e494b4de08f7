"""Scoring datamodels on held-out models: LDS, correlations, R², MSE (the model-budget curve is ``budget``).

The held-out models are models the regression never saw: every completed model of a second store
(``heldout_store``), or else the completed models of the datamodels' own store outside the
regression's ``train_indices`` and ``val_indices``. Their masks go through the datamodels; the
predictions are compared, target by target, with the outputs those models actually produced.

The metrics themselves (LDS and the rest, with their conventions) are in ``metrics``.
"""

import csv
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.heldout import check_targets, heldout_from_ground_truth, load_heldout, open_store
from datamodels_ml.evaluation.metrics import Scores, score
from datamodels_ml.evaluation.outputs import EvaluationResult, check_out, finished, format_scores, write_and_log


def write_per_target_csv(path: Path, scores: Scores, dm: Datamodels, pred: np.ndarray, actual: np.ndarray) -> Path:
    """One row per target: absolute index, the four metrics, spreads and the datamodel's non-zeros."""
    nnz = dm.nnz()
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["target", "spearman", "pearson", "r2", "mse", "actual_mean", "actual_std", "pred_std", "nnz"])
        for t in range(scores.n_targets):
            out.writerow([dm.target_start + t, f"{scores.spearman_t[t]:.6g}", f"{scores.pearson_t[t]:.6g}",
                          f"{scores.r2_t[t]:.6g}", f"{scores.mse_t[t]:.6g}", f"{actual[:, t].mean():.6g}",
                          f"{actual[:, t].std():.6g}", f"{pred[:, t].std():.6g}", int(nnz[t])])
    return path


# -- the evaluate command --------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    datamodels: str = field(default="", metadata={
        "help": "datamodels.pt written by regress (or its directory); with scores=: its held-out models are used"})
    store: str = field(default="", metadata={"help": "store of the models (default: the one recorded in datamodels.pt)"})
    heldout_store: str = field(default="", metadata={
        "help": "a second store whose completed models are the held-out set (default: the store's models the regression did not use)"})
    x_name: str = field(default="", metadata={"help": "mask key in the store (default: from datamodels.pt)"})
    y_name: str = field(default="", metadata={"help": "output key in the store (default: from datamodels.pt)"})
    out: str = field(default="", metadata={"help": "directory for the CSV, plots and metrics.json (default: MLflow only)"})
    log_model: bool = field(default=True, metadata={"help": "log the datamodels as an MLflow pyfunc model"})
    figure: bool = field(default=True, metadata={"help": "draw the digits influence figure when the store is the digits example"})
    original_config: str = field(default="", metadata={
        "help": "for a datamodels.pt of the original tools: the regression config it was fitted with"})
    original_beton: str = field(default="", metadata={
        "help": "with original_config: the .beton it was fitted on, when not where the config says"})
    # another attribution method's scores, ground truth from a directory, intervals (evaluate_method)
    scores: str = field(default="", metadata={
        "help": "score matrix [training examples, targets] of any method: .npy, .pt, .safetensors, a TRAK save_dir"})
    method: str = field(default="", metadata={"help": "name of the method behind scores= (tag 'method'; default: the file's name)"})
    scores_format: str = field(default="auto", metadata={"help": "auto | npy | pt | safetensors | trak"})
    key: str = field(default="", metadata={"help": "the array's key in a dict-like scores file (default: all_modules or the only one)"})
    experiment: str = field(default="", metadata={"help": "TRAK experiment name (default: the only finalized one)"})
    transpose: bool = field(default=False, metadata={"help": "scores are [targets, training examples] (kronfluence)"})
    sign: float = field(default=1.0, metadata={"help": "-1 for scores of a loss (positive: the example raises the loss)"})
    scale: bool = field(default=False, metadata={
        "help": "scores are in the output's units: report R^2 and MSE after the best per-target offset"})
    ground_truth: str = field(default="", metadata={"help": "held-out models from a directory written by export_lds (or the tools)"})
    format: str = field(default="auto", metadata={"help": "layout of ground_truth: auto | npz | trak | kronfluence | dattri"})
    bootstrap: int = field(default=300, metadata={"help": "bootstrap replicates for the LDS's 95% interval (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})


def _run_name(dm: Datamodels) -> str:
    """``evaluate-fista-k50-n1100-3fa2c1`` after the regression's run name (``run_names``), else
    after the results directory."""
    config = dm.meta.get("config") or {}
    solver = config.get("cfg") or {}
    if "method" in solver and "k" in solver:
        from datamodels_ml.tracking.run_names import fit_name

        return f"evaluate-{fit_name(config)}"
    return f"evaluate-{dm.path.parent.name if dm.path else 'datamodels'}"


def run_evaluation(cfg: EvaluateConfig, *, quiet: bool = False) -> EvaluationResult:
    """Score the datamodels on the held-out models, write/log the artifacts; the core of ``evaluate``."""
    from datamodels_ml.evaluation.bootstrap import interval_metrics, interval_report
    from datamodels_ml.evaluation.evaluate_method import run_method
    from datamodels_ml.tracking import runs as tracking

    if cfg.scores:  # another attribution method (evaluate_method)
        return run_method(cfg, quiet=quiet)
    if not cfg.datamodels:
        raise UserError("nothing to evaluate: give datamodels=PATH, or scores=FILE for another attribution method")
    if cfg.out:
        check_out(cfg.out)
    start = time.perf_counter()
    dm = Datamodels.load(cfg.datamodels, original_config=cfg.original_config or None,
                         original_beton=cfg.original_beton or None)
    source = str(dm.path)
    store = cfg.store or dm.store or ""
    if cfg.ground_truth:
        check_targets(dm, source)
        held = heldout_from_ground_truth(cfg.ground_truth, cfg.format, n_train=dm.n_features,
                                         target_start=dm.target_start, n_targets=dm.n_targets, source=source)
    else:
        if not store and not cfg.heldout_store:
            raise UserError(f"{source} records no store: give store=DIR")
        if not cfg.store and store and not os.path.isdir(store) and not cfg.heldout_store:
            raise UserError(f"the store recorded in {source} does not exist: {store}; give store=DIR")
        held = load_heldout(dm, store=store, heldout_store=cfg.heldout_store, x_name=cfg.x_name, y_name=cfg.y_name,
                            source=source)
    pred = dm.predict(held.masks)
    scores = score(pred, held.actual)
    if not quiet:
        print(format_scores(scores))
    interval = interval_report(pred, held.actual, cfg, quiet=quiet)

    params = {"datamodels": source, "store": store, "heldout_store": cfg.heldout_store,
              "ground_truth": cfg.ground_truth, "x_name": held.x_name,
              "y_name": held.y_name, "target_start": dm.target_start, "target_end": dm.target_end,
              "n_features": dm.n_features}
    files: dict[str, str] = {}
    model_uri = None
    tags = {"method": "datamodels", "datamodels": source, "heldout_models": scores.n_models,
            "targets": f"{dm.target_start}:{dm.target_end}"}
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.run("evaluate", name=_run_name(dm), params=params, tags=tags) as active:
        out = Path(cfg.out) if cfg.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = write_and_log(out, {**scores.metrics(), **interval_metrics(interval)}, params, held, pred, scores,
                              lambda path: write_per_target_csv(path, scores, dm, pred, held.actual))
        if cfg.figure and not cfg.ground_truth:
            import matplotlib.pyplot as plt

            from datamodels_ml.digits import is_digits
            from datamodels_ml.figures import influence_figure

            st = open_store(held.store, "store")
            if is_digits(st, held.x_name, held.y_name):
                fig = influence_figure(dm, scores.spearman_t)
                fig.savefig(out / "digits_influence.png", dpi=110)
                files["digits_influence"] = str(out / "digits_influence.png")
                tracking.log_figure(fig, "evaluate/digits_influence.png")
                plt.close(fig)
        if cfg.log_model:
            from datamodels_ml.pyfunc import log_datamodels_model

            model_file = source
            if dm.meta.get("origin") == "original":  # served with the standardization recovered here
                model_file = str(Path(tmp) / "datamodels.pt")
                dm.save(model_file)
            model_uri = log_datamodels_model(model_file, loaded=dm)
        run_id = active.info.run_id
    return finished(scores, held, files, run_id, model_uri, start, interval, out=cfg.out, quiet=quiet)


def evaluate(cfg: EvaluateConfig) -> int:
    """Score datamodels (or any method's scores=FILE) on held-out models: LDS with its interval, Pearson, R², in MLflow."""
    run_evaluation(cfg)
    return 0


__all__ = ["EvaluateConfig", "evaluate", "run_evaluation"]

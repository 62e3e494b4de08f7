"""Scoring datamodels on held-out models: LDS, correlations, R², MSE (the model-budget curve is ``budget``).

The held-out models are models the regression never saw: every completed model of a second store
(``heldout_store``), or else the completed models of the datamodels' own store outside the
regression's ``train_indices`` and ``val_indices``. Their masks go through the datamodels; the
predictions are compared, target by target, with the outputs those models actually produced.

The metrics themselves (LDS and the rest, with their conventions) are in ``metrics``.
"""

import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError
from datamodels_ml.metrics import (Scores, lds, mse, pearson, pearson_per_target, r2, r2_per_target, score,  # noqa: F401
                                   spearman_per_target)
from datamodels_ml.provenance import check_store

MIN_HELDOUT = 3


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """The held-out models' masks and actual outputs (the fitted slice of y), read from a store."""

    store: str
    indices: np.ndarray
    masks: np.ndarray
    actual: np.ndarray
    x_name: str
    y_name: str
    y_shape: tuple[int, ...]


def _open_store(path: str, what: str):
    from datamodels_ml.store import Store

    if not path:
        raise UserError(f"no {what}: give store=DIR")
    if not os.path.isdir(path):
        raise UserError(f"{what} not found: {path}")
    return Store(path, writable=False)


def _check_arrays(store, dm: Datamodels, x_name: str, y_name: str, source: str):
    x = store.array(x_name)
    y = store.array(y_name)
    n_x = int(np.prod(x.shape[1:], dtype=np.int64))
    if x.ndim != 2 or n_x != dm.n_features:
        raise UserError(f"{source} has {dm.n_features} features but '{x_name}' in the store at {store.path} "
                        f"has shape {list(x.shape[1:])} per model; evaluate the datamodels on the store they were fitted on")
    n_y = int(np.prod(y.shape[1:], dtype=np.int64))
    if dm.target_end > n_y or dm.target_end - dm.target_start != dm.n_targets:
        raise UserError(f"{source} covers targets {dm.target_start}..{dm.target_end - 1} but '{y_name}' in the store "
                        f"at {store.path} has {n_y} targets per model")
    return x, y


def _check_targets(dm: Datamodels, source: str) -> None:
    """The fitted slice of targets must be a real one: at least one target, starting at 0 or later."""
    if dm.n_targets == 0:
        raise UserError(f"{source} holds no targets ('weight' has shape [{dm.n_features}, 0]): nothing to evaluate")
    if dm.target_start < 0:
        raise UserError(f"{source} records target_start={dm.target_start}, below 0: the fitted targets must be "
                        f"a slice of the store's outputs starting at 0 or later")


def _warn_unchecked_masks(st, dm: Datamodels, source: str) -> None:
    """One warning line when ``dm`` carries no fingerprint, so ``check_store`` could not check the masks."""
    if not dm.meta.get("store_fingerprint"):
        print(f"warning: {source} records no store fingerprint (fitted before fingerprints were recorded, or by "
              f"the original tools): the store at {st.path} is checked by its sizes and completed models only, "
              f"not by its masks; make sure it is the store the datamodels were fitted on", file=sys.stderr)


def load_heldout(dm: Datamodels, *, store: str, heldout_store: str = "", x_name: str = "", y_name: str = "",
                 source: str = "the datamodels", exclude: np.ndarray | None = None, warn: bool = True) -> HeldOut:
    """Masks and actual outputs of the held-out models (see the module docstring for which models).

    ``exclude`` adds store indices to leave out besides the datamodels' own train/val indices
    (``budget`` passes the union over all its fits). ``warn=False``: the caller says ``warn_unchecked``
    itself, after its own refusals.
    """
    _check_targets(dm, source)
    x_name = x_name or dm.x_name or "masks"
    y_name = y_name or dm.y_name or "margins"
    if heldout_store:
        st = _open_store(heldout_store, "held-out store")
        _check_arrays(st, dm, x_name, y_name, source)
        idx = st.completed_indices()
        where = f"the held-out store {st.path} has no completed models"
    else:
        st = _open_store(store, "store")
        _check_arrays(st, dm, x_name, y_name, source)
        check_store(st, x_name, dm, source=source)
        used = np.concatenate([dm.indices("train_indices"), dm.indices("val_indices"),
                               np.asarray(exclude if exclude is not None else [], dtype=np.int64)])
        if dm.indices("train_indices").size == 0:
            raise UserError(f"{source} does not record which models the regression used (train_indices); "
                            "give heldout_store=DIR with models trained apart from the regression")
        idx = np.setdiff1d(st.completed_indices(), used)
        where = (f"all {st.completed_indices().size} completed models of {st.path} were used by the regression "
                 f"(train/val); train more models (train n=...) or give heldout_store=DIR")
    if idx.size == 0:
        raise UserError(f"no held-out models: {where}")
    if idx.size < MIN_HELDOUT:
        raise UserError(f"only {idx.size} held-out models; at least {MIN_HELDOUT} are needed for rank correlations")
    x = st.array(x_name)
    y = st.array(y_name)
    actual = np.asarray(y[idx], dtype=np.float64).reshape(idx.size, -1)[:, dm.target_start: dm.target_end]
    finite = np.isfinite(actual).all(axis=1)
    if not finite.all():  # as write_dataset does: a model whose outputs hold NaN/inf cannot be scored
        print(f"note: left out {int((~finite).sum())} held-out models whose '{y_name}' holds NaN or inf")
        idx, actual = idx[finite], actual[finite]
        if idx.size < MIN_HELDOUT:
            raise UserError(f"only {idx.size} held-out models with finite outputs; at least {MIN_HELDOUT} are needed")
    masks = np.asarray(x[idx])
    if not heldout_store and warn:  # said once every refusal is past, so a refused command prints one line
        _warn_unchecked_masks(st, dm, source)
    return HeldOut(str(st.path), idx, masks, actual, x_name, y_name, tuple(y.shape[1:]))


# -- artifacts -------------------------------------------------------------------------------------
def write_per_target_csv(path: Path, scores: Scores, dm: Datamodels, pred: np.ndarray, actual: np.ndarray) -> Path:
    """One row per target: absolute index, the four metrics, spreads and the datamodel's non-zeros."""
    w, _ = dm.weights_raw_scale()
    nnz = (w != 0).sum(axis=0)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["target", "spearman", "pearson", "r2", "mse", "actual_mean", "actual_std", "pred_std", "nnz"])
        for t in range(scores.n_targets):
            out.writerow([dm.target_start + t, f"{scores.spearman_t[t]:.6g}", f"{scores.pearson_t[t]:.6g}",
                          f"{scores.r2_t[t]:.6g}", f"{scores.mse_t[t]:.6g}", f"{actual[:, t].mean():.6g}",
                          f"{actual[:, t].std():.6g}", f"{pred[:, t].std():.6g}", int(nnz[t])])
    return path


def scatter_figure(pred: np.ndarray, actual: np.ndarray, scores: Scores, *, max_points: int = 20000, seed: int = 0):
    """Predicted vs actual (all targets pooled, subsampled), the median target, and the Spearman histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    flat_p, flat_a = pred.reshape(-1), actual.reshape(-1)
    if flat_p.size > max_points:
        pick = np.random.default_rng(seed).choice(flat_p.size, max_points, replace=False)
        flat_p, flat_a = flat_p[pick], flat_a[pick]
    ax = axes[0]
    ax.scatter(flat_a, flat_p, s=3, alpha=0.25, linewidths=0)
    lo, hi = float(min(flat_a.min(), flat_p.min())), float(max(flat_a.max(), flat_p.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
    ax.set(xlabel="actual output", ylabel="predicted output",
           title=f"all targets pooled ({scores.n_models} held-out models)")
    finite = np.flatnonzero(np.isfinite(scores.spearman_t))
    ax = axes[1]
    if finite.size:
        order = finite[np.argsort(scores.spearman_t[finite])]
        t = int(order[order.size // 2])
        ax.scatter(actual[:, t], pred[:, t], s=8, alpha=0.6)
        ax.set(xlabel="actual output", ylabel="predicted output",
               title=f"median target (slice index {t}): Spearman {scores.spearman_t[t]:.3f}")
        axes[2].hist(scores.spearman_t[finite], bins=40, color="tab:green")
    axes[2].axvline(scores.lds, color="black", ls="--", lw=1)
    axes[2].set(xlabel="Spearman correlation per target", ylabel="targets", title=f"LDS = {scores.lds:.3f}")
    fig.tight_layout()
    return fig


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


@dataclass
class EvaluationResult:
    """What ``run_evaluation`` found; ``files`` are the artifacts written (name -> path)."""

    scores: Scores
    heldout: HeldOut
    files: dict[str, str]
    run_id: str | None
    model_uri: str | None
    seconds: float
    interval: Any = None  # bootstrap.Interval of the LDS, or None


def format_scores(s: Scores) -> str:
    lines = [f"held-out models: {s.n_models}   targets: {s.n_targets}",
             f"LDS (mean Spearman): {s.lds:.4f}",
             f"mean Pearson:        {s.pearson:.4f}",
             f"mean R^2:            {s.r2:.4f}",
             f"MSE:                 {s.mse:.6g}"]
    if s.n_constant:
        lines.append(f"({s.n_constant} targets constant over the held-out models: left out of the means)")
    if s.n_constant_pred:
        lines.append(f"({s.n_constant_pred} targets with a constant prediction: correlation counted as 0)")
    return "\n".join(lines)


EVALUATE_FILES = ("metrics.json", "per_target.csv", "scatter.png", "digits_influence.png")


def _check_out(out: str) -> None:
    """``out`` may gain our files; refuse to overwrite files of those names that an evaluation did not write."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"out {path} exists and is not a directory")
    clashes = [name for name in EVALUATE_FILES if (path / name).exists()]
    if not clashes:
        return
    try:
        ours = "lds" in json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise UserError(f"out {path} holds {clashes[0]}, which evaluate did not write (no metrics.json of an "
                        "evaluation there): choose another out directory")


def _run_name(dm: Datamodels) -> str:
    """``evaluate-fista-k50`` after the regression's settings, else after the results directory."""
    solver = (dm.meta.get("config") or {}).get("cfg") or {}
    if "method" in solver and "k" in solver:
        return f"evaluate-{solver['method']}-k{solver['k']}"
    return f"evaluate-{dm.path.parent.name if dm.path else 'datamodels'}"


def run_evaluation(cfg: EvaluateConfig, *, quiet: bool = False) -> EvaluationResult:
    """Score the datamodels on the held-out models, write/log the artifacts; the core of ``evaluate``."""
    from datamodels_ml import tracking
    from datamodels_ml.evaluate_method import heldout_from_ground_truth, interval_metrics, interval_report, run_method

    if cfg.scores:  # another attribution method (evaluate_method)
        return run_method(cfg, quiet=quiet)
    if not cfg.datamodels:
        raise UserError("nothing to evaluate: give datamodels=PATH, or scores=FILE for another attribution method")
    if cfg.out:
        _check_out(cfg.out)
    start = time.perf_counter()
    dm = Datamodels.load(cfg.datamodels, original_config=cfg.original_config or None,
                         original_beton=cfg.original_beton or None)
    source = str(dm.path)
    store = cfg.store or dm.store or ""
    if cfg.ground_truth:
        _check_targets(dm, source)
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
        tracking.log_metrics({**scores.metrics(), **interval_metrics(interval)})
        metrics_doc = {**scores.metrics(), **interval_metrics(interval), **params, "heldout_indices": [int(i) for i in held.indices]}
        (out / "metrics.json").write_text(json.dumps(metrics_doc, indent=1) + "\n")
        files["metrics"] = str(out / "metrics.json")
        files["per_target"] = str(write_per_target_csv(out / "per_target.csv", scores, dm, pred, held.actual))
        for name in ("metrics", "per_target"):
            tracking.log_artifact(files[name], "evaluate")
        import matplotlib.pyplot as plt

        fig = scatter_figure(pred, held.actual, scores)
        fig.savefig(out / "scatter.png", dpi=110)
        files["scatter"] = str(out / "scatter.png")
        tracking.log_figure(fig, "evaluate/scatter.png")
        plt.close(fig)
        if cfg.figure and not cfg.ground_truth:
            from datamodels_ml.examples import digits_figure

            st = _open_store(held.store, "store")
            if digits_figure.is_digits(st, held.x_name, held.y_name):
                fig = digits_figure.influence_figure(dm, scores.spearman_t)
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
    seconds = time.perf_counter() - start
    if not quiet:
        if cfg.out:
            print(f"artifacts: {', '.join(sorted(files.values()))}")
        print(f"MLflow run {run_id} ({seconds:.1f} s)")
    if not cfg.out:
        files = {}
    return EvaluationResult(scores, held, files, run_id, model_uri, seconds, interval)


def evaluate(cfg: EvaluateConfig) -> int:
    """Score datamodels (or any method's scores=FILE) on held-out models: LDS with its interval, Pearson, R², in MLflow."""
    run_evaluation(cfg)
    return 0


__all__ = ["lds", "pearson", "r2", "mse", "spearman_per_target", "pearson_per_target", "r2_per_target", "score",
           "Scores", "EvaluateConfig", "evaluate", "run_evaluation", "load_heldout"]

"""The model-budget curve: the regression refit on growing numbers of models, each fit scored on the
same held-out models (``evaluate``), so a user sees whether training more models would pay.

Each point reports what it really consumes: the models it uses (train and validation models; the
refit reuses the same ones) and the compute they cost, the sum of each model's seconds in its slot
as ``train`` recorded it (the ``duration`` metric of its MLflow child run: GPU-seconds on GPU slots,
CPU-slot seconds otherwise, which are core-seconds for one-thread models such as the digits
example). The store keeps no times, so models trained with another tracking store, or with tracking
failures, leave the compute unknown (NaN), never guessed.

Every point's LDS comes with its bootstrap 95% interval (``bootstrap``: held-out models and targets
resampled, the same replicates for every point), drawn as a band; the slope of the LDS against
log2(models used), with its interval from those replicates, says in one line whether more models pay.
"""

import csv
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.evaluation import bootstrap
from datamodels_ml.config import to_dotlist
from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.heldout import load_heldout
from datamodels_ml.evaluation.metrics import score


@dataclass
class BudgetConfig:
    reg_config: str = field(default="configs/reg.yaml", metadata={"help": "regression config (YAML) to start from"})
    reg: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "overrides of the regression config, e.g. reg.data.data_path=... reg.cfg.k=20"})
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0], metadata={
        "help": "fractions of data.num_train to fit on (each a separate regression)"})
    store: str = field(default="", metadata={"help": "store of the models (default: the one the regression records)"})
    heldout_store: str = field(default="", metadata={"help": "a second store with the held-out models (optional)"})
    x_name: str = field(default="", metadata={"help": "mask key (default: from the regression)"})
    y_name: str = field(default="", metadata={"help": "output key (default: from the regression)"})
    out: str = field(default="", metadata={"help": "directory for budget.csv and budget.png (default: MLflow only)"})
    progress: bool = field(default=False, metadata={"help": "show the regressions' progress bars"})
    bootstrap: int = field(default=300, metadata={"help": "bootstrap replicates for the LDS intervals and the slope (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})


def load_regress_config(path: str, overrides: dict[str, Any] | list[str]):
    """The regression's ``RegressConfig`` from its YAML plus overrides (nested dict or dot-list tokens)."""
    from datamodels_ml.regression.original_config import load_config

    tokens = to_dotlist(overrides) if isinstance(overrides, dict) else list(overrides)
    argv = ([f"config={path}"] if path else []) + tokens
    return load_config(argv, config_key="config")


def consumed(dm: Datamodels, durations: dict[int, float]) -> tuple[int, float]:
    """Models a fit uses (train and validation; the refit reuses them) and their summed slot seconds
    (NaN when a model's time is unknown)."""
    used = np.union1d(dm.indices("train_indices"), dm.indices("val_indices"))
    seconds = [durations.get(int(i)) for i in used]
    return int(used.size), (float(np.sum(seconds)) if None not in seconds else float("nan"))


def budget(cfg: BudgetConfig) -> int:
    """Fit the datamodels on growing numbers of models and score each on the same held-out models."""
    import dataclasses

    from datamodels_ml.tracking import run_history

    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.regression.regress import fit

    fractions = sorted(set(float(f) for f in cfg.fractions))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"fractions must be in (0, 1], got {list(cfg.fractions)}")
    base = load_regress_config(cfg.reg_config, cfg.reg)
    full = int(base.data.num_train)
    if full <= 0:
        raise UserError(f"data.num_train must be a positive number of models for a budget curve, got {full}")
    sizes = sorted(set(max(1, int(round(f * full))) for f in fractions))
    fits: list[tuple[int, Datamodels]] = []
    for n in sizes:
        sub = dataclasses.replace(base, data=dataclasses.replace(base.data, num_train=n))
        t0 = time.perf_counter()
        print(f"budget: fitting on {n} models ...", flush=True)
        fitted = Datamodels.from_dict(fit(sub, progress=cfg.progress, log=False), source=f"fit on {n} models")
        print(f"budget: fitted on {n} models in {time.perf_counter() - t0:.1f} s", flush=True)
        fits.append((n, fitted))
    used = np.unique(np.concatenate([np.concatenate([d.indices("train_indices"), d.indices("val_indices")])
                                     for _, d in fits]))
    first = fits[-1][1]
    store = cfg.store or first.store or ""
    durations, gpus = run_history.model_durations(store) if store else ({}, 0)
    unit = "GPU-seconds" if gpus else "core-seconds"
    rows: list[dict[str, Any]] = []
    held = None
    preds = []
    for n, dm in fits:
        held = load_heldout(dm, store=store, heldout_store=cfg.heldout_store, x_name=cfg.x_name,
                            y_name=cfg.y_name, source=f"the fit on {n} models", exclude=used)
        preds.append(dm.predict(held.masks))
        s = score(preds[-1], held.actual)
        n_used, compute = consumed(dm, durations)
        rows.append({"num_models": n, "models_used": n_used, "compute_seconds": compute, "lds": s.lds,
                     "pearson": s.pearson, "r2": s.r2, "mse": s.mse, "n_heldout": s.n_models, "n_targets": s.n_targets})
    slope = _intervals(rows, preds, held.actual, cfg)
    _print_table(rows, unit, int(held.indices.size))
    if slope:
        print(bootstrap.slope_line(*slope))
    missing = int(np.count_nonzero([int(i) not in durations for i in used]))
    if missing:
        print(f"note: no training time recorded for {missing} of the {used.size} models used (train runs on "
              f"{store} in this MLflow store hold none for them): their compute is unknown (nan)")

    import matplotlib.pyplot as plt

    params = {"reg_config": cfg.reg_config, "fractions": fractions, "store": store,
              "heldout_store": cfg.heldout_store, "n_heldout": int(held.indices.size), "compute_unit": unit}
    params.update({f"reg.{t.partition('=')[0]}": t.partition("=")[2] for t in to_dotlist(cfg.reg)})
    with tempfile.TemporaryDirectory() as tmp, tracking.run("budget", name=f"budget-{base.cfg.method}-n{sizes[0]}-{sizes[-1]}", params=params):
        out = Path(cfg.out) if cfg.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for r in rows:  # step: the models the point consumes (train + validation)
            keys = ("lds", "pearson", "r2", "mse", "num_models", "compute_seconds", "lds_low", "lds_high")
            tracking.log_metrics({k: r[k] for k in keys if k in r}, step=r["models_used"])
        if slope:
            tracking.log_metrics(dict(zip(("lds_slope_per_doubling", "lds_slope_low", "lds_slope_high"), slope)))
        with open(out / "budget.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        tracking.log_artifact(out / "budget.csv", "budget")
        from datamodels_ml.figures import budget_figure

        fig = budget_figure(rows, unit)
        fig.savefig(out / "budget.png", dpi=110)
        tracking.log_figure(fig, "budget/budget.png")
        plt.close(fig)
    if cfg.out:
        print(f"artifacts: {out / 'budget.csv'}, {out / 'budget.png'}")
    return 0


def _intervals(rows: list[dict[str, Any]], preds: list, actual, cfg: BudgetConfig):
    """Each point's LDS interval (added to ``rows``) and the slope against log2(models used), from the
    same bootstrap replicates of the held-out models and targets; None without replicates or with one point."""
    if cfg.bootstrap <= 0:
        return None
    ivs = bootstrap.lds_intervals(preds, actual, n_boot=int(cfg.bootstrap), seed=int(cfg.seed))
    for r, iv in zip(rows, ivs):
        r["lds_low"], r["lds_high"] = iv.low, iv.high
    if len({r["models_used"] for r in rows}) < 2:
        return None
    return bootstrap.slope_per_doubling([r["models_used"] for r in rows], [r["lds"] for r in rows], ivs)


def _print_table(rows: list[dict[str, Any]], unit: str, n_heldout: int) -> None:
    band = "lds_low" in rows[0]
    head = f" {'LDS 95% interval':>18}" if band else ""
    print(f"{'train':>7} {'used':>6} {unit:>13} {'LDS':>8}{head} {'Pearson':>8} {'R^2':>8} {'MSE':>10}   "
          f"({n_heldout} held-out models; used = train + validation models)")
    for r in rows:
        iv = " " + f"[{r['lds_low']:.4f}, {r['lds_high']:.4f}]".rjust(18) if band else ""
        print(f"{r['num_models']:>7} {r['models_used']:>6} {r['compute_seconds']:>13.1f} {r['lds']:>8.4f}{iv} "
              f"{r['pearson']:>8.4f} {r['r2']:>8.4f} {r['mse']:>10.4g}")


__all__ = ["BudgetConfig", "budget", "consumed", "load_regress_config"]

"""The ``regress`` stage: a config and a ``.beton`` in, ``datamodels.pt`` and the path metrics out.

It owns the regression config (a superset of the original ``regression_config.yaml``), its
validation, the random train/val split of the beton's rows, the FFCV batch sources handed to the
solver (``lasso``), the output directory (``datamodels.pt``, ``config.yaml``, ``path.png``,
``targets.csv``, ``manifest.json``, written under a temporary name and swapped in at the end) and
the MLflow record (one run; the path as metrics with ``step`` = λ index).

``fit(cfg)`` is the same fit without files or a run of its own, for callers such as the model-budget
curve; ``regress(cfg)`` is the command.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from datamodels_ml.config import MISSING
from datamodels_ml.errors import UserError

FORMAT_VERSION = 1
RESULTS_FILE = "datamodels.pt"
MANIFEST_FILE = "manifest.json"
# Keys that do not change the fitted result: left out of the fingerprint that decides reruns.
_NOT_FINGERPRINTED = ("cfg.force", "cfg.num_workers", "cfg.progress", "cfg.out_dir")


@dataclass
class DataConfig:
    data_path: str = field(default=MISSING, metadata={"help": "FFCV .beton written by write_dataset"})
    num_train: int = field(default=MISSING, metadata={"help": "models used to fit the datamodels"})
    num_val: int = field(default=MISSING, metadata={"help": "models used to pick λ per target"})
    seed: int = field(default=0, metadata={"help": "seed of the random train/val split"})
    target_start_ind: int = field(default=0, metadata={"help": "first target (column of y) to fit"})
    target_end_ind: int = field(default=-1, metadata={"help": "end of the target slice, exclusive (-1: all)"})


@dataclass
class SolverConfig:
    out_dir: str = field(default=MISSING, metadata={"help": "directory for datamodels.pt and the reports"})
    k: int = field(default=100, metadata={"help": "number of λ values along the path"})
    eps: float = field(default=1e-6, metadata={"help": "smallest λ as a fraction of λ_max, in (0, 1]"})
    batch_size: int = field(default=2000, metadata={"help": "rows per minibatch (saga) or per read (fista)"})
    lr: Optional[float] = field(default=None, metadata={"help": "saga step size (null: automatic)"})
    num_workers: int = field(default=0, metadata={"help": "FFCV loader threads (FFCV also sets torch's CPU threads to it; 0: all cores)"})
    use_bias: bool = field(default=True, metadata={"help": "fit an unpenalized intercept per target"})
    method: str = field(default="fista", metadata={"help": "solver: fista (Gram matrix, screened) or saga (streams the data)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "working precision: float32 or float64"})
    max_epochs: Optional[int] = field(default=None, metadata={"help": "cap per λ (saga epochs / fista iterations; null: solver default)"})
    min_lambdas: int = field(default=5, metadata={"help": "λ indices always fitted before a target may stop early"})
    refit: bool = field(default=True, metadata={"help": "refit each target at its selected λ on train+val"})
    force: bool = field(default=False, metadata={"help": "overwrite an existing out_dir"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class EarlyStoppingConfig:
    check_every: int = field(default=3, metadata={"help": "epochs between convergence checks"})
    eps: float = field(default=5e-11, metadata={"help": "convergence tolerance (relative, glmnet-style)"})


@dataclass
class RegressConfig:
    data: DataConfig = field(default_factory=DataConfig)
    cfg: SolverConfig = field(default_factory=SolverConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


# -- validation and the split --------------------------------------------------------------------
@dataclass
class Plan:
    """A validated config with everything derived from it: device, dtype, split, target slice."""

    cfg: RegressConfig
    info: Any  # dataset.BetonInfo
    manifest: dict | None
    device: str
    dtype: Any  # torch.dtype
    train_rows: np.ndarray
    val_rows: np.ndarray
    target_start: int
    target_end: int


def config_dict(cfg: RegressConfig) -> dict[str, Any]:
    """The merged config as a plain nested dict."""
    return dataclasses.asdict(cfg)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"cfg.device={name} but no CUDA device is available (use cfg.device=cpu or auto)")
        if name.startswith("cuda:"):
            index = name[5:]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise UserError(f"cfg.device={name}: there are {torch.cuda.device_count()} CUDA devices")
        return name
    raise UserError(f"cfg.device must be auto, cpu, cuda or cuda:N, got '{name}'")


def check(cfg: RegressConfig) -> None:
    """Validate the values that need no file (ranges, names)."""
    c, d, es = cfg.cfg, cfg.data, cfg.early_stopping
    if c.k < 1:
        raise UserError(f"cfg.k must be >= 1, got {c.k}")
    if not 0 < c.eps <= 1:
        raise UserError(f"cfg.eps must be in (0, 1], got {c.eps}")
    if c.batch_size < 1:
        raise UserError(f"cfg.batch_size must be >= 1, got {c.batch_size}")
    if c.lr is not None and not c.lr > 0:
        raise UserError(f"cfg.lr must be > 0 (or null for automatic), got {c.lr}")
    if c.method not in ("saga", "fista"):
        raise UserError(f"cfg.method must be saga or fista, got '{c.method}'")
    if c.dtype not in ("float32", "float64"):
        raise UserError(f"cfg.dtype must be float32 or float64, got '{c.dtype}'")
    if c.max_epochs is not None and c.max_epochs < 1:
        raise UserError(f"cfg.max_epochs must be >= 1 (or null), got {c.max_epochs}")
    if c.min_lambdas < 0:
        raise UserError(f"cfg.min_lambdas must be >= 0, got {c.min_lambdas}")
    if c.num_workers < 0:
        raise UserError(f"cfg.num_workers must be >= 0, got {c.num_workers}")
    if es.check_every < 1:
        raise UserError(f"early_stopping.check_every must be >= 1, got {es.check_every}")
    if not es.eps > 0:
        raise UserError(f"early_stopping.eps must be > 0, got {es.eps}")
    if d.num_train < 1:
        raise UserError(f"data.num_train must be >= 1, got {d.num_train}")
    if d.num_val < 1:
        raise UserError(f"data.num_val must be >= 1 (the validation models pick λ), got {d.num_val}")


def plan(cfg: RegressConfig) -> Plan:
    """Validate ``cfg`` against its dataset and draw the train/val split."""
    check(cfg)
    import torch

    from datamodels_ml.dataset import beton_info, read_manifest

    d = cfg.data
    info = beton_info(d.data_path)
    total = d.num_train + d.num_val
    if total > info.num_rows:
        raise UserError(f"data.num_train + data.num_val = {total} exceeds the {info.num_rows} models in {d.data_path}")
    start = d.target_start_ind
    end = info.n_targets if d.target_end_ind == -1 else d.target_end_ind
    if not 0 <= start < end <= info.n_targets:
        raise UserError(f"target range data.target_start_ind={d.target_start_ind}, data.target_end_ind="
                        f"{d.target_end_ind} is not inside the {info.n_targets} targets of {d.data_path}")
    order = np.random.default_rng(d.seed).permutation(info.num_rows)
    return Plan(cfg, info, read_manifest(d.data_path), _device(cfg.cfg.device),
                torch.float64 if cfg.cfg.dtype == "float64" else torch.float32,
                np.sort(order[:d.num_train]), np.sort(order[d.num_train:total]), start, end)


# -- the fit -------------------------------------------------------------------------------------
class _Progress:
    """The solver callback: a tqdm bar over epochs and, optionally, the path metrics in MLflow."""

    def __init__(self, k: int, n_targets: int, *, progress: bool, log: bool):
        from tqdm import tqdm

        self.k, self.n_targets, self.log = k, n_targets, log
        self.on_path = n_targets
        self.bar = tqdm(desc="regress", unit="epoch", disable=not progress, dynamic_ncols=True, file=sys.stderr)
        self.stage = "path"

    def __call__(self, event: str, info: dict) -> None:
        if event == "epoch":
            self.bar.update(1)
            lam = "refit" if info.get("lambda_index", 0) < 0 else f"{info['lambda_index'] + 1}/{self.k}"
            self.bar.set_postfix_str(f"λ {lam}, targets on path {self.on_path}/{self.n_targets}, "
                                     f"solving {info['n_active']}", refresh=False)
        elif event == "lambda":
            self.on_path = int(round(info["active"] * self.n_targets))
            if self.log:
                from datamodels_ml import tracking

                tracking.log_metrics({"val_mse": info["val_mse"], "train_mse": info["train_mse"],
                                      "nnz": info["nnz"], "lam_ratio": info["lam_ratio"],
                                      "active_fraction": info["active"]}, step=int(info["index"]))
        elif event == "refit":
            self.stage = "refit"

    def close(self) -> None:
        self.bar.close()


def _val_variance(source) -> np.ndarray:
    """Per-target variance of the validation outputs (the denominator of R²)."""
    import torch

    n, s, ss = 0, None, None
    for _, yb, _ in source:
        y = yb.to(torch.float64)
        s = y.sum(0) if s is None else s + y.sum(0)
        ss = (y * y).sum(0) if ss is None else ss + (y * y).sum(0)
        n += y.shape[0]
    mean = s / n
    return (ss / n - mean * mean).clamp_min(0).numpy()


def fit_plan(p: Plan, *, progress: bool = True, log: bool = True) -> dict[str, Any]:
    """Run the solver for a validated plan and return the datamodels dict (see ``fit``)."""
    import torch

    from datamodels_ml import tracking
    from datamodels_ml.dataset import BetonBatches
    from datamodels_ml.solvers import lasso_path

    cfg, c = p.cfg, p.cfg.cfg
    common = dict(batch_size=c.batch_size, num_workers=c.num_workers or (os.cpu_count() or 1), target_start=p.target_start,
                  target_end=p.target_end, info=p.info)
    train = BetonBatches(p.cfg.data.data_path, p.train_rows, shuffle=True, seed=p.cfg.data.seed, **common)
    val = BetonBatches(p.cfg.data.data_path, p.val_rows, shuffle=False, **common)
    log = log and tracking.active_run_id() is not None
    bar = _Progress(c.k, p.target_end - p.target_start, progress=progress, log=log)
    start = time.perf_counter()
    try:
        path = lasso_path(train, val, k=c.k, eps=c.eps, method=c.method, fit_intercept=c.use_bias,
                          batch_size=c.batch_size, lr=c.lr, max_epochs=c.max_epochs,
                          check_every=cfg.early_stopping.check_every, tol=cfg.early_stopping.eps,
                          min_lambdas=c.min_lambdas, refit=c.refit, device=p.device, dtype=p.dtype,
                          callback=bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    val_var = _val_variance(val)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    val_mse = cpu(path.val_mse).to(torch.float64)
    best_index = cpu(path.best_index).long()
    best_val = val_mse.gather(0, best_index[None]).squeeze(0).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(val_var > 0, 1.0 - best_val / val_var, np.nan)
    lam_path = cpu(path.lam_path).to(torch.float64)
    m = p.manifest or {}
    return {
        "format_version": FORMAT_VERSION,
        "weight": cpu(path.weight).float().contiguous(),
        "bias": cpu(path.bias).float(),
        "lam": cpu(path.lam).float(),
        "mean": cpu(path.mean).float(),
        "std": cpu(path.std).float(),
        "lam_path": lam_path,
        "lam_ratio": (lam_path / lam_path[0].clamp_min(1e-300)),
        "val_mse": val_mse,
        "train_mse": cpu(path.train_mse).to(torch.float64),
        "nnz": cpu(path.nnz).to(torch.float64),
        "best_index": best_index,
        "active": cpu(path.active).to(torch.float64),
        "val_r2": torch.from_numpy(r2),
        "best_val_mse": torch.from_numpy(best_val),
        "train_indices": torch.from_numpy(np.sort(p.info.idx[p.train_rows])).long(),
        "val_indices": torch.from_numpy(np.sort(p.info.idx[p.val_rows])).long(),
        "target_start": int(p.target_start),
        "target_end": int(p.target_end),
        "x_name": m.get("x_name"),
        "y_name": m.get("y_name"),
        "store": m.get("store"),
        "data_path": str(p.cfg.data.data_path),
        "config": config_dict(cfg),
        "epochs": int(path.epochs),
        "fit_seconds": float(seconds),
        "device": p.device,
    }


def fit(cfg: RegressConfig, *, progress: bool = True, log: bool = True) -> dict[str, Any]:
    """Fit the datamodels of ``cfg`` and return them as a dict (no files written).

    Keys: ``weight`` [p, T] float32 on the standardized scale, ``bias``/``lam`` [T], ``mean``/``std``
    [p] (predict = ((x - mean) / std) @ weight + bias), ``lam_path``/``val_mse``/``train_mse``/``nnz``
    [k, T], ``best_index`` [T], ``train_indices``/``val_indices`` (store indices), ``target_start``/
    ``target_end``, ``x_name``/``y_name``/``store`` (from the beton's manifest, else None),
    ``data_path``, ``config``, ``format_version``; plus ``val_r2``, ``best_val_mse``, ``lam_ratio``,
    ``active``, ``epochs``, ``fit_seconds``. With ``log`` and an active MLflow run, the path is logged
    to it as metrics with step = λ index.
    """
    return fit_plan(plan(cfg), progress=progress, log=log)


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


# -- outputs -------------------------------------------------------------------------------------
def _beton_fingerprint(path: str, manifest: dict | None) -> dict[str, Any]:
    st = os.stat(path)
    out = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if manifest:
        out.update({k: manifest.get(k) for k in ("store", "x_name", "y_name", "num_rows", "indices_hash")})
    return out


def fingerprint(cfg: RegressConfig) -> dict[str, Any]:
    """What decides the result of a regression: the config (less output-only keys) and the beton."""
    from datamodels_ml.config import to_flat_dict
    from datamodels_ml.dataset import read_manifest

    flat = {k: v for k, v in to_flat_dict(cfg).items() if k not in _NOT_FINGERPRINTED}
    data = cfg.data.data_path
    beton = _beton_fingerprint(data, read_manifest(data)) if os.path.isfile(data) else None
    return {"config": flat, "beton": beton}


def is_up_to_date(cfg: RegressConfig) -> bool:
    """True when ``cfg.out_dir`` already holds a regression of the same data with the same config."""
    out = Path(cfg.cfg.out_dir)
    try:
        recorded = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (out / RESULTS_FILE).is_file() and recorded.get("inputs") == json.loads(json.dumps(fingerprint(cfg)))


def _check_out_dir(cfg: RegressConfig) -> Path:
    out = Path(cfg.cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"cfg.out_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.cfg.force:
        raise UserError(f"cfg.out_dir {out} already exists; use cfg.force=true to overwrite it")
    return out


def _targets_csv(result: dict[str, Any]) -> str:
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


def write_results(result: dict[str, Any], cfg: RegressConfig, out: Path, *, run_id: str | None = None) -> None:
    """Write every output into a temporary directory next to ``out``, then swap it in."""
    import torch
    from omegaconf import OmegaConf

    from datamodels_ml.plots import path_figure, save_figure

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(result, tmp / RESULTS_FILE)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        (tmp / "targets.csv").write_text(_targets_csv(result))
        with warnings.catch_warnings():  # λ indices where every target had stopped are all-NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            curves = [np.nanmean(result[key].numpy(), axis=1) if result[key].numel() else np.array([])
                      for key in ("val_mse", "train_mse", "nnz")]
        lam_ratio = result["lam_ratio"].numpy().mean(axis=1)
        fig = path_figure(lam_ratio, *curves, title=f"{result['y_name'] or 'targets'} "
                          f"[{result['target_start']}:{result['target_end']}], {cfg.cfg.method}")
        save_figure(fig, str(tmp / "path.png"))
        manifest = {"format_version": FORMAT_VERSION, "inputs": fingerprint(cfg), "config": config_dict(cfg),
                    "summary": summary(result), "train_indices": result["train_indices"].tolist(),
                    "val_indices": result["val_indices"].tolist(), "mlflow_run_id": run_id,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def regress(cfg: RegressConfig) -> int:
    """Fit one lasso path per target on the beton and write datamodels.pt (+ MLflow run)."""
    from datamodels_ml import tracking
    from datamodels_ml.config import to_flat_dict

    out = _check_out_dir(cfg)
    p = plan(cfg)  # every check before MLflow starts: a refused command leaves no run behind
    print(f"regress: {cfg.data.num_train} train + {cfg.data.num_val} val models of {p.info.num_rows}, "
          f"{p.info.n_features} features, targets [{p.target_start}:{p.target_end}], {cfg.cfg.method} on "
          f"{p.device}, k={cfg.cfg.k}", file=sys.stderr)
    with tracking.run("regress") as active:
        tracking.log_params(to_flat_dict(cfg))
        result = fit_plan(p, progress=cfg.cfg.progress, log=True)
        write_results(result, cfg, out, run_id=active.info.run_id if active else None)
        stats = summary(result)
        tracking.log_metrics(stats)
        for name in ("config.yaml", RESULTS_FILE, "path.png", "targets.csv", MANIFEST_FILE):
            tracking.log_artifact(out / name)
    print(f"wrote {out / RESULTS_FILE}: {p.target_end - p.target_start} targets, mean best val MSE "
          f"{stats['best_val_mse']:.4g}, mean val R² {stats['mean_val_r2']:.3f}, mean non-zeros "
          f"{stats['mean_nnz_at_best']:.1f}, {stats['fit_seconds']:.1f} s")
    return 0

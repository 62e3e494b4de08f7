"""The ``regress`` stage: a config and a ``.beton`` in, ``datamodels.pt`` and the path metrics out.

It owns the validation of a config (``regression.config``; files written for the original are read
by ``regression.original_config``) against its dataset, the train/val split of the beton's rows (random, or
ordered as the original's; models whose targets hold NaN or inf are left out, with a count), the
loop over target blocks (each fitted by ``regression.block_fit``; sized by ``regression.memory``,
saved and resumed by ``regression.target_blocks``, spread over ``gpus`` devices) and the MLflow record (one run; the
path as metrics with ``step`` = 100·log10(λ_max/λ), see ``path_step``). The output directory is
``regression.output_dir``; ``regress`` holds its lock (``lock.out_dir_lock``) from its blocks to its results.

``fit(cfg)`` is the same fit without files or a run of its own, for callers such as the model-budget
curve; ``regress(cfg)`` is the command.
"""

import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from datamodels_ml.errors import UserError
from datamodels_ml.kernel_cache import use_kernels
from datamodels_ml.progress import PathBar
from datamodels_ml.regression import block_fit
from datamodels_ml.regression.original_config import notes
from datamodels_ml.provenance import fingerprint_from_beton
from datamodels_ml.regression.config import RegressConfig, check, regress_devices
from datamodels_ml.datamodel import FORMAT_VERSION
from datamodels_ml.regression.output_dir import (MANIFEST_FILE, RESULTS_FILE, config_dict, rerun_key,
                                                path_curves, summary, write_results)


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
    devices: tuple[str, ...] = ()  # where the target blocks run (device, or gpus CUDA devices)
    memory: Any = None  # memory.MemoryPlan


def plan(cfg: RegressConfig) -> Plan:
    """Validate ``cfg`` against its dataset and draw the train/val split."""
    check(cfg)
    import torch

    from datamodels_ml.dataset.reader import beton_info, read_manifest
    from datamodels_ml.regression.memory import plan_memory

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
    if d.split == "ordered":  # the original's: rows 0..num_train-1 train, the next num_val validate
        order = np.arange(info.num_rows)
    else:
        order = np.random.default_rng(d.seed).permutation(info.num_rows)
    order = order[_finite_targets(d.data_path, start, end, total)[order]]
    devices = regress_devices(cfg)
    c = cfg.cfg
    memory = plan_memory(n_features=info.n_features, n_targets=end - start, n_train=d.num_train, n_val=d.num_val,
                         batch_size=block_fit.read_rows(c, info), method=c.method, dtype=c.dtype, devices=list(devices),
                         binary=np.dtype(info.x_dtype) in (np.dtype(bool), np.dtype(np.uint8)),
                         target_block=c.target_block)
    return Plan(cfg, info, read_manifest(d.data_path), devices[0],
                torch.float64 if cfg.cfg.dtype == "float64" else torch.float32,
                np.sort(order[:d.num_train]), np.sort(order[d.num_train:total]), start, end, devices, memory)


def _finite_targets(path: str, start: int, end: int, needed: int) -> np.ndarray:
    """The rows whose targets ``[start:end)`` are finite; the others are left out with a warning, as
    ``write_dataset`` leaves them out (a ``.beton`` written by another tool may hold them)."""
    from datamodels_ml.dataset.reader import finite_rows

    finite = finite_rows(path, start, end)
    kept = int(finite.sum())
    if kept < finite.size:
        print(f"warning: left out {finite.size - kept} of {finite.size} models of {path} whose targets "
              f"[{start}:{end}] hold NaN or inf", file=sys.stderr)
        if needed > kept:
            raise UserError(f"data.num_train + data.num_val = {needed} exceeds the {kept} models with finite targets "
                            f"[{start}:{end}] in {path}")
    return finite


# -- the fit -------------------------------------------------------------------------------------
def _fit_blocks(p: Plan, bar: PathBar, store: Any = None, started: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Every target block of the plan (resuming from ``store``, a ``regression.target_blocks.BlockStore``), merged.
    ``started``: waits for the first device's feature statistics (computed by ``regression.overlap.start``)."""
    import dataclasses

    from datamodels_ml.regression import target_blocks as blocks

    c = p.cfg.cfg
    saved = store.usable(p.target_start, p.target_end, p.info.n_features,
                         c.k + (c.grid == "fast_l1")) if store is not None else {}
    reused, todo = blocks.remaining(p.target_start, p.target_end, p.memory.target_block, list(saved))
    if reused:
        print(f"regress: resuming: {sum(e - s for s, e in reused)} targets in {len(reused)} saved block(s), "
              f"{len(todo)} block(s) to fit", file=sys.stderr)
    # with a store, a finished block waits on disk, not in memory, until the merge: the blocks'
    # weights (p floats per target) would otherwise add to every later block's peak
    results = {b: None if store is not None else saved[b] for b in reused}
    del saved
    stats: dict[str, Any] = {}  # per device; each device has one thread (blocks.run)

    def fit_one(s: int, e: int, device: str) -> dict[str, Any]:
        if device not in stats:
            first = started is not None and device == p.devices[0]
            stats[device] = started() if first else block_fit.mask_statistics(p, device)
        return block_fit.fit_block(dataclasses.replace(p, device=device, target_start=s, target_end=e), bar, stats[device])

    def done(s: int, e: int, block: dict[str, Any]) -> None:
        if store is not None:
            store.save(s, e, block)
        results[(s, e)] = None if store is not None else block

    blocks.run(todo, list(p.devices), fit_one, done)
    stats.clear()
    return blocks.merge([results[b] if results[b] is not None else store.load(*b) for b in sorted(results)])


def _result(p: Plan, merged: dict[str, Any]) -> dict[str, Any]:
    """The datamodels dict (see ``fit``) from the merged blocks."""
    import torch

    val_var = merged["val_var"].numpy()
    val_mse, best_index, lam_path = merged["val_mse"], merged["best_index"], merged["lam_path"]
    val_mse = merged.get("relax_val_mse", val_mse)  # the selected (λ, φ)'s: the lasso's without cfg.relax
    best_val = val_mse.gather(0, best_index[None]).squeeze(0).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(val_var > 0, 1.0 - best_val / val_var, np.nan)
    m = p.manifest or {}
    return {
        "format_version": FORMAT_VERSION,
        **{key: merged[key] for key in ("weight", "bias", "lam", "mean", "std", "lam_path")},
        "phi": merged.get("phi", torch.zeros_like(merged["lam"])),
        "relax_val_mse": val_mse,
        "lam_ratio": (lam_path / lam_path[0].clamp_min(1e-300)),
        **{key: merged[key] for key in ("val_mse", "train_mse", "nnz", "best_index", "active")},
        "val_r2": torch.from_numpy(r2),
        "best_val_mse": torch.from_numpy(best_val),
        "train_indices": torch.from_numpy(np.sort(p.info.idx[p.train_rows])).long(),
        "val_indices": torch.from_numpy(np.sort(p.info.idx[p.val_rows])).long(),
        "target_start": int(p.target_start),
        "target_end": int(p.target_end),
        "x_name": m.get("x_name"),
        "y_name": m.get("y_name"),
        "store": m.get("store"),
        "store_fingerprint": fingerprint_from_beton(p.cfg.data.data_path, p.train_rows, p.info.idx[p.train_rows]),
        "data_path": str(p.cfg.data.data_path),
        "config": config_dict(p.cfg),
        "epochs": int(merged["epochs"]),
        "fit_seconds": float(merged["seconds"]),
        "device": p.device if len(p.devices) == 1 else ",".join(p.devices),
    }


def path_step(lam_ratio: float) -> int:
    """The MLflow step of a point of the path: ``round(100 * log10(λ_max / λ))``, 100 steps per decade.

    Equal steps mean equal λ/λ_max in every run, whatever its k or eps, so the UI overlays the
    paths of two regressions correctly (with more than 100 λ per decade two may share a step).
    """
    return int(round(-100.0 * np.log10(lam_ratio)))


def _log_path(result: dict[str, Any]) -> None:
    """The path as MLflow metrics (step: ``path_step``) and as a table (``path_table.json``): means
    over all targets, a target past its early stop counting with its selected values
    (``output_dir.path_curves``); ``active_fraction`` is the share still on the path."""
    from datamodels_ml.tracking import runs as tracking

    lam_ratio, val, train, nnz = path_curves(result)
    active = result["active"].numpy()
    table: dict[str, list] = {k: [] for k in ("step", "lam_ratio", "val_mse", "train_mse", "nnz", "active_fraction")}
    rows = []
    for i in range(len(lam_ratio)):
        if np.isfinite(val[i]) and lam_ratio[i] > 0:  # λ = 0 (cfg.grid=fast_l1) has no place on the log scale
            row = {"val_mse": float(val[i]), "train_mse": float(train[i]), "nnz": float(nnz[i]),
                   "lam_ratio": float(lam_ratio[i]), "active_fraction": float(active[i])}
            step = path_step(lam_ratio[i])
            rows.append((step, row))
            for key, value in {"step": step, **row}.items():
                table[key].append(value)
    tracking.log_metric_steps(rows)
    tracking.log_table(table, "path_table.json")


def fit_plan(p: Plan, *, progress: bool = True, log: bool = True, store: Any = None,
             started: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run the solver for a validated plan, block by block, and return the datamodels dict (see
    ``fit``). ``started``: the feature statistics already under way (``regression.overlap.start``)."""
    from datamodels_ml.tracking import runs as tracking

    c = p.cfg.cfg
    bar = PathBar(c.k + (c.grid == "fast_l1"), p.target_end - p.target_start, p.memory.n_blocks, progress=progress,
                  unit="epoch" if c.method == "saga" else "iteration")
    try:
        result = _result(p, _fit_blocks(p, bar, store, started))
    finally:
        bar.close()
    if log and tracking.active_run_id() is not None:
        _log_path(result)
    return result


def fit(cfg: RegressConfig, *, progress: bool = True, log: bool = True) -> dict[str, Any]:
    """Fit the datamodels of ``cfg`` and return them as a dict (no files written).

    Keys: ``weight`` [p, T] float32 on the standardized scale, ``bias``/``lam`` [T], ``mean``/``std``
    [p] (predict = ((x - mean) / std) @ weight + bias), ``lam_path``/``val_mse``/``train_mse``/``nnz``
    [k, T], ``best_index`` [T], ``phi`` [T] (the relaxed lasso's blend, 0 without ``cfg.relax``) and ``relax_val_mse``
    [k, T] (the validation MSE of the best blend at each λ, the selection's; ``val_mse`` without), ``train_indices``/``val_indices`` (store indices), ``target_start``/
    ``target_end``, ``x_name``/``y_name``/``store`` (from the beton's manifest, else None),
    ``data_path``, ``config``, ``format_version``; plus ``val_r2``, ``best_val_mse``, ``lam_ratio``,
    ``active``, ``epochs``, ``fit_seconds``. With ``log`` and an active MLflow run, the path is logged
    to it as metrics with step = ``path_step(λ/λ_max)``.
    """
    p = plan(cfg)
    use_kernels(cfg.cfg.kernels, quiet=not progress)
    return fit_plan(p, progress=progress, log=log)


def regress(cfg: RegressConfig) -> int:
    """Fit one lasso path per target on the beton and write datamodels.pt (+ MLflow run)."""
    from datamodels_ml.store.lock import out_dir_lock
    from datamodels_ml.regression.output_dir import check_out_dir

    check(cfg)
    for line in notes(cfg):
        print(f"regress: {line}", file=sys.stderr)
    from datamodels_ml.regression.fit_reuse import reuse_finished_fit

    if reuse_finished_fit(cfg):  # out_dir holds this very fit (make demo's, say): nothing to refit
        return 0
    out = check_out_dir(cfg)
    p = plan(cfg)  # every check before MLflow starts: a refused command leaves no run behind
    print(f"regress: {cfg.data.num_train} train + {cfg.data.num_val} val models of {p.info.num_rows}, "
          f"{p.info.n_features} features, targets [{p.target_start}:{p.target_end}], {cfg.cfg.method} on "
          f"{', '.join(p.devices)}, k={cfg.cfg.k}", file=sys.stderr)
    print(p.memory.describe(), file=sys.stderr)
    kernels = use_kernels(cfg.cfg.kernels)
    with out_dir_lock(out, "regress"):  # one regression at a time in out (its blocks, its results)
        check_out_dir(cfg)  # again, now that it is ours: another regress may have written it meanwhile
        return _fit_and_write(cfg, p, out, kernels)


def _fit_and_write(cfg: RegressConfig, p: Plan, out: Any, kernels: Any) -> int:
    """``regress`` with the output directory locked: fit (resuming from saved blocks), write, log."""
    from datamodels_ml.regression import overlap as background
    from datamodels_ml.regression.target_blocks import BlockStore, remaining
    from datamodels_ml.config import to_flat_dict

    store = BlockStore(out)
    store.open(rerun_key(cfg), force=cfg.cfg.force)
    # the statistics of the masks go first, in the background on one core while MLflow is imported
    # and its store opened (both about a second), then on every thread; then the imports of the
    # results' plot and model
    _, todo = remaining(p.target_start, p.target_end, p.memory.target_block, store.saved())
    started = background.start(lambda widen: block_fit.mask_statistics(p, p.devices[0], widen), name="regress-stats",
                               threads=1, then_import=("datamodels_ml.figures", "datamodels_ml.pyfunc")) if todo else None
    from datamodels_ml.tracking import runs as tracking
    tags = {"method": cfg.cfg.method, "k": cfg.cfg.k, "eps": cfg.cfg.eps, "num_train": cfg.data.num_train,
            "num_val": cfg.data.num_val, "targets": f"{p.target_start}:{p.target_end}", "devices": ",".join(p.devices)}
    from datamodels_ml.tracking.run_names import NOTE_TAG, fit_name, regress_description

    tags[NOTE_TAG] = regress_description(config_dict(cfg), p.target_end - p.target_start)
    with tracking.run("regress", name=f"regress-{fit_name(config_dict(cfg))}", tags=tags) as active:
        tracking.log_params({**to_flat_dict(cfg), **kernels.params()})
        result = fit_plan(p, progress=cfg.cfg.progress, log=True, store=store, started=started)
        write_results(result, cfg, out, run_id=active.info.run_id if active else None)
        store.clear()
        stats = summary(result)
        tracking.log_metrics(stats)
        for name in ("config.yaml", RESULTS_FILE, "path.png", "targets.csv", MANIFEST_FILE):
            tracking.log_artifact(out / name)
        from datamodels_ml.pyfunc import log_datamodels_model

        log_datamodels_model(out / RESULTS_FILE)  # servable and registrable as soon as it exists
    print(f"wrote {out / RESULTS_FILE}: {p.target_end - p.target_start} targets, mean best val MSE "
          f"{stats['best_val_mse']:.4g}, mean val R² {stats['mean_val_r2']:.3f}, mean non-zeros "
          f"{stats['mean_nnz_at_best']:.1f}, {stats['fit_seconds']:.1f} s")
    return 0

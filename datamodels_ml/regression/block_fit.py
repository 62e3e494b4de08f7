"""One target block of a regression on one device, and the statistics of the masks its blocks share.

``fit_block`` reads the block's rows (train shuffled, validation in order) from the ``.beton`` in
read batches sized by ``read_rows``, runs ``solvers.lasso_path`` on them with the shared feature
statistics, and returns the block's tensors on the CPU. On the CPU with ``fista``, the heap keeps
freed large blocks (``datamodels_ml.heap``) from the path's start (the solver's ``"start"``
event) to the end of its refit, not while the block's targets are read (the validation variance
first, then the solver's ``X'Y`` and validation rows): at p = 50k, 90k + 10k models, reading them
while keeping left later blocks 1.6-2.6 GB more resident. After the block the path's tensors are
freed and trimmed, then the weights copied out of the heap. ``mask_statistics`` computes the solver's X-only
statistics (the Gram and moments for ``fista``) once per device for every block. ``p`` is a
``regression.regress.Plan``.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np

from datamodels_ml import heap
from datamodels_ml.cpus import allotment, threads_during, threads_now
from datamodels_ml.progress import PathBar

__all__ = ["fit_block", "mask_statistics", "read_rows", "tolerance", "val_variance", "READ_BYTES"]


def tolerance(cfg: Any) -> tuple[float, str]:
    """The solver's convergence test: ``early_stopping.eps`` (the original's absolute one) for saga
    when set, else ``cfg.tol`` (relative). fista ignores ``early_stopping.eps``: its per-iteration
    changes are not fast_l1's per-epoch ones (``regression.original_config.notes`` says so)."""
    eps = cfg.early_stopping.eps
    if eps is not None and cfg.cfg.method == "saga":
        return float(eps), "absolute"
    return float(cfg.cfg.tol), "relative"


def val_variance(source) -> Any:
    """Per-target variance of the validation outputs (the denominator of R²)."""
    import torch

    n, s, ss = 0, None, None
    for _, yb, _ in source:
        y = yb.to(torch.float64)
        s = y.sum(0) if s is None else s + y.sum(0)
        ss = (y * y).sum(0) if ss is None else ss + (y * y).sum(0)
        n += y.shape[0]
    mean = s / n
    return (ss / n - mean * mean).clamp_min(0)


def fit_block(p: Any, bar: PathBar, stats: Any = None) -> dict[str, Any]:
    """Solve targets ``[p.target_start, p.target_end)`` on ``p.device``: the block's tensors, on the CPU.

    ``stats`` are the solver's feature statistics for ``p.device``, shared by the blocks (None: the
    solver computes them itself).
    """
    import torch

    from datamodels_ml.dataset.reader import BetonBatches
    from datamodels_ml.solvers.sources import ChainedSource
    from datamodels_ml.solvers.path import lasso_path
    from datamodels_ml.solvers.relax import PHIS

    cfg, c = p.cfg, p.cfg.cfg
    cores = allotment()
    common = dict(batch_size=read_rows(c, p.info), num_workers=min(c.num_workers, cores) or cores,
                  target_start=p.target_start, target_end=p.target_end, info=p.info)
    train = BetonBatches(p.cfg.data.data_path, p.train_rows, shuffle=True, seed=p.cfg.data.seed, **common)
    val = BetonBatches(p.cfg.data.data_path, p.val_rows, shuffle=False, **common)
    tol, tol_mode = tolerance(cfg)
    keep = p.device == "cpu" and c.method == "fista"  # freed blocks reused on the path (the plan counts them)

    def events(event: str, info: dict) -> None:
        if keep and event == "start":  # from the path's start: the targets' reading before it maps and
            heap.keep_freed_blocks()  # unmaps its large batches, which would otherwise scatter over the heap
        bar(event, info)

    solver = dict(method=c.method, fit_intercept=c.use_bias, batch_size=c.batch_size, lr=c.lr, max_epochs=c.max_epochs,
                  check_every=cfg.early_stopping.check_every, tol=tol, tol_mode=tol_mode, min_lambdas=c.min_lambdas,
                  device=p.device, dtype=p.dtype, callback=events)
    # the original's refit (train+val rows, their own mean/std): fista forms its Gram from the
    # training one in the same call; saga streams both sources in a second call
    restandardize = c.refit and c.refit_standardization == "train_val" and c.method == "saga"
    in_call = c.refit_standardization if c.method == "fista" else "train"
    relax = c.relax and c.method == "fista"  # notes() says that saga does not relax
    val_var = val_variance(val)  # read now, while the block holds nothing else: its batches add to no peak
    start = time.perf_counter()
    # the path's many short parallel operations: fewer threads while other processes keep CPUs busy
    limit = threads_during(threads_now()) if p.device == "cpu" else nullcontext()
    try:
        with limit:
            path = lasso_path(train, val, k=c.k, eps=c.eps, grid=c.grid, refit=c.refit and not restandardize,
                              stats=stats, relax=PHIS if relax else (),
                              refit_standardization=in_call if c.refit else "train", **solver)
            refit, epochs = path, path.epochs
            if restandardize:  # the original's refit: train+val rows standardized with their own mean/std
                both = ChainedSource(train, BetonBatches(p.cfg.data.data_path, p.val_rows, shuffle=True,
                                                         seed=p.cfg.data.seed + 1, **common), seed=p.cfg.data.seed)
                refit = lasso_path(both, val, lambdas=path.lam[None], refit=False, **solver)
                epochs += refit.epochs
    finally:
        heap.release()
        bar.end_block(p.target_end - p.target_start)
    seconds = time.perf_counter() - start
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    block = {"weight": cpu(refit.weight).float().contiguous(), "bias": cpu(refit.bias).float(),
             "lam": cpu(path.lam).float(), "mean": cpu(refit.mean).float(), "std": cpu(refit.std).float(),
             "lam_path": cpu(path.lam_path).to(torch.float64), "val_mse": cpu(path.val_mse).to(torch.float64),
             "train_mse": cpu(path.train_mse).to(torch.float64), "nnz": cpu(path.nnz).to(torch.float64),
             "best_index": cpu(path.best_index).long(), "active": cpu(path.active).to(torch.float64),
             "phi": cpu(path.phi).float(), "relax_val_mse": cpu(path.relax_val_mse).to(torch.float64),
             "val_var": val_var, "epochs": torch.tensor(int(epochs)), "seconds": torch.tensor(float(seconds))}
    if keep:  # the path's tensors freed and their pages handed back; then the weights, which outlive the
        del path, refit  # block until the merge, copied out of the heap (mapped, now that keeping is
        heap.trim()  # over) and the heap's copy freed: nothing of the block pins the heap
        block["weight"] = block["weight"].clone(memory_format=torch.contiguous_format)
        heap.trim()
    return block


READ_BYTES = 2**28  # a fista read batch: 256 MB at most (bytes of 0/1 masks, float32 of others)


def read_rows(c: Any, info: Any) -> int:
    """Rows per read batch: saga's minibatch (``cfg.batch_size``); for fista, whose passes only sum
    (``X'X``, ``X'Y``), large batches so that each product is large: 0/1 masks up to 8192 rows
    within 256 MB of bytes (p = 50k: 5368 rows; the Gram's counts are added to all p²/2 entries once
    per batch, and the int8 ``X'Y`` puts its digits together once per batch; float products convert
    at most 256 MB of a batch at a time), other masks up to 4096 rows within 256 MB as float32."""
    if c.method == "saga":
        return c.batch_size
    p = max(info.n_features, 1)
    if np.dtype(info.x_dtype) in (np.dtype(bool), np.dtype(np.uint8)):
        return max(c.batch_size, min(8192, READ_BYTES // p))
    return max(c.batch_size, min(4096, READ_BYTES // (4 * p)))


def mask_statistics(p: Any, device: str, widen: Callable[[], None] | None = None) -> Any:
    """The solver's X-only statistics on ``device``, computed once for every block (with the Gram
    for fista; moments only for the streaming method, whose point is to never hold a p x p matrix).
    ``widen``: called between batches (the background start's move to every thread)."""
    from datamodels_ml.dataset.reader import BetonBatches
    from datamodels_ml.solvers import candidates
    from datamodels_ml.solvers.stats import feature_stats
    from datamodels_ml.solvers.sources import Stepped

    c = p.cfg.cfg
    x_only = dict(batch_size=read_rows(c, p.info), target_start=p.target_start,
                  target_end=p.target_start, info=p.info)
    train = BetonBatches(p.cfg.data.data_path, p.train_rows, shuffle=False, **x_only)
    val = BetonBatches(p.cfg.data.data_path, p.val_rows, shuffle=False, **x_only)
    if widen is not None:
        train, val = Stepped(train, widen), Stepped(val, widen)
    start = time.perf_counter()
    with candidates.stepping(widen or (lambda: None)):  # also between the Gram's column blocks
        stats = feature_stats(train, val, device=device, dtype=p.dtype, gram=c.method == "fista")
    what = "the Gram and moments" if c.method == "fista" else "moments"
    print(f"regress: statistics of the masks ({what}, {p.info.n_features} features, {len(p.train_rows)} + "
          f"{len(p.val_rows)} rows) on {device}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return stats

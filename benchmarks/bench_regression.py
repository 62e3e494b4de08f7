"""Benchmark the datamodels lasso path against scikit-learn's ``lasso_path``.

A synthetic datamodel problem shaped like the digits example (4000 models, 1000 features,
300 targets; k = 50, eps = 1e-3): X = random boolean masks (alpha = 0.5), Y = X_std @ W_true + noise
with W_true heavy-tailed (a few big weights per target plus many small ones), split 3600 / 400.

Timed in the same run, with *no refit on either side*:
  (a) ``datamodels_ml.lasso.lasso_path`` with per-target λ selection (fista, then saga);
  (b) scikit-learn's ``lasso_path`` target by target over the same λ grid on the same
      standardized float32 data (y centered, as sklearn's lasso_path fits no intercept), then the
      best λ per target selected on the validation rows.

Usage: python benchmarks/bench_regression.py [--quick] [--device cuda] [--methods fista,saga] [--threads N]
Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from datamodels_ml.lasso import TensorBatches, _Saga, lasso_path  # noqa: E402


def make_problem(n: int, p: int, T: int, seed: int = 0, noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT.sample draws from the global generator
    X = torch.rand(n, p, generator=g) < 0.5
    Xf = X.double()
    Z = (Xf - Xf.mean(0)) / Xf.std(0, unbiased=False)
    # heavy-tailed big weights on a few features + many small ones (datamodel-like)
    W = 0.01 * torch.randn(p, T, generator=g, dtype=torch.float64)
    n_big = 10
    for t in range(T):
        j = torch.randperm(p, generator=g)[:n_big]
        W[j, t] += torch.distributions.StudentT(2.0).sample((n_big,)).double() * 0.3
    Y = Z @ W + noise * torch.randn(n, T, generator=g, dtype=torch.float64) + 2.0
    return X, Y.float()


def sklearn_path(Zt: np.ndarray, Yt: np.ndarray, Zv: np.ndarray, Yv: np.ndarray, lam_path: np.ndarray):
    from sklearn.linear_model import lasso_path as sk_lasso_path

    T = Yt.shape[1]
    best = np.empty(T)
    ybar = Yt.mean(0)
    for t in range(T):
        alphas, coefs, _ = sk_lasso_path(Zt, Yt[:, t] - ybar[t], alphas=lam_path[:, t])
        pred = Zv @ coefs + ybar[t]  # [nv, k]
        mse = ((pred - Yv[:, t : t + 1]) ** 2).mean(0)
        best[t] = mse.min()
    return best


def time_saga_epoch(Xt, Yt, device, batch_size, dtype=torch.float32):
    src = TensorBatches(Xt.to(device), Yt.to(device), batch_size=batch_size, shuffle=True)
    Xf = Xt.double()
    mean = Xf.mean(0).to(device, dtype)
    std = Xf.std(0, unbiased=False).clamp_min(1e-12).to(device, dtype)
    T = Yt.shape[1]
    p = Xt.shape[1]
    W = torch.zeros(p, T, dtype=dtype, device=device)
    b = Yt.mean(0).to(device, dtype)
    s = _Saga(src, mean, std, W, b, fit_intercept=True, lr=1e-3, dtype=dtype, device=device)
    s.fill()
    lam = torch.full((T,), 1e-3, dtype=dtype, device=device)
    nd = torch.ones(T, dtype=dtype, device=device)
    var = torch.ones(p, dtype=dtype, device=device)
    idx = torch.arange(T, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    s.run(idx, lam, nulldev=nd, var=var, tol=0.0, max_epochs=1, check_every=100)  # warm-up
    sync()
    reps = 5
    t0 = time.perf_counter()
    s.run(idx, lam, nulldev=nd, var=var, tol=0.0, max_epochs=reps, check_every=100)
    sync()
    t_epoch = (time.perf_counter() - t0) / reps
    # the two products an epoch needs, over all batches
    batches = [((xb.to(dtype) - mean) / std, rows) for xb, _, rows in src]
    for z, _ in batches:  # warm-up
        _ = z.T @ (z @ W)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for z, _ in batches:
            r = z @ W
            _ = z.T @ r
    sync()
    t_mm = (time.perf_counter() - t0) / reps
    return t_epoch, t_mm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small problem (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="fista,saga")
    ap.add_argument("--threads", type=int, default=0,
                    help="limit torch and BLAS (sklearn) threads for both sides (0: library defaults)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    if args.quick:
        n, p, T, n_val, k, eps = 600, 100, 20, 100, 15, 1e-3
    else:
        n, p, T, n_val, k, eps = 4000, 1000, 300, 400, 50, 1e-3
    X, Y = make_problem(n, p, T)
    Xt, Yt, Xv, Yv = X[: n - n_val], Y[: n - n_val], X[n - n_val :], Y[n - n_val :]
    print(f"problem: {n - n_val} train / {n_val} val models, {p} features, {T} targets, k={k}, eps={eps}")
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")

    # warm-up (lazy initialisation of torch / sklearn kernels is not what we time)
    from sklearn.linear_model import lasso_path as _sk  # noqa: F401

    for method in args.methods.split(","):
        lasso_path((Xt[:50].to(device), Yt[:50, :2].to(device)), (Xv[:20].to(device), Yv[:20, :2].to(device)),
                   k=3, eps=0.1, method=method, refit=True, device=device)
    sklearn_path(np.random.rand(50, 5).astype(np.float32), np.random.rand(50, 2).astype(np.float32),
                 np.random.rand(10, 5).astype(np.float32), np.random.rand(10, 2).astype(np.float32),
                 np.tile(np.array([[0.1], [0.01]]), (1, 2)))

    results = {}
    for method in args.methods.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        res = lasso_path((Xt.to(device), Yt.to(device)), (Xv.to(device), Yv.to(device)), k=k, eps=eps,
                         method=method, refit=False, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = torch.nan_to_num(res.val_mse, nan=float("inf")).amin(0).cpu().numpy()
        results[method] = (dt, best, res, cpu)
        print(f"ours[{method}]: {dt:8.2f} s wall ({cpu:8.2f} s CPU)  mean best val MSE {best.mean():.6f}  epochs/iters {res.epochs}  "
              f"mean active fraction {res.active.mean().item():.3f}  mean selected nnz "
              f"{res.nnz.gather(0, res.best_index[None]).mean().item():.1f}")

    fastest = min(results, key=lambda m: results[m][0])
    dt_ours, best_ours, res, _ = results[fastest]
    lam_path = res.lam_path.cpu().numpy()

    Xtf = Xt.double()
    mean, std = Xtf.mean(0), Xtf.std(0, unbiased=False)
    Zt = ((Xtf - mean) / std).float().numpy()
    Zv = ((Xv.double() - mean) / std).float().numpy()
    t0, c0 = time.perf_counter(), time.process_time()
    best_sk = sklearn_path(Zt, Yt.numpy(), Zv, Yv.numpy(), lam_path)
    dt_sk, cpu_sk = time.perf_counter() - t0, time.process_time() - c0
    print(f"sklearn lasso_path (float32, per target, same grid, full path, no early stop): {dt_sk:8.2f} s wall "
          f"({cpu_sk:8.2f} s CPU)  mean best val MSE {best_sk.mean():.6f}")
    for method, (dt, best, _, cpu) in results.items():
        rel = (best.mean() - best_sk.mean()) / best_sk.mean()
        print(f"  {method}: speed-up sklearn/ours = {dt_sk / dt:6.2f}x wall, {cpu_sk / cpu:6.2f}x CPU   "
              f"mean best val MSE rel. diff = {rel:+.2e}"
              f"   max per-target rel. diff = {np.abs((best - best_sk) / best_sk).max():.2e}")

    if device.type == "cuda":
        t_epoch, t_mm = time_saga_epoch(Xt, Yt, device, batch_size=128)
        print(f"SAGA epoch on {device}: {t_epoch * 1e3:.2f} ms; the two products (X·W, Xᵀ·R) over all "
              f"batches: {t_mm * 1e3:.2f} ms; ratio {t_epoch / t_mm:.2f}")


if __name__ == "__main__":
    main()

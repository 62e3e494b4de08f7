"""Benchmark the datamodels lasso path against scikit-learn's ``lasso_path`` sharing one precomputed Gram.

A synthetic datamodel problem shaped like the digits example (4000 models, 1000 features, 300
targets; k = 50, eps = 1e-3): X = random boolean masks (alpha = 0.5), Y = X_std @ W_true + noise with
W_true heavy-tailed (a few big weights per target plus many small ones), split 3600 / 400.

Timed in the same run, each side in a fresh process (so its peak memory is its own), no refit:
  (a) ours: ``lasso_path`` with per-target λ selection on the validation rows;
  (b) the baseline, scikit-learn's ``lasso_path(Z, y_t, precompute=G, Xy=Z^T y_t, alphas=...)``
      with ONE Gram ``G = Z^T Z`` shared by all targets (the strongest CPU peer we know of), on the
      same standardized float32 data and the same λ grid (y centered: sklearn fits no intercept);
      the best λ per target is then selected on the validation rows. The Gram is timed once and
      added to the baseline's time.
With ``--targets-baseline N`` sklearn solves only the first N targets and its time is scaled by
T / N (it solves targets independently); the output says so, and compares the MSE on those N.

Prints the ratio sklearn time / our time at (reported) validation MSE, and each side's peak memory
(ru_maxrss of its process; on CUDA also torch.cuda.max_memory_allocated). Asserts nothing.

With ``--load N`` both sides are timed again while N busy processes (one pure-Python loop each,
ended with the benchmark) compete for the cores, and each side's slowdown is printed: on a shared
machine our path must not slow down more than the baseline's.

With ``--command`` the same data also goes into a store and a .beton, and the whole ``regress``
command (a fresh process: start-up, reading, statistics, path without refit, results, MLflow) is
timed by its wall clock against the same baseline.

Usage: python benchmarks/bench_regression.py [--quick] [--device cuda] [--methods fista,saga] [--truth sparse]
                                             [--threads N] [--targets-baseline N] [--command] [--load N]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401,I001 - first: puts the repository on sys.path, sets the thread spins
import numpy as np
from _common import OURS_ENV, gb, gram_floor, in_child, machine_report, peak_rss_bytes, solver_lasso_path


def make_problem(n: int, p: int, T: int, seed: int = 0, noise: float = 1.0, truth: str = "dense"):
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT.sample draws from the global generator
    X = torch.rand(n, p, generator=g) < 0.5
    Xf = X.double()
    Z = (Xf - Xf.mean(0)) / Xf.std(0, unbiased=False)
    if truth == "sparse":  # 1% of the features matter (heavy-tailed weights), the rest are exactly 0
        W = torch.zeros(p, T, dtype=torch.float64)
        m = max(5, p // 100)
        for t in range(T):
            j = torch.randperm(p, generator=g)[:m]
            W[j, t] = torch.distributions.StudentT(2.0).sample((m,)).double() * 0.1
        return X, (Z @ W + noise * torch.randn(n, T, generator=g, dtype=torch.float64) + 2.0).float()
    # dense: heavy-tailed big weights on a few features + many small ones on every feature
    W = 0.01 * torch.randn(p, T, generator=g, dtype=torch.float64)
    for t in range(T):
        j = torch.randperm(p, generator=g)[:10]
        W[j, t] += torch.distributions.StudentT(2.0).sample((10,)).double() * 0.3
    Y = Z @ W + noise * torch.randn(n, T, generator=g, dtype=torch.float64) + 2.0
    return X, Y.float()


def _split(size, n_val):
    X, Y = make_problem(*size[:3], truth=size[3] if len(size) > 3 else "dense")
    n = size[0]
    return X[: n - n_val], Y[: n - n_val], X[n - n_val:], Y[n - n_val:]


def run_ours(size, n_val, k, eps, method, device):
    """Our path in this (child) process: seconds, best val MSE per target, the λ grid, peak memory."""
    import torch

    lasso_path = solver_lasso_path()
    Xt, Yt, Xv, Yv = _split(size, n_val)
    dev = torch.device(device)
    # warm-up: lazy initialisation of torch kernels is not what we time
    lasso_path((Xt[:50].to(dev), Yt[:50, :2].to(dev)), (Xv[:20].to(dev), Yv[:20, :2].to(dev)), k=3, eps=0.1,
               method=method, refit=False, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    from contextlib import nullcontext

    from datamodels_ml.cpus import threads_during, threads_now

    t0 = time.perf_counter()
    # as the regress command: fewer threads while other processes keep CPUs busy
    with threads_during(threads_now()) if dev.type == "cpu" else nullcontext():
        res = lasso_path((Xt.to(dev), Yt.to(dev)), (Xv.to(dev), Yv.to(dev)), k=k, eps=eps, method=method,
                         refit=False, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    best = torch.nan_to_num(res.val_mse, nan=float("inf")).amin(0).cpu().numpy()
    gpu_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    nnz = res.nnz.gather(0, res.best_index[None]).mean().item()
    return {"seconds": seconds, "best": best, "lam_path": res.lam_path.cpu().numpy(), "epochs": int(res.epochs),
            "nnz": nnz, "rss": peak_rss_bytes(), "gpu": gpu_peak}


def run_command(size, n_val, k, eps, tmp):
    """The whole ``regress`` command (start-up, reading the .beton, statistics, path, no refit,
    results, MLflow) on the same problem written to a store and a .beton: wall seconds of a first
    and a second run in the same directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from datamodels_ml.dataset.write_dataset import write_beton
    from datamodels_ml.store.spec import parse_spec
    from datamodels_ml.store.store import create_store

    n, p, T, truth = size
    X, Y = make_problem(n, p, T, truth=truth)
    store = create_store(Path(tmp) / "store", parse_spec({"num_models": n, "schema": {
        "masks": {"shape": [p], "dtype": "bool_"}, "margins": {"shape": [T], "dtype": "float32"}}}))
    Xn, Yn = X.numpy(), Y.numpy()
    for i in range(n):
        store.write_row(i, {"masks": Xn[i], "margins": Yn[i]})
    write_beton(store.path, Path(tmp) / "d.beton", progress=False)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "datamodels_ml", "regress", f"config={root / 'configs' / 'reg.yaml'}",
           f"data.data_path={Path(tmp) / 'd.beton'}", f"data.num_train={n - n_val}", f"data.num_val={n_val}",
           "data.split=ordered", f"cfg.k={k}", f"cfg.eps={eps}", "cfg.refit=false", "cfg.progress=false"]
    env = {key: v for key, v in os.environ.items() if key != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = str(root)
    times = []
    for i in range(2):  # the first run also creates the MLflow database; the second finds it, as a user's does
        t0 = time.perf_counter()
        subprocess.run(cmd + [f"cfg.out_dir={Path(tmp) / f'out{i}'}"], cwd=tmp, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def run_sklearn(size, n_val, lam_path, n_targets):
    """scikit-learn's lasso_path with one shared Gram over the first ``n_targets`` targets."""
    from sklearn.linear_model import lasso_path as sk_lasso_path

    Xt, Yt, Xv, Yv = _split(size, n_val)
    Xtf = Xt.double()
    mean, std = Xtf.mean(0), Xtf.std(0, unbiased=False)
    Zt = np.ascontiguousarray(((Xtf - mean) / std).float().numpy())
    Zv = ((Xv.double() - mean) / std).float().numpy()
    Yt, Yv = Yt.numpy(), Yv.numpy()
    sk_lasso_path(Zt[:50, :5], Yt[:50, 0] - Yt[:50, 0].mean(), alphas=[0.1, 0.01])  # warm-up
    t0 = time.perf_counter()
    G = Zt.T @ Zt
    gram_seconds = time.perf_counter() - t0
    ybar = Yt.mean(0)
    best = np.empty(n_targets)
    t0 = time.perf_counter()
    for t in range(n_targets):
        yc = Yt[:, t] - ybar[t]
        _, coefs, _ = sk_lasso_path(Zt, yc, precompute=G, Xy=Zt.T @ yc, alphas=lam_path[:, t])
        best[t] = (((Zv @ coefs + ybar[t]) - Yv[:, t:t + 1]) ** 2).mean(0).min()
    return {"gram_seconds": gram_seconds, "path_seconds": time.perf_counter() - t0, "best": best,
            "rss": peak_rss_bytes()}


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Load:
    """``n`` busy processes (a pure-Python loop each, at most ``seconds``), ended on exit."""

    def __init__(self, n: int, seconds: float = 1800.0) -> None:
        import multiprocessing as mp

        self.procs = [mp.get_context("spawn").Process(target=_spin, args=(seconds,), daemon=True) for _ in range(n)]

    def __enter__(self) -> "Load":
        for proc in self.procs:
            proc.start()
        time.sleep(0.5)  # let them start spinning
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small problem (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="fista", help="our methods to time, comma-separated")
    ap.add_argument("--threads", type=int, default=0,
                    help="limit torch and BLAS threads on both sides (0: library defaults)")
    ap.add_argument("--targets-baseline", type=int, default=0,
                    help="sklearn solves only the first N targets; its time is scaled per target (0: all)")
    ap.add_argument("--size", default="",
                    help="N_MODELS,FEATURES,TARGETS,N_VAL (default 4000,1000,300,400; issue 8's target: 20000,5000,200,4000)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--truth", choices=("dense", "sparse"), default="dense",
                    help="true weights: dense (every feature 0.01 N(0,1) plus 10 heavy ones per target) or "
                         "sparse (1%% of the features, heavy-tailed; the rest 0)")
    ap.add_argument("--load", type=int, default=0,
                    help="also time both sides under N busy competing processes (e.g. one per core)")
    ap.add_argument("--command", action="store_true",
                    help="also time the whole regress command on the same data (a .beton in a temporary directory)")
    args = ap.parse_args()
    k, eps = args.k, 1e-3
    if args.quick:
        n, p, T, n_val, k = 600, 100, 20, 100, 15
    elif args.size:
        n, p, T, n_val = (int(v) for v in args.size.split(","))
    else:
        n, p, T, n_val = 4000, 1000, 300, 400
    size = (n, p, T, args.truth)
    kern = machine_report(args.threads)
    print(f"problem: {n - n_val} train / {n_val} val models, {p} features, {T} targets ({args.truth} truth), "
          f"k={k}, eps={eps}; "
          f"device {args.device}, threads {args.threads or 'default'}")

    print(f"floor: the exact Gram alone takes {gram_floor(kern, n - n_val, p)}")
    ours = {}
    for method in args.methods.split(","):
        r = in_child(run_ours, size, n_val, k, eps, method, args.device, threads=args.threads, env=OURS_ENV)
        ours[method] = r
        gpu = f", GPU peak {gb(r['gpu'])}" if r["gpu"] else ""
        print(f"ours [{method}]: {r['seconds']:8.2f} s  mean best val MSE {r['best'].mean():.6f}  iterations "
              f"{r['epochs']}  mean selected nnz {r['nnz']:.1f}  peak RSS {gb(r['rss'])}{gpu}")

    command = None
    if args.command:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            first, command = run_command(size, n_val, k, eps, tmp)
        print(f"ours, the whole regress command (fista, no refit; start-up, .beton read, MLflow): {command:8.2f} s "
              f"({first:.2f} s the first time, creating the MLflow database)")

    fastest = min(ours, key=lambda m: ours[m]["seconds"])
    n_sk = min(args.targets_baseline or T, T)
    sk = in_child(run_sklearn, size, n_val, ours[fastest]["lam_path"], n_sk, threads=args.threads)
    scale = T / n_sk
    sk_total = sk["gram_seconds"] + sk["path_seconds"] * scale
    label = "" if n_sk == T else f" (ESTIMATED: {n_sk} of {T} targets timed, path time scaled x{scale:.1f})"
    print(f"sklearn lasso_path, one shared Gram (float32, same grid, full path): Gram {sk['gram_seconds']:.2f} s "
          f"+ paths {sk['path_seconds'] * scale:.2f} s = {sk_total:8.2f} s{label}  mean best val MSE "
          f"{sk['best'].mean():.6f} (first {n_sk} targets)  peak RSS {gb(sk['rss'])}")
    for method, r in ours.items():
        mine = r["best"][:n_sk]
        rel = (mine.mean() - sk["best"].mean()) / sk["best"].mean()
        print(f"  {method}: sklearn-shared-Gram / ours = {sk_total / r['seconds']:6.2f}x{' (estimated)' if label else ''}"
              f"   mean best val MSE rel. diff {rel:+.2e} (negative: ours lower)   "
              f"max per-target rel. diff {np.abs((mine - sk['best']) / sk['best']).max():.2e}")
    if command is not None:
        print(f"  the whole regress command: sklearn-shared-Gram / ours = {sk_total / command:6.2f}x"
              f"{' (estimated)' if label else ''}")
    if args.load:
        with Load(args.load):
            loaded = {m: in_child(run_ours, size, n_val, k, eps, m, args.device, threads=args.threads, env=OURS_ENV)
                      for m in ours}
            sk_loaded = in_child(run_sklearn, size, n_val, ours[fastest]["lam_path"], n_sk, threads=args.threads)
        sk_l = sk_loaded["gram_seconds"] + sk_loaded["path_seconds"] * scale
        print(f"under load ({args.load} busy processes competing for the cores):")
        print(f"  sklearn: {sk_l:8.2f} s, slowdown {sk_l / sk_total:5.2f}x")
        for method, r in loaded.items():
            slow = r["seconds"] / ours[method]["seconds"]
            print(f"  ours [{method}]: {r['seconds']:8.2f} s, slowdown {slow:5.2f}x "
                  f"({'no worse than' if slow <= sk_l / sk_total else 'WORSE than'} sklearn's); "
                  f"sklearn-shared-Gram / ours under load = {sk_l / r['seconds']:6.2f}x")


if __name__ == "__main__":
    main()

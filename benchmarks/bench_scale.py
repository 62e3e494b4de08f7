"""Scale benchmark: time, peak memory and per-stage rates of the regression at p = 5k .. 30k features,
and what they extrapolate to at the paper's scale (300k models x 50k features x 10k targets).

Synthetic datamodel data with a known answer: X = random boolean masks (alpha = 0.5), each target a
sparse linear function of the standardized masks (``--support`` features, weights ±U(0.5, 1.5)) plus
unit noise and an offset. Per size, in a fresh process (so the peak RSS is that size's own):

* our ``lasso_path`` (``--method``, with the refit) on ``--n-train`` + ``--n-val`` models: seconds,
  FISTA iterations and iterations per second, peak RSS (and the part above the data themselves);
* test MSE on ``--n-test`` fresh models against an oracle, least squares on the true support;
* GFLOP/s of the three large products (as the solver computes them) at the shapes of a large run, measured on this
  machine: the Gram block X^T X (2000 rows, up to 8000 columns), X^T Y with 1024 targets and G @ W
  with a 512-target block (one FISTA iteration without screening).

The extrapolation multiplies those rates by the paper-scale flop counts (Gram 2 n p², X^T Y 2 n p T,
each FISTA iteration 2 p² T without screening, as many iterations as the largest size measured here
needed) and sizes the target blocks with ``datamodels_ml.regression.memory``. The GPU column uses
``--gpu-tflops`` (ASSUMED, printed as such) unless ``--device cuda`` measured the rates. It is an
order of magnitude, not a promise: screening, I/O of the 15 GB of masks and iteration counts at
that scale are not measured here.

Usage: python benchmarks/bench_scale.py [--sizes 5000,10000,20000,30000] [--n-train 10000] [--n-val 2000]
           [--targets 32] [--method fista] [--device cpu] [--gpu-tflops 50] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401,I001 - first: puts the repository on sys.path, sets the thread spins
import numpy as np
from _common import OURS_ENV, current_rss_bytes, gb, gram_floor, in_child, machine_report, peak_rss_bytes, solver_lasso_path

PAPER = {"n": 300_000, "p": 50_000, "T": 10_000}


def make_data(n: int, p: int, T: int, support: int, seed: int):
    """Boolean masks [n, p], outputs [n, T] float32, the true weights [p, T] (standardized scale)."""
    rng = np.random.default_rng(seed)
    W = np.zeros((p, T), dtype=np.float32)
    for t in range(T):
        cols = rng.choice(p, support, replace=False)
        W[cols, t] = rng.choice([-1.0, 1.0], support) * rng.uniform(0.5, 1.5, support)
    X = np.empty((n, p), dtype=np.bool_)
    Y = np.empty((n, T), dtype=np.float32)
    for s in range(0, n, 1000):
        xb = rng.random((min(1000, n - s), p), dtype=np.float32) < 0.5
        X[s:s + len(xb)] = xb
        Y[s:s + len(xb)] = (2.0 * xb.astype(np.float32) - 1.0) @ W + 1.0
    Y += rng.normal(size=Y.shape).astype(np.float32)
    return X, Y, W


def _rates(X: np.ndarray, device: str) -> tuple[float, float, float]:
    """GFLOP/s on ``device`` of the three large products at the shapes of a large run.

    The Gram block X^T X (2000 rows, up to 8000 columns) as ``solvers.stats.add_gram`` accumulates
    it (full-product flops per second), X^T Y with 1024 target columns and G @ W with a 512-target
    block (a FISTA iteration without screening), float32.
    """
    import torch

    dev = torch.device(device)
    m, q = min(2000, X.shape[0]), min(8000, X.shape[1])
    Z = torch.from_numpy(X[:m, :q]).to(dev, torch.float32)
    Y = torch.randn(m, 1024, device=dev)
    W = torch.randn(q, 512, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)

    def rate(fn, flops):
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return flops / (time.perf_counter() - t0) / 1e9

    # the Gram as the solver accumulates it (the gram kernel picked by measured rate on the CPU, float16 on
    # CUDA; upper blocks only), counted as the flops of a full product so the extrapolation's
    # 2 n p² applies unchanged
    from datamodels_ml.solvers.stats import add_gram

    Xb = torch.from_numpy(X[:m, :q]).to(dev)
    Gq = torch.zeros(q, q, device=dev)
    gram = rate(lambda: add_gram(Gq, Xb), 2 * m * q * q)
    G = Z.T @ Z
    from datamodels_ml.solvers.blas import mm  # the solver's products (OpenBLAS on the CPU)

    xty = rate(lambda: mm(Z.T, Y), 2 * m * q * 1024)
    gw = rate(lambda: mm(G, W), 2 * q * q * 512)
    return gram, xty, gw


def run_size(p: int, n_train: int, n_val: int, n_test: int, T: int, support: int, k: int, eps: float,
             method: str, device: str, seed: int) -> dict:
    """One size, in this (child) process."""
    import torch

    lasso_path = solver_lasso_path()
    X, Y, W = make_data(n_train + n_val + n_test, p, T, support, seed)
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, None)
    data_rss = current_rss_bytes()
    gram_rate, xty_rate, gw_rate = _rates(X, device)

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    marks: dict[str, float] = {}

    def callback(event: str, info: dict) -> None:
        if event == "epoch" and "first" not in marks:
            marks["first"] = time.perf_counter()
        if event == "refit" and "refit" not in marks:
            marks["refit"] = time.perf_counter()

    t0 = time.perf_counter()
    res = lasso_path((torch.from_numpy(X[tr]), torch.from_numpy(Y[tr])), (torch.from_numpy(X[va]), torch.from_numpy(Y[va])),
                     k=k, eps=eps, method=method, refit=True, device=dev, callback=callback)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    stats_seconds = marks.get("first", t0) - t0
    path_seconds = marks.get("refit", t0 + seconds) - marks.get("first", t0)

    pred = res.predict(torch.from_numpy(X[te])).cpu().numpy()
    test_mse = float(((pred - Y[te]) ** 2).mean())
    # oracle: least squares (with intercept) on the true support, fitted on train + val
    Xfit = X[:n_train + n_val].astype(np.float32)
    oracle = []
    for t in range(T):
        cols = np.flatnonzero(W[:, t])
        A = np.c_[Xfit[:, cols], np.ones(len(Xfit), np.float32)]
        coef, *_ = np.linalg.lstsq(A, Y[:n_train + n_val, t], rcond=None)
        pt = np.c_[X[te][:, cols].astype(np.float32), np.ones(n_test, np.float32)] @ coef
        oracle.append(((pt - Y[te, t]) ** 2).mean())
    iters = int(res.epochs)
    return {"p": p, "seconds": seconds, "stats_seconds": stats_seconds, "path_seconds": path_seconds,
            "iterations": iters, "iters_per_s": iters / max(path_seconds, 1e-9) if path_seconds > 0 else float("nan"),
            "test_mse": test_mse, "oracle_mse": float(np.mean(oracle)), "rss": peak_rss_bytes(), "data_rss": data_rss,
            "gpu": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
            "gram_gflops": gram_rate, "xty_gflops": xty_rate, "gw_gflops": gw_rate, "T": T}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def extrapolate(last: dict, measured_gpu: bool, gpu_tflops: float, method: str) -> None:
    from datamodels_ml.regression.memory import USABLE, cpu_available, estimate
    from datamodels_ml.store.layout import human_bytes as fmt_bytes

    n, p, T = PAPER["n"], PAPER["p"], PAPER["T"]
    gram_flops, xty_flops = 2 * n * p * p, 2 * n * p * T
    iter_flops = 2 * p * p * T  # one FISTA iteration over every target, no screening
    fixed, per_target = estimate(n_features=p, n_train=n, n_val=n // 10, batch_size=2000, method=method, itemsize=4)
    print(f"\nextrapolation to the paper's scale ({n} models x {p} features x {T} targets), "
          f"{last['iterations']} FISTA iterations over the path as at p={last['p']}, every iteration over every "
          f"target (no screening), rates of the large products above (not of this run's thin {last['T']}-target "
          f"iterations):")
    rows = [("this CPU (measured rates)", last["gram_gflops"], last["xty_gflops"], last["gw_gflops"],
             cpu_available() or 0)]
    if measured_gpu:
        rows = [("this GPU (measured rates)", last["gram_gflops"], last["xty_gflops"], last["gw_gflops"],
                 80 * 2**30)]
    else:
        rows.append((f"one 80 GB GPU (ASSUMED {gpu_tflops:g} TFLOP/s, not measured)", gpu_tflops * 1e3,
                     gpu_tflops * 1e3, gpu_tflops * 1e3, 80 * 2**30))
    for name, g, x, it, memory in rows:
        t_gram, t_xty, t_iter = gram_flops / (g * 1e9), xty_flops / (x * 1e9), last["iterations"] * iter_flops / (it * 1e9)
        room = int(memory * USABLE) - fixed
        blocks = "does not fit" if room < per_target else f"blocks of {min(T, room // per_target)} targets"
        print(f"  {name}: Gram {_hours(t_gram)} ({g:.0f} GFLOP/s), X^T Y {_hours(t_xty)}, iterations "
              f"{_hours(t_iter)} ({it:.0f} GFLOP/s) -> about {_hours(t_gram + t_xty + t_iter)}; memory "
              f"{fmt_bytes(fixed)} statistics + {fmt_bytes(per_target)}/target of {fmt_bytes(memory)}: {blocks}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5000,10000,20000,30000", help="numbers of features, comma-separated")
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--n-val", type=int, default=2_000)
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--support", type=int, default=20, help="non-zero true weights per target")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--method", default="fista")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch/BLAS threads (0: library default)")
    ap.add_argument("--gpu-tflops", type=float, default=50.0,
                    help="ASSUMED fp32 rate of one 80 GB GPU for the extrapolation (when not measured)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kern = machine_report(args.threads)
    print(f"{args.n_train} train + {args.n_val} val (+ {args.n_test} test) models, {args.targets} targets, "
          f"{args.support} true non-zeros each, k={args.k}, eps={args.eps}, {args.method} on {args.device}")
    print(f"{'p':>6} {'seconds':>8} {'stats s':>8} {'path s':>7} {'iters':>6} {'iter/s':>7} {'Gram GF/s':>9} "
          f"{'XtY GF/s':>8} {'GW GF/s':>7} {'peak RSS':>9} {'above data':>10} {'test MSE':>9} {'oracle':>7} {'ratio':>6}")
    last = None
    for p in (int(s) for s in args.sizes.split(",") if s):
        try:
            r = in_child(run_size, p, args.n_train, args.n_val, args.n_test, args.targets, args.support, args.k,
                         args.eps, args.method, args.device, args.seed, threads=args.threads, env=OURS_ENV)
        except RuntimeError as exc:
            print(f"{p:>6} failed: {exc}")
            continue
        gpu = f" (GPU peak {gb(r['gpu'])})" if r["gpu"] else ""
        print(f"{p:>6} {r['seconds']:8.1f} {r['stats_seconds']:8.1f} {r['path_seconds']:7.1f} {r['iterations']:6d} "
              f"{r['iters_per_s']:7.1f} {r['gram_gflops']:9.0f} {r['xty_gflops']:8.0f} {r['gw_gflops']:7.0f} {gb(r['rss']):>9} "
              f"{gb(r['rss'] - r['data_rss']):>10} {r['test_mse']:9.4f} {r['oracle_mse']:7.4f} "
              f"{r['test_mse'] / r['oracle_mse']:6.3f}{gpu}")
        print(f"{'':>6} floor: the exact Gram alone takes {gram_floor(kern, args.n_train, p)}")
        last = r
    if last is not None:
        extrapolate(last, args.device.startswith("cuda"), args.gpu_tflops, args.method)


if __name__ == "__main__":
    main()

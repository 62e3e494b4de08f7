"""The CPU kernels the solver chooses between, at full size, against what the probe picked.

Times, in this process, every kernel of the Gram of binary masks accumulated in place
(``solvers/candidates.py``: int8 counts, OpenBLAS ``syrk``, torch's blocked ``addmm_``) and of the
product ``G @ W`` of the Gram with a block of targets (OpenBLAS via numpy, torch) and of ``X'Y``
of the masks with a block of float targets (int8 digits, a float32 product by the picked gemm), and says
whether the short probe (cached per machine) picked the kernel that is fastest at this size.
Prints seconds, rates and ratios; asserts nothing. A kernel slower than 20x the best at a small
size is not timed at full size (an int8 product on an AVX2-only CPU would take minutes).
With ``--sparse`` it also times ``G @ W`` for a mostly zero ``W`` (k non-zeros per target) as the
dense product and as torch's sparse CSR product (``blas.mm_sparse``), beside what the cost model
``blas.sparse_pays`` picks with the measured rates.

Usage: python benchmarks/bench_blas.py [--n 8000] [--p 4000] [--t 256] [--reps 3] [--sparse] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401,I001 - first: puts the repository on sys.path, sets the thread spins
import numpy as np
from _common import machine_report


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    import torch

    from datamodels_ml.solvers import blas, candidates, kernels

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--p", type=int, default=4000)
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: every CPU allotted)")
    ap.add_argument("--sparse", action="store_true", help="also the sparse products against the dense one")
    a = ap.parse_args()
    k = machine_report(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.n, a.p, generator=g) < 0.5
    W = torch.randn(a.p, a.t, generator=g)
    G = torch.zeros(a.p, a.p)
    print(f"n={a.n}, p={a.p}, targets={a.t}; best of {a.reps}")

    Y = torch.randn(a.n, a.t, generator=g, dtype=torch.float64)
    out = torch.zeros(a.p, a.t, dtype=torch.float64)
    gemm = candidates.IMPLS["gemm"][k.picks["gemm"]]
    xty = lambda fn, o, xs, ys: fn(o, xs, ys, gemm) if fn is candidates.IMPLS["xty"]["float"] else fn(o, xs, ys)  # noqa: E731

    work = {"gram": a.n * a.p * a.p / 2.0, "gemm": 2.0 * a.p * a.p * a.t, "xty": 1.0 * a.n * a.p * a.t}
    units = {"gram": "MAC/s", "gemm": "FLOP/s", "xty": "MAC/s"}
    calls = {"gram": lambda fn: (G.zero_(), fn(G, x)), "gemm": lambda fn: fn(G, W), "xty": lambda fn: xty(fn, out, x, Y)}
    small = {"gram": lambda fn: fn(torch.zeros(512, 512), x[:256, :512]), "gemm": lambda fn: fn(G[:256, :256], W[:256]),
             "xty": lambda fn: xty(fn, out[:512, :32], x[:256, :512], Y[:256, :32])}
    small_work = {"gram": 256 * 512 * 512 / 2.0, "gemm": 2.0 * 256 * 256 * a.t, "xty": 256 * 512 * 32.0}
    for op in ("gram", "gemm", "xty"):
        est = {n: small_work[op] / best(lambda: small[op](fn), 2) for n, fn in candidates.IMPLS[op].items()}
        rates = {}
        for name, fn in candidates.IMPLS[op].items():
            if est[name] * 20 < max(est.values()):
                print(f"{op:5s} {name:9s} not timed at full size: {est[name]:.3g} {units[op]} at a small size, "
                      f"{max(est.values()) / est[name]:.0f}x below the best")
                continue
            t = best(lambda: calls[op](fn), a.reps)
            rates[name] = work[op] / t
            print(f"{op:5s} {name:9s} {t:8.3f} s  {rates[name]:.3g} {units[op]}")
        fastest = max(rates, key=rates.get)
        picked = k.picks[op]
        verdict = "the fastest here" if picked == fastest else (
            f"{rates[fastest] / rates.get(picked, float('nan')):.2f}x slower than {fastest} here")
        print(f"  probe picked {op}={picked}: {verdict}")
    if a.sparse:
        dense = best(lambda: blas.mm(G, W), a.reps)
        for nz in (5, 30, 100, 300, 1000):
            Ws = torch.zeros(a.p, a.t)
            rows_k = torch.stack([torch.randperm(a.p, generator=g)[:nz] for _ in range(a.t)], 1)
            Ws.scatter_(0, rows_k, torch.randn(nz, a.t, generator=g))
            ts = best(lambda: blas.mm_sparse(G, Ws), a.reps)
            pick = "sparse" if blas.sparse_pays(nz * a.t, a.p, a.p, a.t) else "dense"
            print(f"G @ W, {nz:4d} non-zeros per target: dense {dense:7.4f} s, sparse {ts:7.4f} s, ratio "
                  f"{dense / ts:6.2f}x; the cost model picks {pick}")
    print("numpy", np.__version__, "| torch", torch.__version__)


if __name__ == "__main__":
    main()

"""The CPU products the solver spends its time in, through torch's BLAS and through OpenBLAS.

Times, in this process, the Gram of binary masks accumulated in place (torch: blocked ``addmm_``
on the upper triangle, as ``solvers/stats.py`` does without BLAS; OpenBLAS: ``syrk``, what
``solvers/blas.py`` uses) and the product ``G @ W`` of the Gram with a block of targets
(torch ``@`` vs numpy's ``matmul``). Prints seconds, GFLOP/s and the ratio; asserts nothing.
With ``--sparse`` it also times ``G @ W`` for a mostly zero ``W`` (k non-zeros per target) as the
dense OpenBLAS product and as torch's sparse CSR product (``blas.mm_sparse``), beside what the
cost model ``blas.sparse_pays`` picks.

Usage: python benchmarks/bench_blas.py [--n 8000] [--p 4000] [--t 256] [--reps 3] [--sparse]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import _common  # noqa: F401 - puts the repository on sys.path


def best(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    import torch

    from datamodels_ml.solvers import blas

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--p", type=int, default=4000)
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sparse", action="store_true", help="also the sparse products against the dense one")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(a.n, a.p, generator=g) < 0.5).float()
    W = torch.randn(a.p, a.t, generator=g)
    G = torch.zeros(a.p, a.p)

    def gram_torch():
        G.zero_()
        for j0 in range(0, a.p, 1024):
            j1 = min(a.p, j0 + 1024)
            G[:j1, j0:j1].addmm_(x[:, :j1].T, x[:, j0:j1])

    def gram_blas():
        G.zero_()
        assert blas.syrk_upper_(G, x)

    flops_gram = a.n * a.p * a.p  # one triangle: n p² / 2 multiply-adds
    flops_mm = 2 * a.p * a.p * a.t
    print(f"threads: torch {torch.get_num_threads()}; n={a.n}, p={a.p}, targets={a.t}; best of {a.reps}")
    rows = [("Gram X'X (upper triangle)", gram_torch, gram_blas, flops_gram),
            ("G @ W", lambda: G @ W, lambda: blas.mm(G, W), flops_mm)]
    for name, ft, fb, fl in rows:
        tt, tb = best(ft, a.reps), best(fb, a.reps)
        print(f"{name:26s} torch {tt:7.3f} s ({fl / tt / 1e9:6.1f} GFLOP/s)   OpenBLAS {tb:7.3f} s "
              f"({fl / tb / 1e9:6.1f} GFLOP/s)   ratio {tt / tb:5.2f}x")
    if a.sparse:
        dense = best(lambda: blas.mm(G, W), a.reps)
        for k in (5, 30, 100, 300, 1000):
            Ws = torch.zeros(a.p, a.t)
            rows_k = torch.stack([torch.randperm(a.p, generator=g)[:k] for _ in range(a.t)], 1)
            Ws.scatter_(0, rows_k, torch.randn(k, a.t, generator=g))
            ts = best(lambda: blas.mm_sparse(G, Ws), a.reps)
            pick = "sparse" if blas.sparse_pays(k * a.t, a.p, a.p, a.t) else "dense"
            print(f"G @ W, {k:4d} non-zeros per target: dense {dense:7.4f} s, sparse {ts:7.4f} s, ratio "
                  f"{dense / ts:6.2f}x; the cost model picks {pick}")
    print("numpy", np.__version__, "| torch", torch.__version__)


if __name__ == "__main__":
    main()

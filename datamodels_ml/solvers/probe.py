"""The probe: each candidate kernel's rate, measured on this process's threads.

``probe()`` times every candidate of ``solvers.candidates`` (through its ``IMPLS``, so a replaced
one is what is timed) on small inputs of the statistics pass's shapes, and the cost models'
constants: a CSR product's seconds per non-zero and row (``sparse_s``, for ``blas.sparse_pays``),
a sub-Gram gather's seconds per entry (``gather_s``) and a batched matrix-vector product's
(``matvec_s``), for screening's plan. It takes about 0.6 s on an AVX-512 CPU and 1-1.7 s on an
AVX2-only one. Rates: ``gram`` and ``xty`` multiply-adds per second, ``colsum`` entries per second,
``gemm`` FLOP/s. Pure torch: timing only, no files (``kernel_cache`` keeps the rates per machine).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from datamodels_ml.solvers import candidates

__all__ = ["probe", "PROBE_VERSION"]

PROBE_VERSION = 5  # part of the cache key: rates measured by another probe are measured again
_TRIAL_S = 2.0  # a kernel whose small trial predicts more than this (seconds) at full size is not run at full size
# (the trials are too small to rank BLAS calls: OpenBLAS syrk's trial runs at 1/6 of torch's)
_CLOSE = 3.0  # after its first full-size call, a kernel this many times slower than the best is not timed again
# (the int8 Gram of an AVX2-only CPU, 8e8 MAC/s: 1.3 s per full call, three calls were 3.9 s of a 4.9 s probe)
_LOST = 20.0  # nor one whose trial is this many times slower than the best one's


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return max(time.perf_counter() - t0, 1e-9)


def _best(run: Callable[[], object], reps: int) -> float:
    """The shortest of ``reps`` timed calls, after one untimed (first-call set-up, page faults)."""
    run()
    return min(_timed(run) for _ in range(reps))


def _measure(makes: dict[str, Callable[[bool], tuple[Callable[[], object], float]]], reps: int = 2) -> dict[str, float]:
    """Work per second of each candidate: ``make(full)`` gives ``(run, work)``. A small trial of
    each first (run twice: the first call sets up, e.g. a JIT-compiled kernel); the candidates
    within ``_LOST`` of the best trial are then run once at full size (timed, set-up included),
    and those within ``_CLOSE`` of the best such call timed again in ``reps`` interleaved rounds
    (best of each), so that a passing disturbance hits one round, not one candidate. A candidate
    that raises rates 0 (this torch or this CPU has no such kernel)."""
    trials: dict[str, float] = {}
    for name, make in makes.items():
        run, work = make(False)
        try:
            run()
            trials[name] = work / _timed(run)
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            trials[name] = 0.0
    best = max(trials.values(), default=0.0)
    full = {}
    for name, make in makes.items():
        run, work = make(True)
        if trials[name] > 0 and trials[name] * _LOST >= best and work / trials[name] <= _TRIAL_S:
            full[name] = (run, work)
    measured = {name: work / _timed(run) for name, (run, work) in full.items()}  # the first call: a floor
    top = max(measured.values(), default=0.0)
    full = {name: rw for name, rw in full.items() if measured[name] * _CLOSE >= top}
    for _ in range(reps):
        for name, (run, work) in full.items():
            measured[name] = max(measured[name], work / _timed(run))
    return {**trials, **measured}


def _masks(rows: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, p, generator=g) < 0.5


def probe(ops: tuple[str, ...] = tuple(candidates.OPS)) -> dict[str, float]:
    """Measure every candidate of ``ops`` (through ``candidates.IMPLS``, so a replaced one is what is
    timed) and the cost constants: ``{"op.kernel": rate, "sparse_s": s, ...}``. A candidate this
    torch lacks rates 0."""
    rates: dict[str, float] = {}
    impls = candidates.IMPLS
    if "gram" in ops:  # full: 512 rows of 2048 features (two column blocks), as the statistics pass
        x, G = _masks(512, 2048, 0), torch.zeros(2048, 2048)
        small, Gs = x[:32, :512].contiguous(), torch.zeros(512, 512)

        def gram(fn):
            return lambda full: ((lambda: fn(G, x)), 512 * 2048 * 2048 / 2.0) if full else \
                ((lambda: fn(Gs, small)), 32 * 512 * 512 / 2.0)
        rates.update({f"gram.{n}": r for n, r in _measure({n: gram(fn) for n, fn in impls["gram"].items()}).items()})
    if "colsum" in ops:
        xc = _masks(1024, 2048, 1)
        xs = xc[:128].contiguous()

        def colsum(fn):
            return lambda full: ((lambda: fn(xc)), float(xc.numel())) if full else ((lambda: fn(xs)), float(xs.numel()))
        rates.update({f"colsum.{n}": r for n, r in _measure({n: colsum(fn) for n, fn in impls["colsum"].items()}).items()})
    if "gemm" in ops:
        g = torch.Generator().manual_seed(2)
        a, b = torch.randn(512, 512, generator=g), torch.randn(512, 1024, generator=g)
        a1, b1 = a[:128, :128].contiguous(), b[:128, :256].contiguous()

        def gemm(fn):
            return lambda full: ((lambda: fn(a, b)), 2.0 * 512 * 512 * 1024) if full else \
                ((lambda: fn(a1, b1)), 2.0 * 128 * 128 * 256)
        rates.update({f"gemm.{n}": r for n, r in _measure({n: gemm(fn) for n, fn in impls["gemm"].items()}).items()})
    if "xty" in ops:  # full: 4096 rows (a read batch) of 2048 features and 128 targets
        xm, ym = _masks(4096, 2048, 4), torch.randn(4096, 128, generator=torch.Generator().manual_seed(5))
        xs, ys = xm[:256, :512].contiguous(), ym[:256, :32].contiguous()
        out, outs = torch.zeros(2048, 128, dtype=torch.float64), torch.zeros(512, 32, dtype=torch.float64)
        gemms = {n: rates.get(f"gemm.{n}", 0.0) for n in impls["gemm"]}
        best_gemm = impls["gemm"][max(gemms, key=gemms.get)] if any(gemms.values()) else candidates.gemm_torch

        def xty(name, fn):
            run = (lambda o, a, b: fn(o, a, b, best_gemm)) if name == "float" else fn
            return lambda full: ((lambda: run(out, xm, ym)), 4096.0 * 2048 * 128) if full else \
                ((lambda: run(outs, xs, ys)), 256.0 * 512 * 32)
        rates.update({f"xty.{n}": r for n, r in _measure({n: xty(n, fn) for n, fn in impls["xty"].items()}).items()})
    rates.update(_constants())
    return rates


def _constants() -> dict[str, float]:
    """The cost models' constants: CSR product, sub-Gram gather, batched matrix-vector product."""
    import warnings

    g = torch.Generator().manual_seed(3)
    p, m, T = 2048, 1024, 64
    at = torch.randn(p, m, generator=g)
    W = torch.randn(p, T, generator=g) * (torch.rand(p, T, generator=g) < 0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        Wt = W.T.to_sparse_csr()
        sparse = _best(lambda: torch.sparse.mm(Wt, at), 3) / (int((W != 0).sum()) * m)
    G = torch.randn(p, p, generator=g)
    S = torch.randperm(p, generator=g)[:512]
    gather = _best(lambda: G[S[:, None], S[None, :]], 3) / S.numel() ** 2
    # 64 MB of sub-Grams, past the caches, as at scale: the rate of streaming them from memory
    B = torch.randn(16, 1024, 1024, generator=g)
    v = torch.randn(16, 1024, 1, generator=g)
    matvec = _best(lambda: torch.bmm(B, v), 3) / B.numel()
    return {"sparse_s": sparse, "gather_s": gather, "matvec_s": matvec}

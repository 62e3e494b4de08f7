"""Shared by the benchmarks: the solver import, running one side in a fresh process, peak memory,
and the machine and kernels that every figure comes from (``machine_report``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# before numpy and torch load their thread pools, as under ``python -m datamodels_ml``: the short
# OpenBLAS/OpenMP spins (and the kernels' probe measures what the commands will run with)
import datamodels_ml  # noqa: E402,F401


def solver_lasso_path():
    """The package's ``lasso_path``, with this machine's kernels installed from the cache (as the
    ``regress`` command does), so that no probe is timed."""
    from datamodels_ml.kernel_cache import load
    from datamodels_ml.solvers.path import lasso_path

    load()
    return lasso_path


def machine_report(threads: int = 0):
    """Print the machine (CPU model, torch's CPU capability, cores and threads) and the kernels
    picked on it with their measured rates; returns the ``Kernels``. ``threads``: as the CLI's."""
    from datamodels_ml.cpus import set_threads
    from datamodels_ml.kernel_cache import load, machine

    if threads:
        set_threads(threads)
    k = load()
    print(f"machine: {machine()}")
    print(k.describe())
    return k


_FULL_RATES: dict[str, float] = {}


def full_gram_rates(k, rows: int = 4096, p: int = 4096) -> dict[str, float]:
    """Each Gram kernel's rate at a large size (the probe's is a small one, which understates the
    fast kernels), skipping those the probe found 20x slower than the best (an int8 product on an
    AVX2-only CPU would take minutes here). Measured once per process, the best of three runs."""
    if not _FULL_RATES:
        import time

        import torch

        from datamodels_ml.solvers.candidates import IMPLS

        x = torch.rand(rows, p, generator=torch.Generator().manual_seed(0)) < 0.5
        G = torch.zeros(p, p)
        top = max(k.rates.get(f"gram.{n}", 0.0) for n in IMPLS["gram"])
        for name, fn in IMPLS["gram"].items():
            if k.rates.get(f"gram.{name}", 0.0) * 20 < top:
                continue
            fn(G, x)  # warm
            best = float("inf")
            for _ in range(3):  # the best of three: the machine's rate, not a moment's
                t0 = time.perf_counter()
                fn(G, x)
                best = min(best, time.perf_counter() - t0)
            _FULL_RATES[name] = rows * p * p / 2 / best
    return dict(_FULL_RATES)


def best_full_rate(k) -> tuple[str, float]:
    """The fastest exact Gram kernel at a large size, and its rate (multiply-adds per second)."""
    rates = full_gram_rates(k)
    name = max(rates, key=rates.get)
    return name, rates[name]


def gram_floor(k, n: int, p: int) -> str:
    """The exact Gram's floor: ``n p² / 2`` multiply-adds at the best Gram rate measured at a large
    size on this machine."""
    name, rate = best_full_rate(k)
    return f"{n * p * p / 2 / rate:.2f} s ({n} x {p}²/2 multiply-adds at {rate:.3g}/s, {name}, 4096² blocks)"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(queue, fn, args, threads):
    if threads > 0:  # as the CLI's threads=: torch's and the BLAS pools, no adapting to load
        from datamodels_ml.cpus import set_threads

        set_threads(threads)
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


# what ``python -m datamodels_ml`` runs with: ``import datamodels_ml`` sets them before numpy loads
# OpenBLAS and torch its OpenMP runtime (a spawned child re-imports its script, numpy and torch
# first, so they must come from the parent)
OURS_ENV = {"OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4"),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}


def in_child(fn: Callable[..., Any], *args: Any, threads: int = 0, env: dict[str, str] | None = None) -> Any:
    """``fn(*args)`` in a fresh (spawned) process, so its peak memory is its own; returns its result.
    ``env``: variables set for that process only (e.g. :data:`OURS_ENV` for our side)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, threads))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"

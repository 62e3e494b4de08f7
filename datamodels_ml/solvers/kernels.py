"""Kernels chosen by the rate measured on the machine that runs them.

Where two exact kernels compute the same thing, which one is faster depends on the CPU, not on
whether a function exists: ``torch._int_mm`` on 0/1 int8 masks was 4x OpenBLAS's float32 ``syrk``
on an AVX-512 VNNI CPU and 80-200x *slower* on an AVX2-only CPU of the same machine kind. So every
such choice here is made from a short probe (tens of milliseconds) that times each candidate on
this process's threads:

- ``gram``: ``G += x'x`` for 0/1 masks on the CPU: ``int8`` (int32 counts), ``syrk`` (OpenBLAS,
  float), ``torch`` (torch's float ``addmm`` over upper column blocks). Rate: multiply-adds of the
  upper triangle per second.
- ``colsum``: column counts of 0/1 masks: ``bytes`` (byte sums of 255 rows at a time, exact in
  uint8, then added in int64), ``int8`` (a product with ones) or ``torch`` (a reduction; torch
  widens every byte to int64 along the first dimension: 47x slower than ``bytes`` on an AVX2 CPU).
- ``gemm``: dense float products on the CPU: ``openblas`` (numpy/scipy's) or ``torch`` (MKL).
  Rate: FLOP/s.
- ``xty``: ``X'Y`` of 0/1 masks and float targets for a float32 solve (the per-block target
  statistics): ``int8`` (each target column in 24-bit fixed point, three signed base-256 digits,
  exact int32 sums: three int8 products) or ``float`` (a float32 product by the faster ``gemm``).
  Rate: multiply-adds of ``X'Y`` per second.
- the cost models' constants: a CSR product's seconds per non-zero and row (``sparse_s``, for
  ``blas.sparse_pays``), a sub-Gram gather's seconds per entry (``gather_s``) and a batched
  matrix-vector product's (``matvec_s``), for screening's plan.

A long kernel calls :func:`between_blocks` between its column blocks: the hook its thread set with
:func:`stepping` runs there (the regression's statistics pass moves to every thread within its
first read batch, not after it, once MLflow's start no longer needs a core).

A kernel can be forced (tests, users) with ``op=name`` pairs: the ``DATAMODELS_KERNELS`` variable
(e.g. ``gram=syrk,gemm=torch``) or :func:`use`. Pure torch: timing only, no files; the command
layer (``kernel_cache``) keeps the measured rates per machine and installs them with :func:`use`.
Without that, the first solver call in a process probes once (about 0.6 s on an
AVX-512 CPU, 1-1.7 s on an AVX2-only one).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

__all__ = ["OPS", "Kernels", "IMPLS", "Unavailable", "probe", "choose", "parse_forced", "use", "active", "pick", "rate"]

# op -> its candidates, best first when rates tie
OPS: dict[str, tuple[str, ...]] = {
    "gram": ("int8", "syrk", "torch"),
    "colsum": ("bytes", "int8", "torch"),
    "gemm": ("openblas", "torch"),
    "xty": ("int8", "float"),
}
_UNITS = {"gram": "MAC/s", "colsum": "entries/s", "gemm": "FLOP/s", "xty": "MAC/s"}
# the cost models' constants: name -> default (seconds), used only when not measured
CONSTANTS = {"sparse_s": 1.5e-10, "gather_s": 3e-9, "matvec_s": 1e-9}
ENV = "DATAMODELS_KERNELS"
PROBE_VERSION = 5  # part of the cache key: rates measured by another probe are measured again
_TRIAL_S = 2.0  # a kernel whose small trial predicts more than this (seconds) at full size is not run at full size
# (the trials are too small to rank BLAS calls: OpenBLAS syrk's trial runs at 1/6 of torch's)
_CLOSE = 3.0  # after its first full-size call, a kernel this many times slower than the best is not timed again
# (the int8 Gram of an AVX2-only CPU, 8e8 MAC/s: 1.3 s per full call, three calls were 3.9 s of a 4.9 s probe)
_LOST = 20.0  # nor one whose trial is this many times slower than the best one's


@dataclass(frozen=True)
class Kernels:
    """The kernels in use: ``picks`` (op -> kernel), the ``rates`` they were picked from
    (``"op.kernel"`` -> rate, plus the cost constants), the ops ``forced`` by a setting, and where
    the rates came from (``source``: measured, cached, or a note)."""

    picks: dict[str, str]
    rates: dict[str, float]
    forced: tuple[str, ...] = ()
    source: str = "measured"
    threads: int = field(default_factory=torch.get_num_threads)

    def constant(self, name: str) -> float:
        value = self.rates.get(name)
        return float(value) if value and value > 0 else CONSTANTS[name]

    def describe(self) -> str:
        """One line: each op's kernel with its rate, and the runners-up in parentheses."""
        parts = []
        for op, names in OPS.items():
            pick = self.picks[op]
            others = [f"{n} {_fmt(self.rates.get(f'{op}.{n}'))}" for n in names if n != pick]
            how = " forced" if op in self.forced else ""
            parts.append(f"{op}={pick}{how} {_fmt(self.rates.get(f'{op}.{pick}'))} {_UNITS[op]}"
                         + (f" ({', '.join(others)})" if others else ""))
        return f"kernels ({self.source}, {self.threads} threads): " + "; ".join(parts)

    def params(self) -> dict[str, str]:
        """Flat ``kernel.<op>`` / ``kernel.<op>.rate`` entries (MLflow params)."""
        out = {f"kernel.{op}": self.picks[op] + (" (forced)" if op in self.forced else "") for op in OPS}
        out.update({f"kernel.{op}.rate": _fmt(self.rates.get(f"{op}.{self.picks[op]}")) for op in OPS})
        out["kernel.source"] = self.source
        out["kernel.threads"] = str(self.threads)
        return out


def _fmt(rate: float | None) -> str:
    return "unmeasured" if rate is None or rate != rate else f"{rate:.3g}"


# -- the candidates ---------------------------------------------------------------------------------
_BLOCK = 1024  # columns per upper-triangular block (as stats accumulates)


_LOCAL = threading.local()  # .hook: this thread's step between the blocks of a long kernel


@contextmanager
def stepping(hook: Callable[[], None]) -> Iterator[None]:
    """Run ``hook()`` between the column blocks of the long kernels this thread calls meanwhile."""
    before = getattr(_LOCAL, "hook", None)
    _LOCAL.hook = hook
    try:
        yield
    finally:
        _LOCAL.hook = before


def between_blocks() -> None:
    """Where a long kernel may pause: the hook this thread set with :func:`stepping`, if any."""
    hook = getattr(_LOCAL, "hook", None)
    if hook is not None:
        hook()


class Unavailable(RuntimeError):
    """This torch has no such kernel (raised before anything was written)."""


def gram_int8(G: torch.Tensor, x: torch.Tensor) -> None:
    """``G += x'x`` (upper column blocks) for 0/1 masks ``x`` [b, p] as int8 products, int32 counts.
    Raises :class:`Unavailable`, with ``G`` untouched, where torch refuses the product."""
    xi = x.view(torch.int8) if x.dtype in (torch.bool, torch.uint8) else x.to(torch.int8)
    xt = xi.T.contiguous()
    p = xi.shape[1]
    for j0 in range(0, p, _BLOCK):
        j1 = min(p, j0 + _BLOCK)
        try:
            counts = torch._int_mm(xt[:j1], xi[:, j0:j1].contiguous())
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            if j0 == 0:
                raise Unavailable(f"torch._int_mm: {exc}") from exc
            raise
        G[:j1, j0:j1] += counts
        between_blocks()


def gram_syrk(G: torch.Tensor, x: torch.Tensor) -> None:
    """``G += x'x`` (upper triangle) through OpenBLAS ``syrk`` in ``G``'s dtype."""
    from datamodels_ml.solvers.blas import syrk_upper_

    if not syrk_upper_(G, x.to(G.dtype), force=True):
        gram_torch(G, x)


def gram_torch(G: torch.Tensor, x: torch.Tensor) -> None:
    """``G += x'x`` (upper column blocks) with torch's ``addmm`` in ``G``'s dtype."""
    x = x.to(G.dtype)
    p = x.shape[1]
    for j0 in range(0, p, _BLOCK):
        j1 = min(p, j0 + _BLOCK)
        G[:j1, j0:j1].addmm_(x[:, :j1].T, x[:, j0:j1])
        between_blocks()


def colsum_int8(x: torch.Tensor) -> torch.Tensor:
    """``[p]`` float64 column counts of 0/1 masks ``x`` [b, p]: an int8 product with ones."""
    ones = torch.ones(32, x.shape[0], dtype=torch.int8)
    return torch._int_mm(ones, x.view(torch.int8) if x.dtype in (torch.bool, torch.uint8)
                         else x.to(torch.int8))[0].to(torch.float64)


_BYTE_ROWS = 255  # rows whose 0/1 bytes sum within a byte


def colsum_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[p]`` float64 column counts of 0/1 masks ``x`` [b, p]: the rows summed 255 at a time in
    bytes (a count of at most 255 is exact in uint8; torch vectorizes the reduction within a byte),
    then those partial counts in int64."""
    u = (x.view(torch.uint8) if x.dtype in (torch.bool, torch.uint8) else x.to(torch.uint8)).contiguous()
    b, p = u.shape
    m = b // _BYTE_ROWS
    out = torch.zeros(p, dtype=torch.int64)
    if m:
        out += u[: m * _BYTE_ROWS].view(m, _BYTE_ROWS, p).sum(1, dtype=torch.uint8).sum(0, dtype=torch.int64)
    if b > m * _BYTE_ROWS:
        out += u[m * _BYTE_ROWS :].sum(0, dtype=torch.uint8)
    return out.to(torch.float64)


def colsum_torch(x: torch.Tensor) -> torch.Tensor:
    return x.sum(0, dtype=torch.float64)


def gemm_openblas(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def gemm_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


_XTY_COLS = 256  # targets per int8 product of xty_int8 (its int32 result: 3 x 256 x p)
DIGITS_MAX = 127 * (1 + 256 + 65536)  # the largest |q| whose three signed base-256 digits lie in [-128, 127]
_OFFSET = 128 * (1 + 256 + 65536)  # q + _OFFSET: the same digits, each plus 128, as unsigned bytes


def xty_int8(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """``out += x'y`` (``out`` [p, T] float64) for 0/1 masks ``x`` [b, p] and finite targets ``y`` [b, T].

    Each column of ``y`` is rounded to a multiple of ``max|y_t| / DIGITS_MAX`` (23 bits and a sign:
    the resolution of float32 at the column's largest value) and written as three signed base-256
    digits; their int8 products with the masks are exact int32 sums (``b`` up to 2^24 rows), put
    together in float64. Raises :class:`Unavailable`, with ``out`` untouched, where torch refuses
    the product."""
    if sys.byteorder != "little":  # the digits are read as the low bytes of int32 values
        raise Unavailable("int8 digits of the targets: a little-endian CPU only")
    if x.shape[0] == 0:
        return
    xt = (x.view(torch.int8) if x.dtype in (torch.bool, torch.uint8) else x.to(torch.int8)).T
    y = y.to(torch.float64)
    for c0 in range(0, y.shape[1], _XTY_COLS):
        yc = y[:, c0 : c0 + _XTY_COLS]
        w = yc.shape[1]
        top = yc.abs().amax(0)
        step = torch.where(top > 0, top / DIGITS_MAX, torch.ones_like(top))
        # q + OFFSET in [0, 2^24): its three low bytes are the digits plus 128 (a byte's top bit flipped)
        u = torch.round(yc / step).clamp_(-DIGITS_MAX, DIGITS_MAX).add_(_OFFSET).to(torch.int32)  # clamp: subnormal steps
        digits = (u.view(torch.uint8).view(-1, w, 4)[:, :, :3] ^ 0x80).view(torch.int8).reshape(-1, 3 * w)
        try:
            counts = torch._int_mm(xt, digits).view(-1, w, 3)  # [p, w, 3] int32: target j's digit k
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            if c0 == 0:
                raise Unavailable(f"torch._int_mm: {exc}") from exc
            raise
        total = counts[:, :, 0].to(torch.float64)
        total.add_(counts[:, :, 1], alpha=256).add_(counts[:, :, 2], alpha=65536)
        out[:, c0 : c0 + w].addcmul_(total, step[None, :])


def xty_float(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gemm: Callable = gemm_torch) -> None:
    """``out += x'y`` (``out`` [p, T] float64) as one float32 product by ``gemm``."""
    out += gemm(x.to(torch.float32).T, y.to(torch.float32))


IMPLS: dict[str, dict[str, Callable]] = {
    "gram": {"int8": gram_int8, "syrk": gram_syrk, "torch": gram_torch},
    "colsum": {"bytes": colsum_bytes, "int8": colsum_int8, "torch": colsum_torch},
    "gemm": {"openblas": gemm_openblas, "torch": gemm_torch},
    "xty": {"int8": xty_int8, "float": xty_float},
}


# -- the probe --------------------------------------------------------------------------------------
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


def probe(ops: tuple[str, ...] = tuple(OPS)) -> dict[str, float]:
    """Measure every candidate of ``ops`` (through :data:`IMPLS`, so a replaced one is what is
    timed) and the cost constants: ``{"op.kernel": rate, "sparse_s": s, ...}``. A candidate this
    torch lacks rates 0."""
    rates: dict[str, float] = {}
    if "gram" in ops:  # full: 512 rows of 2048 features (two column blocks), as the statistics pass
        x, G = _masks(512, 2048, 0), torch.zeros(2048, 2048)
        small, Gs = x[:32, :512].contiguous(), torch.zeros(512, 512)

        def gram(fn):
            return lambda full: ((lambda: fn(G, x)), 512 * 2048 * 2048 / 2.0) if full else \
                ((lambda: fn(Gs, small)), 32 * 512 * 512 / 2.0)
        rates.update({f"gram.{n}": r for n, r in _measure({n: gram(fn) for n, fn in IMPLS["gram"].items()}).items()})
    if "colsum" in ops:
        xc = _masks(1024, 2048, 1)
        xs = xc[:128].contiguous()

        def colsum(fn):
            return lambda full: ((lambda: fn(xc)), float(xc.numel())) if full else ((lambda: fn(xs)), float(xs.numel()))
        rates.update({f"colsum.{n}": r for n, r in _measure({n: colsum(fn) for n, fn in IMPLS["colsum"].items()}).items()})
    if "gemm" in ops:
        g = torch.Generator().manual_seed(2)
        a, b = torch.randn(512, 512, generator=g), torch.randn(512, 1024, generator=g)
        a1, b1 = a[:128, :128].contiguous(), b[:128, :256].contiguous()

        def gemm(fn):
            return lambda full: ((lambda: fn(a, b)), 2.0 * 512 * 512 * 1024) if full else \
                ((lambda: fn(a1, b1)), 2.0 * 128 * 128 * 256)
        rates.update({f"gemm.{n}": r for n, r in _measure({n: gemm(fn) for n, fn in IMPLS["gemm"].items()}).items()})
    if "xty" in ops:  # full: 4096 rows (a read batch) of 2048 features and 128 targets
        xm, ym = _masks(4096, 2048, 4), torch.randn(4096, 128, generator=torch.Generator().manual_seed(5))
        xs, ys = xm[:256, :512].contiguous(), ym[:256, :32].contiguous()
        out, outs = torch.zeros(2048, 128, dtype=torch.float64), torch.zeros(512, 32, dtype=torch.float64)
        gemms = {n: rates.get(f"gemm.{n}", 0.0) for n in IMPLS["gemm"]}
        best_gemm = IMPLS["gemm"][max(gemms, key=gemms.get)] if any(gemms.values()) else gemm_torch

        def xty(name, fn):
            run = (lambda o, a, b: fn(o, a, b, best_gemm)) if name == "float" else fn
            return lambda full: ((lambda: run(out, xm, ym)), 4096.0 * 2048 * 128) if full else \
                ((lambda: run(outs, xs, ys)), 256.0 * 512 * 32)
        rates.update({f"xty.{n}": r for n, r in _measure({n: xty(n, fn) for n, fn in IMPLS["xty"].items()}).items()})
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


# -- the choice -------------------------------------------------------------------------------------
def parse_forced(text: str | None) -> dict[str, str]:
    """``"gram=syrk,gemm=torch"`` -> ``{"gram": "syrk", "gemm": "torch"}``; empty -> {}. Raises
    ValueError naming the op or kernel that does not exist."""
    out: dict[str, str] = {}
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        op, eq, name = (s.strip() for s in part.partition("="))
        if not eq or op not in OPS:
            raise ValueError(f"unknown kernel setting '{part}': give op=kernel with op one of {', '.join(OPS)}")
        if name not in OPS[op]:
            raise ValueError(f"unknown kernel '{name}' for {op}: one of {', '.join(OPS[op])}")
        out[op] = name
    return out


def choose(rates: dict[str, float], forced: dict[str, str] | None = None, *, source: str = "measured") -> Kernels:
    """The fastest candidate of each op by ``rates`` (ties: the first listed), except the ``forced``."""
    forced = dict(forced or {})
    picks = {}
    for op, names in OPS.items():
        if op in forced:
            picks[op] = forced[op]
            continue
        rated = [(rates.get(f"{op}.{n}", 0.0) or 0.0, -i, n) for i, n in enumerate(names)]
        picks[op] = max(rated)[2] if max(rated)[0] > 0 else names[-1]
    return Kernels(picks=picks, rates=dict(rates), forced=tuple(sorted(forced)), source=source)


_STATE: dict[str, object] = {"base": None, "env": None, "effective": None}


def use(kernels: Kernels | None) -> None:
    """Install ``kernels`` for this process (None: probe again at the next use)."""
    _STATE.update(base=kernels, env=None, effective=None)


def active() -> Kernels:
    """The kernels in use: the installed ones, else a probe now (once per process); either way
    with the ops that ``DATAMODELS_KERNELS`` names forced."""
    base = _STATE["base"]
    if base is None:
        base = choose(probe(), source="measured")
        _STATE.update(base=base, env=None, effective=None)
    env = os.environ.get(ENV, "")
    if _STATE["effective"] is None or _STATE["env"] != env:
        forced = parse_forced(env)
        eff = base if not forced else choose(base.rates, {**{op: base.picks[op] for op in base.forced}, **forced},
                                             source=base.source)
        _STATE.update(env=env, effective=eff)
    return _STATE["effective"]  # type: ignore[return-value]


def pick(op: str) -> str:
    """The kernel in use for ``op``."""
    return active().picks[op]


def rate(op: str, name: str | None = None) -> float:
    """The measured rate of ``op``'s kernel ``name`` (default: the one in use); 0 if unmeasured."""
    k = active()
    return float(k.rates.get(f"{op}.{name or k.picks[op]}", 0.0) or 0.0)

"""The exact kernels that compete for each operation of the solver on the CPU.

Each operation has candidates that compute the same result exactly; which is fastest depends on the
CPU (``solvers.probe`` times them, ``solvers.kernels`` picks by those rates):

- ``gram``: ``G += x'x`` for 0/1 masks: ``int8`` (int32 counts), ``syrk`` (OpenBLAS, float),
  ``torch`` (torch's float ``addmm`` over upper column blocks).
- ``colsum``: column counts of 0/1 masks: ``bytes`` (byte sums of 255 rows at a time, exact in
  uint8, then added in int64), ``int8`` (a product with ones) or ``torch`` (a reduction; torch
  widens every byte to int64 along the first dimension: 47x slower than ``bytes`` on an AVX2 CPU).
- ``gemm``: dense float products: ``openblas`` (numpy/scipy's) or ``torch`` (MKL).
- ``xty``: ``X'Y`` of 0/1 masks and float targets for a float32 solve: ``int8`` (each target column
  in 24-bit fixed point, three signed base-256 digits, exact int32 sums: three int8 products) or
  ``float`` (a float32 product by the faster ``gemm``).

:data:`IMPLS` maps each op's candidate names to the functions; callers go through it, so that a
test that replaces one replaces it everywhere. A long kernel calls :func:`between_blocks` between
its column blocks: the hook its thread set with :func:`stepping` runs there (the regression's
statistics pass moves to every thread within its first read batch, once MLflow's start no longer
needs a core). Pure torch.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["OPS", "IMPLS", "Unavailable", "stepping", "between_blocks", "DIGITS_MAX"]

# op -> its candidates, best first when rates tie
OPS: dict[str, tuple[str, ...]] = {
    "gram": ("int8", "syrk", "torch"),
    "colsum": ("bytes", "int8", "torch"),
    "gemm": ("openblas", "torch"),
    "xty": ("int8", "float"),
}
UNITS = {"gram": "MAC/s", "colsum": "entries/s", "gemm": "FLOP/s", "xty": "MAC/s"}

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

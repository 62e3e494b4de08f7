"""Dense products on the CPU through the BLAS that numpy and scipy ship (OpenBLAS).

PyTorch's CPU build multiplies with MKL, which on the AMD CPU measured here is slower than
OpenBLAS for the products the solver spends its time in (``benchmarks/bench_blas.py``, 2 cores):
the Gram ``X'X`` (a symmetric rank-k update, half the work of a general product) 2.4x and
``G @ W`` 2.0x (1.5x and 1.3x with this machine's ``OPENBLAS_CORETYPE=Haswell``).

Used where the BLAS calls come in long runs: the Gram's accumulation (``syrk_upper_``) and
``X'Y`` (``mm``) in the statistics pass. In the solver's iterations (``mm_iter``: FISTA's products
with a shared Gram, the gradients of the KKT check, the validation predictions) each product is
followed by torch's elementwise work on torch's own threads, and OpenBLAS's idle workers spin for
about 0.1 s after each call: alternating the two made a path up to 10x slower on a 2-core machine.
So ``mm_iter`` uses OpenBLAS only when its workers sleep promptly (``OPENBLAS_THREAD_TIMEOUT`` at
most 12, which ``import datamodels_ml`` sets to 4 when numpy is not loaded yet), and torch's
product otherwise. These helpers take and return torch tensors, sharing their memory with numpy
(no copies); on other devices, dtypes or layouts they fall back to torch. Whether OpenBLAS or torch
(MKL, often the faster one on Intel CPUs) multiplies is the ``gemm`` kernel that ``kernels`` picked
from their rates measured on this machine (``DATAMODELS_KERNELS=gemm=torch`` forces torch's).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from datamodels_ml import OPENBLAS_QUIET
from datamodels_ml.solvers import kernels

__all__ = ["mm", "mm_iter", "mm_rows", "mm_sparse", "csr_of_transpose", "sparse_pays", "syrk_upper_", "enabled"]

_NP = {torch.float32: np.float32, torch.float64: np.float64}


def enabled(*ts: Tensor, force: bool = False) -> bool:
    """Whether the OpenBLAS path applies to these tensors (CPU, float32/float64, one dtype) and is
    the ``gemm`` kernel in use (``force``: whichever is)."""
    if not force and kernels.pick("gemm") != "openblas":
        return False
    dt = ts[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dt and dt in _NP and not t.requires_grad for t in ts)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D): numpy's matmul (OpenBLAS gemm) on the CPU, torch's elsewhere."""
    if not enabled(a, b):
        return a @ b
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def mm_iter(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) inside an iteration that alternates with torch's elementwise work: OpenBLAS
    when its idle workers sleep promptly (see the module's docstring), torch's product otherwise."""
    if not OPENBLAS_QUIET:
        return a @ b
    return mm(a, b)


_SPARSE_CALL_S = 1e-3  # fixed cost of a sparse (CSR) product: the conversion and the call


def sparse_pays(nnz: int, rows: int, dense_inner: int, cols: int) -> bool:
    """Whether a ``[rows, p]`` matrix times a ``[p, cols]`` one with ``nnz`` non-zeros is faster as
    a sparse product than as a dense one over ``dense_inner`` of the ``p`` (CPU), by the rates
    measured on this machine (``kernels``: the CSR product's seconds per non-zero and row, the
    dense ``gemm`` kernel's FLOP/s; e.g. 1.5e-10 s and 4e11 FLOP/s on 2 AMD EPYC cores)."""
    k = kernels.active()
    dense = kernels.rate("gemm") or 4e11
    return k.constant("sparse_s") * nnz * rows + _SPARSE_CALL_S < 2.0 * rows * dense_inner * cols / dense


# torch's CSR times dense product indexes the dense operand with 32-bit offsets: past 2^31 entries
# (a Gram from p = 46,341 features) it reads out of bounds and crashes, so it gets row blocks
SPARSE_DENSE_LIMIT = 2**31 - 1


def csr_of_transpose(W: Tensor) -> Tensor:
    """``W.T`` ``[T, p]`` in sparse CSR form, from the non-zeros of a C-contiguous ``W`` ``[p, T]``:
    one row-major scan and a stable sort of the non-zeros by column (torch's own conversion of the
    transposed view walks it column by column: ~9x slower at p = 20k, T = 1300)."""
    p, T = W.shape
    f, t = W.nonzero(as_tuple=True)  # feature-major order
    v = W[f, t]
    t, order = torch.sort(t, stable=True)  # target-major, features ascending within a target
    crow = torch.zeros(T + 1, dtype=torch.int64, device=W.device)
    crow[1:] = torch.bincount(t, minlength=T).cumsum(0)
    return torch.sparse_csr_tensor(crow, f[order], v[order], (T, p))


def mm_sparse(at: Tensor, W: Tensor) -> Tensor:
    """``at.T @ W`` ``[m, T]`` for a C-contiguous ``at`` ``[p, m]`` and a mostly zero ``W``
    ``[p, T]``: torch's sparse CSR product ``(W' at)'``, which reads the rows of ``at`` at the
    non-zeros of ``W`` (``nnz · m`` work instead of ``p · m · T``), over blocks of rows of ``at``
    of at most ``SPARSE_DENSE_LIMIT`` entries each. Returned as a transposed view."""
    p, m = at.shape
    step = max(1, SPARSE_DENSE_LIMIT // max(m, 1))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products are all this uses
        warnings.simplefilter("ignore", UserWarning)
        if p <= step:
            return torch.sparse.mm(csr_of_transpose(W.contiguous()), at).T
        out = None
        for r0 in range(0, p, step):
            Wb = W[r0 : r0 + step]
            if not bool(Wb.any()):
                continue
            part = torch.sparse.mm(csr_of_transpose(Wb.contiguous()), at[r0 : r0 + step])
            out = part if out is None else out.add_(part)
        return (out if out is not None else torch.zeros(W.shape[1], m, dtype=W.dtype, device=W.device)).T


def mm_rows(at: Tensor, W: Tensor, *, symmetric: bool = False, rows: int = 1024) -> Tensor:
    """``at.T @ W`` ``[m, T]`` for a C-contiguous ``at`` ``[p, m]``, reading only the rows of ``at``
    at the non-zero rows ``A`` of ``W`` ``[p, T]``, by the cheapest form: a sparse product while
    ``W`` is sparse enough (CPU, ``sparse_pays``), the whole product when ``A`` is most rows, else
    the rows ``A``, ``rows`` at a time (converted to ``W``'s dtype). ``symmetric``: ``at`` equals
    its transpose (a Gram), so the whole product multiplies by it untransposed."""
    nz = W != 0
    A = nz.any(1).nonzero().squeeze(1)
    same = at.dtype == W.dtype
    if same and at.device.type == "cpu" and sparse_pays(int(torch.count_nonzero(nz)), at.shape[1], A.numel(),
                                                        W.shape[1]):
        return mm_sparse(at, W)
    if same and 3 * A.numel() >= at.shape[0]:  # most rows: the whole product, no copies
        return mm_iter(at if symmetric else at.T, W)
    out = torch.zeros(at.shape[1], W.shape[1], dtype=W.dtype, device=W.device)
    for s in range(0, A.numel(), rows):
        a = A[s : s + rows]
        out.add_(mm_iter(at.index_select(0, a).to(W.dtype).T, W[a]))
    return out


def syrk_upper_(G: Tensor, x: Tensor, *, force: bool = False) -> bool:
    """``G += x'x`` on the upper triangle of the C-contiguous ``G`` [p, p] (``x`` [b, p]), in place
    through BLAS ``syrk``; the lower triangle is left as it was. Returns False (and does nothing)
    when the BLAS path does not apply (``force``: whatever the ``gemm`` kernel in use); the caller
    then uses its own product."""
    if not enabled(G, x, force=force) or not G.is_contiguous() or G.ndim != 2 or G.shape[0] != G.shape[1]:
        return False
    from scipy.linalg import blas

    syrk = blas.ssyrk if G.dtype == torch.float32 else blas.dsyrk
    Gf = G.numpy().T  # Fortran view of the same memory; its lower triangle is G's upper one
    xf = np.asfortranarray(x.numpy().T) if not x.numpy().T.flags.f_contiguous else x.numpy().T  # [p, b]
    out = syrk(1.0, xf, beta=1.0, c=Gf, trans=0, lower=1, overwrite_c=1)
    if not np.shares_memory(out, Gf):  # f2py copied: write back (not expected for a contiguous G)
        Gf[...] = out
    return True

"""Per-column feature sets in batches: each column's set padded to a common length, and the
columns grouped by set size so that one large set does not pad all the others.

Used wherever one small problem per target is solved as a batch: the per-target sub-Grams of
screening, the exact finish on the support (``fista.support_newton``) and the least squares of
the relaxed lasso (``relax.support_ls``). The sets' sizes and emptiness (:func:`column_counts`,
:func:`columns_any`) are reductions over the features, down the columns of a ``[p, T]`` mask:
torch reduces a bool tensor along its first dimension 6-8x slower than along its last (p = 50k,
1469 targets: ``sum(0)`` 133-258 ms, ``any(0)`` 89-121 ms), so they go by the ``colsum`` kernel
picked by measured rate (byte sums 5.5 ms on an AVX2 CPU; an int8 product with ones 20 ms on an
AVX-512 one) and by a byte maximum (14-16 ms).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from datamodels_ml.solvers import candidates, kernels

__all__ = ["padded_support", "size_groups", "column_counts", "columns_any"]


def column_counts(S: Tensor) -> Tensor:
    """``[n]`` int64: the number of non-zero entries in each column of the 0/1 ``S`` [p, n] (bool,
    bytes, or any dtype holding only 0 and 1)."""
    name = kernels.pick("colsum")
    if S.device.type == "cpu" and S.shape[0] and S.shape[1]:  # the kernel the probe timed, whichever it is
        try:
            return candidates.IMPLS["colsum"][name](S.contiguous()).to(torch.int64)
        except (AttributeError, RuntimeError, NotImplementedError):  # this torch refuses the product
            pass
    return S.sum(0, dtype=torch.int64)


def columns_any(S: Tensor) -> Tensor:
    """``[n]`` bool: whether each column of the bool ``S`` [p, n] holds a True entry."""
    if S.shape[0] == 0:
        return torch.zeros(S.shape[1], dtype=torch.bool, device=S.device)
    return S.contiguous().view(torch.uint8).amax(0).bool()


def padded_support(S: Tensor, cap: int | None = None) -> tuple[Tensor, Tensor]:
    """``(idx [m, n], valid [m, n])`` for the sets ``S`` [p, n] (bool): column ``t`` lists its
    features first, in feature order, then padding (feature 0, ``valid`` False); ``m`` is the
    largest set, at most ``cap`` (a larger set keeps its first ``cap`` features)."""
    # the members in column-major order (column, then feature): a row-major scan (a scan of the
    # transposed view is ~3x slower) and a stable sort by column; the column counts from them
    feat, col = S.nonzero(as_tuple=True)
    col, order = torch.sort(col, stable=True)
    feat = feat[order]
    a = torch.bincount(col, minlength=S.shape[1])
    m = int(a.max()) if a.numel() else 0
    if cap is not None:
        m = min(m, cap)
    pos = torch.arange(col.numel(), device=S.device) - (a.cumsum(0) - a)[col]  # rank within the column
    keep = pos < m
    idx = torch.zeros(m, S.shape[1], dtype=torch.long, device=S.device)
    idx[pos[keep], col[keep]] = feat[keep]
    valid = torch.arange(m, device=S.device)[:, None] < a.clamp_max(m)[None, :]
    return idx, valid


def size_groups(sizes: Tensor, budget: float, spread: float = math.inf) -> list[Tensor]:
    """The columns in groups of similar set sizes (each group padded to its largest), as index
    tensors: ascending sizes, a new group when the size exceeds ``spread`` times the group's first
    or the group's padded copy (columns x largest size²) would pass ``budget`` entries."""
    order = torch.argsort(sizes, stable=True)
    sz = sizes[order].tolist()
    groups, start = [], 0
    for i in range(1, len(sz) + 1):
        if i == len(sz) or sz[i] > spread * max(sz[start], 1.0) or (i - start + 1) * sz[i] ** 2 > budget:
            groups.append(order[start:i])
            start = i
    return groups

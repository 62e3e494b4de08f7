"""Per-target sub-Grams ``G[S_t, S_t]`` gathered from a large Gram, a batch of targets at a time.

Screening solves each target on its own working set ``S_t``, so a path point gathers
``sum_t |S_t|²`` entries from the ``p x p`` Gram. At p = 50k the Gram is 10 GB and the sets are
random: gathered target by target, nearly every entry is its own cache miss (17-30 ns each on the
AMD EPYC measured). :func:`gather` reads them in the Gram's row order instead: the members
``(t, i)`` of all sets are sorted by feature ``i``, and a band of ``_BAND`` consecutive Gram rows
(12.8 MB at p = 50k) serves every member whose row lies in it, each member copying its row's
entries at its target's set with 32-bit offsets into the band. The lines of a row fetched for one
target serve the others that hold the same feature: 2-2.6x fewer nanoseconds per entry at
p = 40k (300 targets x 800 features: 16.8 -> 6.4 ns; 1000 x 200: 23.5 -> 9.7 ns), the same values.
Small batches and other devices gather directly (the sort would cost more than it saves).

:func:`subgram_batch` adds the validation part of a refit's Gram to the gathered training part.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["gather", "zero_padding_", "subgram_batch"]

_BAND = 256  # Gram rows read together by the row-ordered gather
_ROW_ORDER_ENTRIES = 2**20  # below this many entries a batch is gathered directly
_ROW_ORDER_P = 4096  # ... and below this many features (a Gram of 64 MB or less stays in the caches)
_BATCH_ENTRIES = 2**25  # validation entries gathered at a time for batched refit sub-Grams (128 MB float32)


def gather(gram: Tensor, idx: Tensor, valid: Tensor, dtype: torch.dtype, *, row_order: bool | None = None) -> Tensor:
    """``[B, m, m]`` sub-Grams ``gram[idx[b], idx[b]]`` in ``dtype``, contiguous, zero where ``valid``
    [B, m] is False (each row's valid entries first, as ``supports.padded_support`` makes them).

    ``row_order``: gather in the Gram's row order (see the module docstring); None picks it for
    CPU batches of at least ``_ROW_ORDER_ENTRIES`` entries from a Gram of at least ``_ROW_ORDER_P``
    features. Both orders give the same values."""
    idx = idx.contiguous()
    B, m = idx.shape
    p = gram.shape[0]
    if row_order is None:
        row_order = gram.device.type == "cpu" and p >= _ROW_ORDER_P and B * m * m >= _ROW_ORDER_ENTRIES
    if not row_order or B * m == 0:
        # indices given as a transposed view would lay the result out transposed, and every batched
        # product on it would then run several times slower: contiguous
        out = gram[idx[:, :, None], idx[:, None, :]].to(dtype).contiguous()
        return zero_padding_(out, valid)
    out = torch.empty(B * m, m, dtype=dtype, device=gram.device)
    t, a = valid.nonzero(as_tuple=True)  # the members: target t, position a in its set
    dest = t * m + a  # their rows in out
    feat, order = torch.sort(idx[t, a].to(torch.int32), stable=True)
    t, dest = t[order], dest[order]
    idx32 = idx.to(torch.int32)
    starts = torch.arange(0, p + _BAND, _BAND, dtype=torch.int32, device=gram.device)
    bounds = torch.searchsorted(feat, starts).tolist()
    for c in range(len(bounds) - 1):
        s, e = bounds[c], bounds[c + 1]
        if s == e:
            continue
        r0 = c * _BAND
        band = gram[r0 : r0 + _BAND].reshape(-1)  # a view: these rows are contiguous
        offsets = idx32[t[s:e]].add_(((feat[s:e] - r0) * p)[:, None])  # < _BAND * p: 32 bits suffice
        vals = band.index_select(0, offsets.view(-1)).view(e - s, m)
        out.index_copy_(0, dest[s:e], vals if vals.dtype == dtype else vals.to(dtype))
    return zero_padding_(out.view(B, m, m), valid)


def zero_padding_(out: Tensor, valid: Tensor) -> Tensor:
    """Zero the rows and columns of ``out`` [B, m, m] where ``valid`` [B, m] is False, in place. When
    each row of ``valid`` is a prefix (valid entries first, as ``padded_support`` makes them), only
    the padded tail of each block is written: no pass over all ``B m²`` entries."""
    B, m = valid.shape
    k = valid.sum(1)
    if B and bool((valid == (torch.arange(m, device=valid.device)[None, :] < k[:, None])).all()):
        for b, kb in enumerate(k.tolist()):
            if kb < m:
                out[b, kb:].zero_()
                out[b, :kb, kb:].zero_()
        return out
    return out.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0)


def subgram_batch(gram: Tensor, idx: Tensor, valid: Tensor, val_rows: Callable[[Tensor], Tensor], *, n_val: int,
                  dtype: torch.dtype, scale: float, val_scale: float, row_scale: Tensor | None = None,
                  rank1: Tensor | None = None, rank1_scale: float = 0.0) -> Tensor:
    """``[B, m, m]`` sub-Grams at the index rows ``idx`` [B, m] of a Gram with a validation part,
    zero where ``valid`` [B, m] is False (each row's valid entries first)::

        scale * r_i r_j gram[i, j] + val_scale * z_i'z_j + rank1_scale * e_i e_j

    with ``z_i`` the validation values of feature ``i``, ``val_rows(features)`` ([|features|,
    n_val]), ``r`` the optional ``row_scale`` and ``e`` the optional ``rank1``. The training part
    is :func:`gather`'s, the validation part one batched product per chunk of at most
    ``_BATCH_ENTRIES`` gathered validation entries (the refit's sub-Grams, for every target at
    once)."""
    idx = idx.contiguous()
    B, m = idx.shape
    out = gather(gram, idx, valid, dtype)
    if row_scale is not None:
        r = row_scale.to(dtype)[idx]
        out.mul_(r[:, :, None] * r[:, None, :])
    out.mul_(scale)
    step = max(1, _BATCH_ENTRIES // max(n_val * m, 1))
    for s in range(0, B, step):
        part = idx[s : s + step]
        z = val_rows(part.reshape(-1)).reshape(part.shape[0], m, n_val)  # [b, m, n_val], contiguous
        out[s : s + step].baddbmm_(z, z.transpose(1, 2), alpha=val_scale)
    if rank1 is not None:
        e = rank1.to(dtype)[idx]
        out.add_(e[:, :, None] * e[:, None, :], alpha=rank1_scale)
    return zero_padding_(out, valid)

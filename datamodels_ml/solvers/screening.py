"""Screening: solve each path point on a small working set of features, exactly.

Sequential strong rules (Tibshirani et al., JRSS-B 2012), tightened: at ``λ_k``, feature ``j`` of
target ``t`` is kept if ``|∇_j(w(λ_{k-1}))| >= max(2 λ_k - λ_{k-1}, 0.95 λ_k)`` or it is already
non-zero. FISTA then runs either on the union ``U`` of the kept sets (sub-Gram ``G[U, U]``, one
matrix product per iteration, each target restricted to its own set) or on one sub-Gram per target
``G[S_t, S_t]`` (padded, one batched matrix-vector product per iteration), whichever a cost model
says is faster (the union of 32 targets' sets at p = 6000 covers most features while each set has
a few hundred); when the union is too large to copy, on all features with the whole Gram (the same
product per iteration, and no KKT round). A KKT check on *all* features (``|c_j - G_j w| <= λ``
for the discarded ones) adds any violator and solves again only the targets that had one, so the
result is the unscreened solution. The full gradient costs ``|A| p T`` once per round (``A`` the
non-zero features). Every target keeps its own step size (FISTA's checked curvature, carried from
one path point to the next in ``curv``), so its result does not depend on the other targets of its
block.

The Gram is reached through an operator with ``block(idx)``, ``batch_block(idx, valid)`` and
``apply(W)`` (``G W`` for a sparse ``W``):
:class:`TrainGram` (the standardized training Gram held by FeatureStats) and :class:`RefitGram`
(train+val, formed on the fly from the training Gram and the validation masks).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from datamodels_ml.solvers import kernels
from datamodels_ml.solvers.blas import mm_rows
from datamodels_ml.solvers.fista import fista
from datamodels_ml.solvers.stats import FeatureStats
from datamodels_ml.solvers.subgrams import gather, subgram_batch
from datamodels_ml.solvers.supports import column_counts, columns_any, padded_support, size_groups

__all__ = ["GramOperator", "TrainGram", "RefitGram", "gradient", "solve_screened"]

_ROWS = 1024  # rows of the Gram gathered at a time
_KKT_SLACK = 1e-5  # relative slack of the KKT check (float rounding must not add features)
# the working set at λ_k: features whose gradient at the last solution is within 5% of λ_k (or the
# strong rule's 2 λ_k - λ_{k-1}, when tighter), and the non-zero ones. The strong rule alone keeps
# every feature above ~0.83 λ_k on a 30-point grid: past the validation optimum, 3x the features
# that end up non-zero (9x the sub-Gram entries); the KKT check adds the few that were left out,
# and only the targets that had one are solved again
_WORKING = 0.95
# cost model of a path point: _ITERS iterations; a float32 matmul at half the ``gemm`` kernel's
# measured rate (elementwise work included: 2e11 effective FLOP/s on 2 AMD EPYC cores, 5k sparse
# benchmark); a batched matrix-vector product (streaming sub-Grams larger than the caches) and a
# sub-Gram's gather at their measured seconds per entry (``kernels``: ~0.6 ns and ~7 ns there);
# copying the union's ~2 ns per entry; ~0.5 ms of small tensor operations per FISTA iteration of
# each group
_ITERS = 7
_COPY_S, _GROUP_S = 2e-9, 5e-4
_SPREAD = 1.5  # a batched group's largest set is at most this times its smallest
_COPY_BUDGET = 0.125  # sub-Gram copies: at most 0.125 p² entries (0.5 byte per p² in float32)


class GramOperator(Protocol):
    """Access to a standardized ``p x p`` Gram matrix in the working dtype."""

    n_features: int

    def block(self, idx: Tensor) -> Tensor | Callable[[Tensor], Tensor]: ...  # [|idx|, |idx|] or its product

    def batch_block(self, idx: Tensor, valid: Tensor) -> Tensor: ...  # [B, m, m]

    def apply(self, W: Tensor) -> Tensor: ...  # G W [p, T], W sparse


class TrainGram:
    """The standardized training Gram of ``stats``, in ``dtype``."""

    def __init__(self, stats: FeatureStats, dtype: torch.dtype):
        if stats.gram is None:
            raise ValueError("these FeatureStats were built without the Gram (gram=False)")
        self.G, self.dtype, self.n_features = stats.gram, dtype, stats.n_features

    def apply(self, W: Tensor) -> Tensor:
        return _train_apply(self.G, W, self.dtype)

    def batch_block(self, idx: Tensor, valid: Tensor) -> Tensor:
        """``[B, m, m]`` sub-Grams ``G[idx[b], idx[b]]``, zero where ``valid`` [B, m] is False, contiguous
        (:func:`~datamodels_ml.solvers.subgrams.gather`)."""
        return gather(self.G, idx, valid, self.dtype)

    def block(self, idx: Tensor) -> Tensor:
        if idx.numel() == self.n_features and self.G.dtype == self.dtype:  # all features: no copy
            return self.G
        out = torch.empty(idx.numel(), idx.numel(), dtype=self.dtype, device=self.G.device)
        for s in range(0, idx.numel(), _ROWS):
            out[s : s + _ROWS] = self.G[idx[s : s + _ROWS, None], idx[None, :]]  # |S|² reads, not |S| p
        return out


class RefitGram:
    """``(n_t G_t + Zv'Zv) / (n_t + n_v) - zbar zbar'`` (the last term with an intercept): the
    standardized Gram of train+val rows (train mean/std), never formed as a whole."""

    def __init__(self, stats: FeatureStats, dtype: torch.dtype, zbar: Tensor | None):
        if stats.gram is None or stats.x_val is None:
            raise ValueError("these FeatureStats were built without the Gram (gram=False)")
        self.stats, self.dtype, self.n_features = stats, dtype, stats.n_features
        self.N = stats.n_train + stats.n_val
        self.zbar = None if zbar is None else zbar.to(dtype)

    def _product(self, y: Tensor) -> Tensor:
        """``G_all y`` for ``y`` [p, T]: ``p² T + 2 n_val p T`` flops, no ``p x p`` temporary."""
        st = self.stats
        out = (st.gram.to(self.dtype) @ y).mul_(st.n_train / self.N)
        zy = torch.zeros(st.n_val, y.shape[1], dtype=self.dtype, device=y.device)
        for s in range(0, self.n_features, 4 * _ROWS):
            zy.addmm_(st.z_val(slice(s, s + 4 * _ROWS), self.dtype), y[s : s + 4 * _ROWS])
        for s in range(0, self.n_features, 4 * _ROWS):
            out[s : s + 4 * _ROWS].addmm_(st.z_val(slice(s, s + 4 * _ROWS), self.dtype).T, zy, alpha=1.0 / self.N)
        if self.zbar is not None:
            out.sub_(self.zbar[:, None] * (self.zbar @ y)[None, :])
        return out

    def apply(self, W: Tensor) -> Tensor:
        """``G_all W`` from the non-zero rows of ``W`` only: ``nnz(W) (p + n_val) + n_val p T``."""
        st = self.stats
        out = _train_apply(st.gram, W, self.dtype).mul_(st.n_train / self.N)
        A = (W != 0).any(1).nonzero().squeeze(1)
        zw = torch.zeros(st.n_val, W.shape[1], dtype=self.dtype, device=W.device)  # Zv W, sparse while W is
        for s in range(0, A.numel(), 4 * _ROWS):
            a = A[s : s + 4 * _ROWS]
            zw.add_(mm_rows(st.val_rows(a, self.dtype), W[a], rows=a.numel()))
        for s in range(0, self.n_features, 4 * _ROWS):
            out[s : s + 4 * _ROWS].addmm_(st.z_val(slice(s, s + 4 * _ROWS), self.dtype).T, zw, alpha=1.0 / self.N)
        if self.zbar is not None:
            out.sub_(self.zbar[:, None] * (self.zbar[A] @ W[A])[None, :])
        return out

    def batch_block(self, idx: Tensor, valid: Tensor) -> Tensor:
        """``[B, m, m]`` sub-Grams, zero where ``valid`` [B, m] is False (:func:`subgram_batch`)."""
        st = self.stats
        return subgram_batch(st.gram, idx, valid, lambda cols: st.val_rows(cols, self.dtype), n_val=st.n_val,
                             dtype=self.dtype, scale=st.n_train / self.N, val_scale=1.0 / self.N,
                             rank1=self.zbar, rank1_scale=-1.0)

    def block(self, idx: Tensor) -> Tensor | Callable[[Tensor], Tensor]:
        if idx.numel() == self.n_features and idx.numel() ** 2 > copy_budget(self.n_features):
            return self._product  # all features of a large Gram: its product, never the matrix
        st = self.stats
        zi = st.z_val(idx, self.dtype)  # [n_val, |idx|], once
        out = torch.empty(idx.numel(), idx.numel(), dtype=self.dtype, device=st.gram.device)
        for s in range(0, idx.numel(), _ROWS):
            r = idx[s : s + _ROWS]
            blk = st.gram[r[:, None], idx[None, :]].to(self.dtype).mul_(st.n_train / self.N)
            blk.addmm_(zi[:, s : s + _ROWS].T, zi, alpha=1.0 / self.N)
            if self.zbar is not None:
                blk.sub_(self.zbar[r, None] * self.zbar[None, idx])
            out[s : s + _ROWS] = blk
        return out


def _train_apply(G: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """``G W`` reading only the rows of ``G`` (symmetric) at the non-zero rows of ``W``
    (``blas.mm_rows``: sparse, whole or gathered, whichever is cheapest)."""
    return mm_rows(G, W.to(dtype), symmetric=True, rows=_ROWS)


def gradient(op: GramOperator, c: Tensor, W: Tensor) -> Tensor:
    """``c - G W`` ``[p, T]`` for all features, reading only the Gram rows of non-zero features."""
    return c - op.apply(W)


def _solve_set(op, S, c, lam, W, nulldev, var, tol, max_iter, allowed, on_iter, curv, cols):
    """FISTA on the features ``S`` (one sub-Gram for all the given columns), each column with its
    own step, started from ``curv`` (global columns ``cols``) and stored back there."""
    Gs = op.block(S)
    Ws, wGw, it, L, GWs = fista(Gs, c[S], lam, W[S], L=_start_L(curv, cols, c), nulldev=nulldev, var=var[S],
                                tol=tol, max_iter=max_iter, allowed=allowed, on_iter=on_iter)
    _keep_L(curv, cols, L)
    return Ws, wGw, it, GWs


def _solve_batched(op, keep, c, lam, W, nulldev, var, tol, max_iter, on_iter, curv, ids, cols, out):
    """FISTA with one sub-Gram per column, ``G[S_t, S_t]``, padded to the largest ``|S_t|`` and
    multiplied as one batch, for the columns ``cols`` of ``keep``/``c``/``W`` [p, Ta] (read in
    place: no copies of their columns; ``ids``: their global columns, for ``curv``); the solutions
    go into the same columns of ``out`` (zero there). Returns ``(wGw, iters)``."""
    Tg = cols.numel()
    idx, valid = padded_support(keep[:, cols])  # [m, Tg]: each column's kept features, then padding
    m = idx.shape[0]
    Gb = op.batch_block(idx.T, valid.T)  # [Tg, m, m], zero outside the valid block
    tcol = cols[None, :].expand(m, Tg)
    Wb, wGw, it, L, _ = fista(Gb, c[idx, tcol], lam[cols], W[idx, tcol], L=_start_L(curv, ids[cols], c),
                              nulldev=nulldev[cols], var=var[idx], tol=tol, max_iter=max_iter, allowed=valid,
                              on_iter=on_iter)
    _keep_L(curv, ids[cols], L)
    out[idx[valid], tcol[valid]] = Wb[valid]
    return wGw, it


def _start_L(curv: Tensor | None, cols: Tensor, c: Tensor) -> Tensor:
    """Each column's starting curvature: its last one, or 1 (the diagonal of a standardized Gram,
    a lower bound of its top eigenvalue) the first time."""
    if curv is None:
        return torch.ones(cols.numel(), dtype=c.dtype, device=c.device)
    return curv[cols].to(c.dtype)


def _keep_L(curv: Tensor | None, cols: Tensor, L: Tensor) -> None:
    if curv is not None:
        curv[cols] = L.to(curv.dtype)


def copy_budget(p: int) -> float:
    """Entries of the sub-Gram copies allowed at once: 0.125 p² (0.5 byte per p² in float32)."""
    return max(_COPY_BUDGET * p * p, 2.0**24)


def _plan(sizes: Tensor, n_union: int, p: int) -> tuple[str, list[Tensor]]:
    """``("batched", groups)`` (per-target sub-Grams, in ``groups`` of targets of similar set sizes
    whose copies fit the budget), ``("union", [])`` (a copy of ``G[U, U]``) or ``("full", [])``
    (the whole Gram, on all features): the cheapest path point by the cost model (copies, then
    ``_ITERS`` iterations), with copies within ``_COPY_BUDGET`` entries (0.5 byte per p² in float32).
    A batched group pays for gathering its padded sub-Grams, their matrix-vector products and a
    fixed cost per iteration (its own FISTA loop)."""
    budget = copy_budget(p)
    k = kernels.active()
    matmul_flops = 0.5 * (kernels.rate("gemm") or 4e11)
    matvec_s, gather_s = k.constant("matvec_s"), k.constant("gather_s")
    Ta = sizes.numel()
    union_fits = float(n_union) ** 2 <= budget
    n = n_union if union_fits else p
    union = (_COPY_S * n * n if union_fits else 0.0) + _ITERS * (2.0 * n * n * Ta / matmul_flops + _GROUP_S)
    if Ta > 1 and float(sizes.max()) ** 2 <= budget:
        groups = size_groups(sizes, budget, spread=_SPREAD)
        batched = 0.0
        for g in groups:
            entries = g.numel() * float(sizes[g].max()) ** 2
            batched += gather_s * entries + _ITERS * (matvec_s * entries + _GROUP_S)
        if batched < union:
            return "batched", groups
    return ("union" if union_fits else "full"), []


def _solve_round(op, keep, c, lam, W, nulldev, var, tol, max_iter, on_iter, curv, ids):
    """One solve of the columns of ``keep`` [p, Ta] on their kept sets, by the plan the cost model
    picks. Returns ``(W [p, Ta], wGw [Ta], iterations, G W)``; ``G W`` only when solved on all
    features (the "full" plan, exact without a KKT round), else None."""
    p = c.shape[0]
    U = keep.any(1).nonzero().squeeze(1)
    wGw = torch.zeros_like(lam)
    Wn = torch.zeros_like(W)
    if U.numel() == 0:
        return Wn, wGw, 0, None
    plan = _plan(column_counts(keep).to(torch.float64), U.numel(), p)
    if plan[0] == "batched":
        most = 0
        for sl in plan[1]:
            wGw[sl], it = _solve_batched(op, keep, c, lam, W, nulldev, var, tol, max_iter, on_iter, curv, ids, sl, Wn)
            most = max(most, it)
        return Wn, wGw, most, None
    if plan[0] == "full":  # the working sets cover most features: solve on all of them, with the
        # Gram itself (the same product per iteration as masked)
        Wn, wGw, it, GW = _solve_set(op, torch.arange(p, device=c.device), c, lam, W, nulldev, var, tol,
                                     max_iter, None, on_iter, curv, ids)
        return Wn, wGw, it, GW
    allowed = None if bool(keep[U].all()) else keep[U]
    Ws, wGw, it, _ = _solve_set(op, U, c, lam, W, nulldev, var, tol, max_iter, allowed, on_iter, curv, ids)
    Wn[U] = Ws
    return Wn, wGw, it, None


def solve_screened(
    op: GramOperator,
    c: Tensor,
    lam: Tensor,
    lam_prev: Tensor,
    W: Tensor,
    grad: Tensor,
    *,
    nulldev: Tensor,
    var: Tensor,
    tol: float,
    max_iter: int,
    screen: bool = True,
    on_iter: Callable[[int, int], None] | None = None,
    curv: Tensor | None = None,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Solve ``min_w 1/2 w'Gw - c'w + λ|w|_1`` per column at one path point, with screening.

    Shapes: c/W/grad [p, Ta] (``grad = c - G W`` at the warm start ``W``), lam/lam_prev/nulldev
    [Ta], var [p]. ``screen=False`` solves on all features (the reference). ``curv``: [T] each target's
    FISTA curvature, kept by the caller across calls and updated in place (warm starts);
    ``ids`` [Ta]: the global column of each column in it (default: all, in order).

    The kept sets are solved together on their union (one matrix product per iteration, each
    target restricted to its own set) or each on its own sub-Gram ``G[S_t, S_t]`` (one batched
    matrix-vector product), whichever the cost model says is faster.
    Returns ``(W [p, Ta], wGw [Ta], grad [p, Ta] at the solution, iterations)``.
    """
    p, Ta = c.shape
    ids = torch.arange(Ta, device=c.device) if ids is None else ids
    if screen:
        thr = torch.maximum(2 * lam - lam_prev, _WORKING * lam)  # the strong rule, tightened
        keep = (grad.abs() >= thr[None, :]) | (W != 0)
    else:
        keep = torch.ones_like(W, dtype=torch.bool)
    its = 0
    todo = None  # the columns solved in this round: all (read in place), then those with violators
    while True:
        cols = (lambda x: x) if todo is None else (lambda x: x[:, todo])
        vec = (lambda x: x) if todo is None else (lambda x: x[todo])
        Wt, wg, it, GW = _solve_round(op, cols(keep), cols(c), vec(lam), cols(W), vec(nulldev), var, tol, max_iter,
                                      on_iter, curv, vec(ids))
        its += it
        # solved on all features ("full"): exact, and the gradient comes with it
        g = cols(c) - GW if GW is not None else gradient(op, cols(c), Wt)
        if todo is None:  # new tensors: the caller's W and grad are left as they were
            W, grad, wGw = Wt, g, wg
        else:
            W[:, todo], grad[:, todo], wGw[todo] = Wt, g, wg
        kept = cols(keep)
        if GW is not None or not screen or bool(kept.all()):
            break
        viol = (g.abs() > vec(lam)[None, :] * (1 + _KKT_SLACK)) & ~kept
        if not bool(viol.any()):
            break
        if todo is None:
            keep |= viol
            todo = columns_any(viol).nonzero().squeeze(1)  # the others already pass the check: not solved again
        else:
            keep[:, todo] |= viol
            todo = todo[columns_any(viol)]
    return W, wGw, grad, its

"""Sufficient statistics of the masks and of one block of targets, built to scale.

:func:`feature_stats` reads the masks ``X`` once (train and val sources) and keeps what every target
block shares: the feature means/stds of the training rows, the *standardized* training Gram
``G = Z'Z / n`` (``Z = (X - mean) / std``) and the validation masks in compact form (uint8 when
binary) from which the validation predictions and the train+val Gram of the refit are formed:
``G_all = (n_t G + Zv'Zv) / (n_t + n_v)`` (minus the mean outer product with an intercept), with no
second pass over the training rows and no second ``p x p`` matrix.

The Gram is built in one streaming pass *in place*: raw counts ``X'X`` are accumulated into a single
``p x p`` buffer, upper-triangular column blocks only (half the flops of a full product), mirrored
at the end and then centered and scaled in place, ``G = D^-1 (X'X / n - m m') D^-1``, row chunk by
row chunk in float64. Peak memory: ``4 p^2`` bytes (float32) + one batch + one chunk.

On the CPU, 0/1 masks are multiplied by the ``gram`` kernel that ``kernels`` picked from rates
measured on this machine: int8 with int32 counts (``torch._int_mm``: 4x OpenBLAS's float32 ``syrk``
on an AVX-512 VNNI CPU, 80-200x slower than it on an AVX2-only one), ``syrk``, or torch's product.
All three give the same integer counts.

Precision: 0/1 (bool/uint8) masks give integer counts, exact in float32 up to 2^24 rows; the scaled
Gram then carries float32 rounding (relative 6e-8 per entry), as before. Non-binary masks are
accumulated in the working dtype (float32: relative error ~1e-7 * sqrt(n) per entry; pass
``dtype=torch.float64`` for float64 accumulation at 8 bytes per entry). On CUDA, binary masks are
multiplied as float16 in chunks of at most 2048 rows (every partial count exact in float16) and
accumulated in float32 (UNTESTED: no GPU was available when it was written).

:func:`target_stats` is the per-block pass: raw sums ``X'y``, ``Σy``, ``Σy²`` (standardized by
:class:`TargetStats` with any mean/std) and, for the validation source, ``Y`` itself
(``n_val x T``); its feature sums also give the moments for the streaming method, so that SAGA
reads the data once before its epochs. For a float32 solve on the CPU its ``X'y`` of 0/1 masks is
the ``xty`` kernel picked by measured rate: int8 products of each target column's 24-bit
fixed-point digits (three int8 products, exact int32 sums: 2x a float32 product per multiply-add
on an AVX-512 VNNI CPU) or a float32 product; both round like float32 data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from datamodels_ml.solvers import candidates, kernels
from datamodels_ml.solvers.blas import mm
from datamodels_ml.solvers.sources import BatchSource
from datamodels_ml.solvers.supports import column_counts

FLOAT_BYTES = 2**28  # target_stats: the most of a 0/1 batch converted to floats at once (256 MB)

__all__ = ["FeatureStats", "TargetStats", "feature_stats", "target_stats", "moments", "add_gram"]

_BLOCK = 1024  # columns per block of the upper-triangular Gram accumulation
_CHUNK = 256  # rows per chunk of the in-place standardization / per Zv chunk
_TILE = 2048  # columns per tile of the in-place standardization (256 x 2048 float64: 4 MB; >= _CHUNK)
_F16_ROWS = 2048  # float16 holds every integer up to 2048 exactly


@dataclass
class FeatureStats:
    """What :func:`feature_stats` keeps for all target blocks (``p`` features).

    Attributes:
        n_train: training rows.
        mean: ``[p]`` float64 feature means of the training rows.
        std: ``[p]`` float64 population stds (1 for a feature constant on the training rows).
        nonconst: ``[p]`` bool, the features that vary on the training rows.
        gram: ``[p, p]`` standardized training Gram ``Z'Z / n_train`` (rows/cols of constant
            features are 0), or None when built without it (streaming method).
        x_val: ``[n_val, p]`` validation masks in row order of the val source (uint8 when binary,
            else the working dtype), or None without the Gram.
        binary: whether every mask value seen was 0 or 1.
    """

    n_train: int
    n_val: int
    mean: Tensor
    std: Tensor
    nonconst: Tensor
    gram: Tensor | None
    x_val: Tensor | None
    binary: bool
    _x_val_t: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def inv_std(self) -> Tensor:
        """``[p]`` float64 ``1 / std``, 0 for constant features (they stay identically zero)."""
        return torch.where(self.nonconst, 1.0 / self.std, torch.zeros_like(self.std))

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors of this object."""
        ts = [self.mean, self.std, self.nonconst, self.gram, self.x_val]
        return int(sum(t.numel() * t.element_size() for t in ts if t is not None))

    def z_val(self, cols: Tensor | slice | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Standardized validation rows ``[n_val, |cols|]`` (train mean/std) in ``dtype``."""
        if self.x_val is None:
            raise ValueError("these FeatureStats were built without the validation rows (gram=False)")
        dtype = dtype or (self.gram.dtype if self.gram is not None else torch.float32)
        cols = slice(None) if cols is None else cols
        x = self.x_val[:, cols].to(dtype)
        std = self.std[cols]
        inv = torch.where(self.nonconst[cols], 1.0 / std, torch.zeros_like(std))  # of these columns only
        return (x - self.mean[cols].to(dtype)) * inv.to(dtype)

    @property
    def x_val_t(self) -> Tensor:
        """``[p, n_val]`` the validation masks transposed (made once, on first use): a feature's
        validation values are one contiguous row, so gathering the features of a working set
        reads rows instead of one byte in every row of ``x_val``."""
        if self.x_val is None:
            raise ValueError("these FeatureStats were built without the validation rows (gram=False)")
        if self._x_val_t is None:
            self._x_val_t = self.x_val.T.contiguous()
        return self._x_val_t

    def val_rows(self, idx: Tensor, dtype: torch.dtype, mean: Tensor | None = None,
                 inv: Tensor | None = None) -> Tensor:
        """The validation values of the features ``idx`` as rows ``[|idx|, n_val]`` in ``dtype``,
        standardized with ``mean``/``inv`` (``[p]``; default: the training mean and ``inv_std``)."""
        mean = self.mean if mean is None else mean
        inv = self.inv_std if inv is None else inv
        x = self.x_val_t[idx].to(dtype)
        return x.sub_(mean[idx, None].to(dtype)).mul_(inv[idx, None].to(dtype))


@dataclass
class TargetStats:
    """Raw sums of one source over its rows (float64): ``sx``/``sxx`` ``[p]`` (features),
    ``sxy = X'y`` ``[p, T]``, ``sy``/``syy`` ``[T]``, and ``Y`` ``[n, T]`` itself when asked (the
    validation rows). Standardized quantities come from :meth:`zty`, :meth:`zbar`, :meth:`quad`."""

    n: int
    sx: Tensor
    sxx: Tensor
    sxy: Tensor
    sy: Tensor
    syy: Tensor
    Y: Tensor | None = None

    @property
    def ybar(self) -> Tensor:
        return self.sy / self.n

    @property
    def yy(self) -> Tensor:
        """Mean square of ``y`` ``[T]``."""
        return self.syy / self.n

    def zty(self, mean: Tensor, inv_std: Tensor) -> Tensor:
        """``Z'y / n`` ``[p, T]`` with ``Z = (X - mean) * inv_std``."""
        return (self.sxy - mean[:, None] * self.sy[None, :]) * inv_std[:, None] / self.n

    def zbar(self, mean: Tensor, inv_std: Tensor) -> Tensor:
        """Mean of the rows of ``Z`` ``[p]``."""
        return (self.sx / self.n - mean) * inv_std

    def quad(self, mean: Tensor, inv_std: Tensor, fit_intercept: bool) -> tuple[Tensor, Tensor]:
        """``(c [p, T], nulldev [T])``: the linear term and the null deviance per row."""
        if fit_intercept:
            c = self.zty(mean, inv_std) - self.zbar(mean, inv_std)[:, None] * self.ybar[None, :]
            return c, (self.yy - self.ybar**2).clamp_min(0)
        return self.zty(mean, inv_std), self.yy


def moments(n: int, sx: Tensor, sxx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Train mean [p], std [p] (1 for constant columns) and the non-constant indicator [p]."""
    mean = sx / n
    var = (sxx / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    nonconst = std > 1e-7 * (1 + mean.abs())
    std = torch.where(nonconst, std, torch.ones_like(std))
    return mean, std, nonconst


def _is_binary(xb: Tensor) -> bool:
    if xb.dtype == torch.bool:
        return True
    if xb.numel() == 0:
        return True
    return bool(((xb == 0) | (xb == 1)).all())


def _accumulate_half(G: Tensor, x: Tensor) -> None:
    """``G += x'x`` on the upper-triangular column blocks of the float32 ``G`` for float16 0/1 masks
    ``x`` [b, p] (CUDA, UNTESTED): products of <= 2048 rows are exact integer counts in float16."""
    p = x.shape[1]
    for r0 in range(0, x.shape[0], _F16_ROWS):
        xh = x[r0 : r0 + _F16_ROWS]
        for j0 in range(0, p, _BLOCK):
            j1 = min(p, j0 + _BLOCK)
            G[:j1, j0:j1] += (xh[:, :j1].T @ xh[:, j0:j1]).to(G.dtype)


def _float_gram_kernel() -> str:
    """The ``gram`` kernel for float data: the one in use, or (int8 picked) the faster float one."""
    name = kernels.pick("gram")
    if name != "int8":
        return name
    return "syrk" if kernels.rate("gram", "syrk") >= kernels.rate("gram", "torch") else "torch"


def add_gram(G: Tensor, xb: Tensor, *, binary: bool | None = None) -> None:
    """``G += x'x`` on the upper-triangular column blocks of ``G`` [p, p] (the lower triangle is
    filled by the final mirror), for a batch ``xb`` [b, p], by the fastest exact path: for 0/1 masks
    on the CPU the ``gram`` kernel picked by measured rate (``kernels``: int8 counts, ``syrk`` or
    torch's product), as float16 on CUDA (float32 ``G``); otherwise in ``G``'s dtype (on the CPU
    the faster float ``gram`` kernel, elsewhere torch's product). ``binary``: whether ``xb`` holds
    only 0/1 (None: checked here)."""
    binary = _is_binary(xb) if binary is None else binary
    cpu = G.device.type == "cpu"
    if binary and cpu and kernels.pick("gram") == "int8" and _int8_counts(G, xb):
        return
    if binary and G.device.type == "cuda" and G.dtype == torch.float32:
        _accumulate_half(G, xb.to(torch.float16))
        return
    candidates.IMPLS["gram"][_float_gram_kernel() if cpu else "torch"](G, xb)  # in G's dtype


def _int8_counts(G: Tensor, xb: Tensor) -> bool:
    """``G += x'x`` for 0/1 masks ``xb`` [b, p] on the CPU with the ``int8`` kernel. Returns False
    (nothing done) where this torch refuses the product."""
    try:
        candidates.IMPLS["gram"]["int8"](G, xb)
    except candidates.Unavailable:
        return False
    return True


def _add_binary_xty(sxy: Tensor, xb: Tensor, yc: Tensor, dtype: torch.dtype) -> None:
    """``sxy += xb'yc`` (float64 [p, T]) for 0/1 masks: in float64 for a float64 solve; for a lower precision
    on the CPU by the ``xty`` kernel picked by measured rate (int8 products of the targets' 24-bit
    fixed-point digits, or a ``dtype`` product), elsewhere a ``dtype`` product, by row chunks of at
    most ``FLOAT_BYTES`` as floats: a read batch of bytes may be larger than its float copy could be."""
    if (dtype != torch.float64 and xb.device.type == "cpu" and kernels.pick("xty") == "int8"
            and bool(torch.isfinite(yc).all())):
        try:
            candidates.IMPLS["xty"]["int8"](sxy, xb, yc)
            return
        except candidates.Unavailable:
            pass
    rows = max(1, FLOAT_BYTES // max(1, xb.shape[1] * torch.finfo(dtype).bits // 8))
    for r0 in range(0, xb.shape[0], rows):  # at most FLOAT_BYTES of the batch as floats at a time
        sxy += mm(xb[r0 : r0 + rows].to(dtype).T, yc[r0 : r0 + rows].to(dtype))


def _add_moments(sx: Tensor, sxx: Tensor, x: Tensor, binary: bool) -> None:
    """``sx += Σ x``, ``sxx += Σ x²`` over the rows of ``x`` [b, p], in float64 (for 0/1 masks
    ``x² = x``: one column sum)."""
    if binary:
        s = column_counts(x).to(torch.float64)
        sx += s
        sxx += s
    else:
        sx += x.sum(0, dtype=torch.float64)
        sxx += (x * x).sum(0, dtype=torch.float64)


def _mirror_and_standardize(G: Tensor, n: int, mean: Tensor, inv: Tensor) -> None:
    """``G = D^-1 (G / n - m m') D^-1`` in place from the counts in ``G``'s upper triangle, which
    is also copied to the lower one: tile by tile of the upper triangle (``_CHUNK`` rows by
    ``_TILE`` columns, a few MB: every step runs in the caches), each in float64 as
    ``G ⊙ (d d' / n) - a a'`` (``d = 1/std``, ``a = m ⊙ d``) and written back with its transpose
    below the diagonal. (Copying the transpose of whole row chunks read the upper triangle a column
    at a time, one cache line per entry: 11 s of a 50k-feature Gram; 2-4x faster by tiles.)"""
    p = G.shape[0]
    d = inv.to(torch.float64)
    a = mean.to(torch.float64) * d
    for r0 in range(0, p, _CHUNK):
        r1 = min(p, r0 + _CHUNK)
        dr = (d[r0:r1] / n)[:, None]
        for c0 in range(r0, p, _TILE):
            c1 = min(p, c0 + _TILE)
            blk = G[r0:r1, c0:c1].to(torch.float64).mul_(d[None, c0:c1]).mul_(dr)
            blk.addr_(a[r0:r1], a[c0:c1], alpha=-1.0)
            if c0 == r0:  # the diagonal block: only its upper triangle is certain (syrk)
                sq = blk[:, : r1 - r0]
                sq.copy_(torch.triu(sq) + torch.triu(sq, 1).T)
            out = blk.to(G.dtype)
            G[r0:r1, c0:c1] = out
            below = max(c0, r1)  # the tile's rows below the diagonal, as columns r0:r1
            if below < c1:
                G[below:c1, r0:r1] = out[:, below - c0:].T


def _check_batch(xb: Tensor, p: int, name: str) -> None:
    if xb.ndim != 2 or xb.shape[1] != p:
        raise ValueError(f"{name}: batch shape {tuple(xb.shape)} does not match n_features={p}")


def feature_stats(
    train: BatchSource,
    val: BatchSource,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gram: bool = True,
) -> FeatureStats:
    """One pass over the masks of ``train`` and of ``val``: moments, standardized Gram, val masks.

    Only ``X`` is used (the sources' ``y`` may be any block of targets). ``dtype`` is the Gram's
    (float32: 4 bytes per entry; float64 for float64 work). With ``gram=False`` (streaming method)
    only the moments are computed.
    """
    device = torch.device(device)
    p = train.n_features
    if val.n_features != p:
        raise ValueError(f"train and val have different n_features: {p} != {val.n_features}")
    sx = torch.zeros(p, dtype=torch.float64, device=device)
    sxx = torch.zeros_like(sx)
    G = torch.zeros(p, p, dtype=dtype, device=device) if gram else None
    binary, n = True, 0
    for xb, _, _ in train:
        _check_batch(xb, p, "train")
        xb = xb.to(device)
        bb = _is_binary(xb)
        binary = binary and bb
        n += xb.shape[0]
        x = xb if bb else xb.to(dtype)  # 0/1: the Gram and the sums from the masks themselves
        _add_moments(sx, sxx, x, bb)
        if G is not None:
            add_gram(G, x, binary=bb)
    if n != train.n_rows:
        raise ValueError(f"source announced n_rows={train.n_rows} but yielded {n} rows")
    if n < 1:
        raise ValueError("the training source has no rows")
    mean, std, nonconst = moments(n, sx, sxx)
    inv = torch.where(nonconst, 1.0 / std, torch.zeros_like(std))
    x_val = None
    if G is not None:
        _mirror_and_standardize(G, n, mean, inv)
        xv_rows: list[tuple[Tensor, Tensor]] = []
        vbin, nv = True, 0
        for xb, _, rows in val:
            _check_batch(xb, p, "val")
            xb = xb.to(device)
            vbin = vbin and _is_binary(xb)
            xv_rows.append((xb, rows.to(device)))
            nv += xb.shape[0]
        if nv != val.n_rows:
            raise ValueError(f"source announced n_rows={val.n_rows} but yielded {nv} rows")
        x_val = torch.empty(nv, p, dtype=torch.uint8 if vbin else dtype, device=device)
        for xb, rows in xv_rows:
            x_val[rows] = xb.to(x_val.dtype)
        del xv_rows
        binary = binary and vbin
    return FeatureStats(n_train=n, n_val=val.n_rows, mean=mean, std=std, nonconst=nonconst, gram=G,
                        x_val=x_val, binary=binary)


def target_stats(source: BatchSource, *, keep_y: bool = False, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64) -> TargetStats:
    """One pass over ``source``: raw sums of ``X``, ``X'y``, ``y``, ``y²`` (and ``Y`` if ``keep_y``).

    Sums in float64 (``p x T`` + one batch of memory). ``dtype``: the products ``X'y`` of one batch
    for 0/1 masks (float32 for a float32 solve: exact masks times the targets minus a shift, the
    first batch's means, so that a batch's product holds centred sums and rounds like float32
    data, about 1e-7 relative; the shift is added back in float64 from the exact counts). Other
    masks, and ``dtype=float64``, multiply in float64.
    """
    device = torch.device(device)
    p, T = source.n_features, source.n_targets
    f64 = dict(dtype=torch.float64, device=device)
    sxy, sx, sxx = torch.zeros(p, T, **f64), torch.zeros(p, **f64), torch.zeros(p, **f64)
    sy, syy = torch.zeros(T, **f64), torch.zeros(T, **f64)
    Y = torch.empty(source.n_rows, T, **f64) if keep_y else None
    shift = None  # [T]: subtracted from y in the low-precision products
    n = 0
    for xb, yb, rows in source:
        y = yb.to(**f64)
        if y.ndim == 1:
            y = y[:, None]
        if xb.ndim != 2 or xb.shape[1] != p or y.shape[1] != T or xb.shape[0] != y.shape[0]:
            raise ValueError(
                f"batch shapes {tuple(xb.shape)}, {tuple(y.shape)} do not match the source "
                f"(n_features={p}, n_targets={T})"
            )
        xb = xb.to(device)
        n += xb.shape[0]
        if shift is None and dtype != torch.float64:
            shift = y.mean(0) if y.shape[0] else torch.zeros(T, **f64)
        yc = y if shift is None else y - shift
        if _is_binary(xb):
            _add_moments(sx, sxx, xb, True)
            _add_binary_xty(sxy, xb, yc, dtype)
        else:
            x = xb.to(**f64)
            _add_moments(sx, sxx, x, False)
            sxy += mm(x.T, yc)
        sy += y.sum(0)
        syy += (y * y).sum(0)
        if Y is not None:
            Y[rows.to(device)] = y
    if n != source.n_rows:
        raise ValueError(f"source announced n_rows={source.n_rows} but yielded {n} rows")
    if shift is not None:  # X'y = X'(y - shift) + (Σ x) shift'
        sxy += sx[:, None] * shift[None, :]
    return TargetStats(n=n, sx=sx, sxx=sxx, sxy=sxy, sy=sy, syy=syy, Y=Y)

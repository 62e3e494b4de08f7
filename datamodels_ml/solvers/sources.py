"""Batch sources: how the solvers receive rows (masks ``X`` and outputs ``Y``) without owning I/O.

A *BatchSource* is anything with ``n_rows``, ``n_features``, ``n_targets`` that iterates (again at
every pass) into ``(X_b, Y_b, rows)`` batches. :class:`TensorBatches` wraps in-memory tensors,
:class:`ChainedSource` reads two sources as one (train then val rows, for the streaming refit),
:class:`Stepped` calls a function before each batch of another source.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BatchSource", "TensorBatches", "ChainedSource", "Stepped", "as_source"]


@runtime_checkable
class BatchSource(Protocol):
    """Anything that can be iterated (repeatedly, once per epoch) into row batches.

    Attributes ``n_rows``, ``n_features``, ``n_targets``; ``iter(source)`` yields tuples
    ``(X_b [b, p] (bool/uint8/float), Y_b [b, T] float, rows [b] int64)`` where ``rows`` are the
    positions of the batch rows in ``0..n_rows-1``. Every row appears exactly once per iteration;
    batches may have any size and may live on any device (the solver moves them).
    """

    n_rows: int
    n_features: int
    n_targets: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...


class TensorBatches:
    """BatchSource over in-memory tensors.

    Args:
        X: ``[n, p]`` masks (any dtype).
        Y: ``[n, T]`` (or ``[n]``, treated as ``T = 1``) outputs.
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: draw a new random permutation at every iteration (epoch).
        seed: seed of the permutation generator.
    """

    def __init__(self, X: Tensor, Y: Tensor, *, batch_size: int, shuffle: bool = True, seed: int = 0):
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D [n_rows, n_features], got shape {tuple(X.shape)}")
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2:
            raise ValueError(f"Y must be 2-D [n_rows, n_targets], got shape {tuple(Y.shape)}")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}"
            )
        if X.shape[0] < 1:
            raise ValueError("X and Y must have at least one row")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.X, self.Y = X, Y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.n_rows, self.n_features = int(X.shape[0]), int(X.shape[1])
        self.n_targets = int(Y.shape[1])
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = self.n_rows
        if self.shuffle:
            order = torch.randperm(n, generator=self._gen)
        else:
            order = torch.arange(n)
        order = order.to(self.X.device)
        for s in range(0, n, self.batch_size):
            rows = order[s : s + self.batch_size]
            if not self.shuffle and rows.numel() == n:
                yield self.X, self.Y, rows
            elif not self.shuffle:  # contiguous slices: views, no copy
                yield self.X[s : s + rows.numel()], self.Y[s : s + rows.numel()], rows
            else:
                yield self.X[rows], self.Y[rows], rows


class ChainedSource:
    """Rows of ``a`` followed by rows of ``b`` (row positions of ``b`` offset by ``a.n_rows``).

    Batches of the two sources are interleaved at random, in proportion to their remaining rows.
    """

    def __init__(self, a: BatchSource, b: BatchSource, seed: int = 0):
        self.a, self.b = a, b
        self.n_rows = a.n_rows + b.n_rows
        self.n_features, self.n_targets = a.n_features, a.n_targets
        self.batch_size = getattr(a, "batch_size", None)
        self._gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        ia, ib = iter(self.a), iter(self.b)
        left = [self.a.n_rows, self.b.n_rows]
        while True:
            if left[0] <= 0 and left[1] <= 0:
                break
            pick_a = left[1] <= 0 or (
                left[0] > 0 and torch.rand((), generator=self._gen).item() * sum(left) < left[0]
            )
            try:
                if pick_a:
                    xb, yb, rows = next(ia)
                    left[0] -= rows.numel()
                    yield xb, yb, rows
                else:
                    xb, yb, rows = next(ib)
                    left[1] -= rows.numel()
                    yield xb, yb, rows + self.a.n_rows
            except StopIteration:  # a source yielded fewer rows than announced
                left[0 if pick_a else 1] = 0


def as_source(data: Any, name: str, batch_size: int, shuffle: bool, seed: int = 0) -> BatchSource:
    """``data`` as a BatchSource: a tuple ``(X, Y)`` is wrapped in :class:`TensorBatches`."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be a BatchSource or a tuple (X, Y), got {len(data)} items")
        X, Y = data
        return TensorBatches(X, Y, batch_size=batch_size, shuffle=shuffle, seed=seed)
    for attr in ("n_rows", "n_features", "n_targets", "__iter__"):
        if not hasattr(data, attr):
            raise ValueError(f"{name} must be a BatchSource or a tuple (X, Y); it has no {attr!r}")
    return data


class Stepped:
    """``source`` calling ``step()`` before each of its batches (e.g. a background computation
    moving to more threads once the caller waits for it)."""

    def __init__(self, source: Any, step: Any) -> None:
        self.source, self.step = source, step
        self.n_rows, self.n_features, self.n_targets = source.n_rows, source.n_features, source.n_targets

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for batch in self.source:
            self.step()
            yield batch

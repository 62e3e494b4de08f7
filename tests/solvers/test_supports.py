"""Per-column feature sets padded into batches (datamodels_ml.solvers.supports)."""

from __future__ import annotations

import pytest
import torch

from datamodels_ml.solvers import candidates, kernels
from datamodels_ml.solvers.supports import column_counts, columns_any, padded_support, size_groups


@pytest.mark.parametrize("cap", [None, 3])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
def test_padded_support_lists_each_columns_features_in_order(cap, density):
    g = torch.Generator().manual_seed(0)
    S = torch.rand(40, 7, generator=g) < density
    S[:, 2] = False  # an empty column
    idx, valid = padded_support(S, cap)
    sizes = S.sum(0)
    m = int(sizes.max()) if cap is None else min(int(sizes.max()), cap)
    assert idx.shape == valid.shape == (m, 7)
    for t in range(7):
        want = S[:, t].nonzero().squeeze(1)[:m]
        assert torch.equal(idx[: want.numel(), t], want)
        assert torch.equal(valid[:, t], torch.arange(m) < want.numel())
        assert bool((idx[want.numel():, t] == 0).all())  # padding points at feature 0


def test_size_groups_bound_the_spread_and_the_padded_copy():
    sizes = torch.tensor([1.0, 50, 2, 3, 40, 100, 100, 5])
    groups = size_groups(sizes, budget=25_000, spread=1.5)
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    for grp in groups:
        s = sizes[grp]
        assert float(s.max()) <= 1.5 * max(float(s.min()), 1.0)
        assert grp.numel() * float(s.max()) ** 2 <= 25_000 or grp.numel() == 1


@pytest.mark.parametrize("colsum", ["bytes", "int8", "torch"])
def test_column_counts_and_emptiness_are_exact_with_each_colsum_kernel(monkeypatch, colsum):
    monkeypatch.setattr(kernels, "_STATE", {"base": None, "env": None, "effective": None})
    monkeypatch.setenv(kernels.ENV, f"colsum={colsum}")
    assert kernels.pick("colsum") == colsum
    calls = []
    for name, fn in list(candidates.IMPLS["colsum"].items()):
        monkeypatch.setitem(candidates.IMPLS["colsum"], name, lambda x, name=name, fn=fn: calls.append(name) or fn(x))
    g = torch.Generator().manual_seed(3)
    S = torch.rand(3001, 70, generator=g) < 0.2  # counts far past a byte, rows not a multiple of 255
    S[:, 4] = False  # an empty column
    S[:, 9] = True  # a full one
    view = S[::2, ::3]  # not contiguous: counted from a copy
    for M in (S, view):
        got = column_counts(M)
        assert got.dtype == torch.int64 and torch.equal(got, M.sum(0))
        assert torch.equal(columns_any(M), M.any(0))
    for M in (S.to(torch.uint8), S.to(torch.float32)):  # masks as bytes (a batch read) or 0/1 floats
        assert torch.equal(column_counts(M), S.sum(0))
    assert set(calls) == {colsum}  # the kernel picked, and only it
    assert columns_any(S[:0]).tolist() == [False] * 70 and column_counts(S[:0]).tolist() == [0] * 70

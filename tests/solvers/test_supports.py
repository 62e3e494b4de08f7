"""Per-column feature sets padded into batches (datamodels_ml.solvers.supports)."""

from __future__ import annotations

import pytest
import torch

from datamodels_ml.solvers.supports import padded_support, size_groups


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

"""Per-target sub-Grams: the row-ordered gather and the direct one give the same values."""

import pytest
import torch

from datamodels_ml.solvers import subgrams
from datamodels_ml.solvers.sources import as_source
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.supports import padded_support


def _sets(p, T, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (T,), generator=g)
    S = torch.zeros(p, T, dtype=torch.bool)
    for t, k in enumerate(sizes.tolist()):
        S[torch.randperm(p, generator=g)[:k], t] = True
    S[:, 3] = False  # an empty set: all padding
    S[p - 1, 5] = True  # the last feature: the last band of rows
    idx, valid = padded_support(S)
    return idx.T, valid.T


@pytest.mark.parametrize("row_order", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_gather_order_gives_every_target_its_own_subgram(monkeypatch, row_order, dtype):
    monkeypatch.setattr(subgrams, "_BAND", 7)  # many bands (and a last, partial one) at a small p
    p, T = 600, 12
    g = torch.Generator().manual_seed(0)
    A = torch.randn(p, p, generator=g)
    G = (A + A.T).float()
    idx, valid = _sets(p, T, 1)
    out = subgrams.gather(G, idx, valid, dtype, row_order=row_order)
    assert out.shape == (T, idx.shape[1], idx.shape[1]) and out.dtype == dtype and out.is_contiguous()
    for t in range(T):
        k = int(valid[t].sum())
        S = idx[t, :k]
        assert torch.equal(out[t, :k, :k], G[S][:, S].to(dtype))
        assert (out[t, k:] == 0).all() and (out[t, :, k:] == 0).all()


def test_the_automatic_choice_orders_large_cpu_batches_by_row(monkeypatch):
    calls = []
    real = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: calls.append(1) or real(self, *a))
    G = torch.eye(5000)
    idx = torch.arange(2048).reshape(2, 1024)
    valid = torch.ones_like(idx, dtype=torch.bool)
    subgrams.gather(G, idx[:, :8], valid[:, :8], torch.float32)  # 128 entries: direct
    assert not calls
    out = subgrams.gather(G, idx, valid, torch.float32)  # 2M entries from a 5000-feature Gram: by rows
    assert calls and torch.equal(out, torch.eye(1024).expand(2, -1, -1))


def test_validation_rows_are_the_transposed_standardized_columns():
    g = torch.Generator().manual_seed(2)
    Xt = (torch.rand(50, 30, generator=g) < 0.4)
    Xv = (torch.rand(20, 30, generator=g) < 0.4)
    Xt[:, 7] = True  # constant on the training rows: zero
    y = torch.randn(50, 1, generator=g)
    st = feature_stats(as_source((Xt, y), "train", 16, shuffle=False), as_source((Xv, y[:20]), "val", 16, shuffle=False))
    idx = torch.tensor([7, 0, 29, 3, 3])
    rows = st.val_rows(idx, torch.float64)
    torch.testing.assert_close(rows, st.z_val(idx, torch.float64).T)
    assert (rows[0] == 0).all()
    assert st.x_val_t is st.x_val_t  # made once

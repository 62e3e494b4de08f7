"""The relaxed lasso (solvers/relax.py and lasso_path(relax=...)) against least squares and the lasso."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression

from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.path import lasso_path
from datamodels_ml.solvers.relax import PHIS, choose_phi, support_ls
from datamodels_ml.solvers.screening import TrainGram
from datamodels_ml.solvers.sources import as_source
from datamodels_ml.solvers.stats import target_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(n=200, n_val=60, p=30, T=3, noise=0.3, seed=0):
    """0/1 masks, 4 true features per target: ``(train, val)`` tuples."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n + n_val, p, generator=g) < 0.5).double()
    W = torch.zeros(p, T, dtype=torch.float64)
    W[:4] = torch.randn(4, T, generator=g, dtype=torch.float64)
    Y = X @ W + noise * torch.randn(n + n_val, T, generator=g, dtype=torch.float64) + 1.0
    return (X[:n], Y[:n]), (X[n:], Y[n:])


def _ols_on_support(X, y, A):
    Z = (X - X.mean(0)) / X.std(0, unbiased=False)
    return LinearRegression().fit(Z[:, A].numpy(), y.numpy())


@pytest.mark.parametrize("refit", [False, True])
def test_phi_one_is_least_squares_on_the_selected_support(refit):
    train, val = _planted()
    res = lasso_path(train, val, k=15, eps=1e-2, relax=(1.0,), refit=refit, dtype=torch.float64)
    assert torch.equal(res.phi, torch.ones(3, dtype=torch.float64))
    X = torch.cat([train[0], val[0]]) if refit else train[0]
    Y = torch.cat([train[1], val[1]]) if refit else train[1]
    for t in range(3):
        A = (res.weight[:, t] != 0).nonzero().squeeze(1)
        assert 0 < A.numel() < 30
        if refit:  # the train+val rows standardized with the train mean/std (cfg.refit_standardization=train)
            Xt = train[0]
            Z = (X - Xt.mean(0)) / Xt.std(0, unbiased=False)
            ols = LinearRegression().fit(Z[:, A].numpy(), Y[:, t].numpy())
        else:
            ols = _ols_on_support(X, Y[:, t], A)
        np.testing.assert_allclose(res.weight[A, t].numpy(), ols.coef_, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(float(res.bias[t]), ols.intercept_, rtol=1e-8, atol=1e-9)


def test_phi_zero_is_the_lasso_and_the_selection_is_the_argmin_of_the_blends():
    train, val = _planted(seed=1)
    lasso = lasso_path(train, val, k=15, eps=1e-2, dtype=torch.float64)
    zero = lasso_path(train, val, k=15, eps=1e-2, relax=(0.0,), dtype=torch.float64)
    assert torch.equal(zero.weight, lasso.weight) and torch.equal(zero.best_index, lasso.best_index)
    rel = lasso_path(train, val, k=15, eps=1e-2, relax=PHIS, refit=False, dtype=torch.float64)
    assert torch.equal(rel.val_mse.isnan(), lasso.val_mse.isnan())  # the path (and its stopping) is the lasso's
    seen = ~rel.val_mse.isnan()
    assert (rel.relax_val_mse[seen] <= rel.val_mse[seen] * (1 + 1e-12)).all()  # φ = 0 is a candidate
    finite = torch.where(seen, rel.relax_val_mse, torch.inf)
    assert torch.equal(rel.best_index, finite.argmin(0))
    # the returned weights have the selected blend's validation MSE
    pred = rel.predict(val[0])
    np.testing.assert_allclose(((pred - val[1]) ** 2).mean(0).numpy(), finite.amin(0).numpy(), rtol=1e-9)
    assert set(rel.phi.tolist()) <= set(PHIS)


def test_unsolvable_supports_keep_the_lasso_weights():
    """A support with as many features as rows (no residual left), or a singular G_AA, is not
    solved: its column comes back unchanged (every φ is then the lasso)."""
    g = torch.Generator().manual_seed(0)
    X = (torch.rand(12, 20, generator=g) < 0.5).double()
    X[:, 5] = X[:, 4]  # two identical columns: G_AA singular on a support holding both
    y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    src = as_source((X, y), "train", 12, shuffle=False)
    stats = feature_stats(src, as_source((X[:2], y[:2]), "val", 2, shuffle=False), dtype=torch.float64)
    c, _ = target_stats(src).quad(stats.mean, stats.inv_std, True)
    W = torch.zeros(20, 3, dtype=torch.float64)
    W[[0, 1], 0] = 1.0  # solvable
    W[[4, 5], 1] = 1.0  # singular
    W[:11, 2] = 1.0  # 11 features, 12 rows and an intercept: no residual degree of freedom
    W_ls, solved = support_ls(TrainGram(stats, torch.float64), c, W, n_rows=12, fit_intercept=True)
    assert solved.tolist() == [True, False, False]
    assert torch.equal(W_ls[:, 1:], W[:, 1:])
    ols = _ols_on_support(X, y[:, 0], torch.tensor([0, 1]))
    np.testing.assert_allclose(W_ls[[0, 1], 0].numpy(), ols.coef_, rtol=1e-10)
    assert (W_ls[2:, 0] == 0).all()


def test_choose_phi_picks_the_best_blend_and_the_lasso_on_ties():
    Y = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    pred = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # column 1: both predict exactly
    pred_ls = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    mse, phi = choose_phi(pred, pred_ls, Y)
    assert phi.tolist() == [1.0, 0.0] and mse.tolist() == [0.0, 0.0]


def test_relax_needs_fista_and_phi_in_the_unit_interval():
    train, val = _planted()
    with pytest.raises(ValueError, match="need the Gram: method='fista'"):
        lasso_path(train, val, k=3, method="saga", relax=PHIS)
    with pytest.raises(ValueError, match=r"every φ must be in \[0, 1\]"):
        lasso_path(train, val, k=3, relax=(0.0, 1.5))
    with pytest.raises(ValueError, match="not both"):
        lasso_path(train, val, k=3, relax=PHIS, phi=torch.zeros(3))

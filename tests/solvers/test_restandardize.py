"""The train+val refit with train+val's own mean/std (solvers/restandardize.py) equals the explicit
two-pass one: the Gram of the chained sources built from scratch, and a second lasso_path call."""

from __future__ import annotations

import pytest
import torch

from datamodels_ml.solvers.sources import ChainedSource
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.path import lasso_path
from datamodels_ml.solvers.restandardize import train_val_problem
from datamodels_ml.solvers.sources import as_source
from datamodels_ml.solvers.stats import target_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=120, n_val=40, p=25, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n + n_val, p, generator=g) < 0.3).double()
    X[:n, 3] = 1.0  # constant on the training rows only: varies on train+val
    X[:, 7] = 0.0  # constant everywhere
    W = torch.zeros(p, T, dtype=torch.float64)
    W[[0, 1, 3, 9]] = torch.randn(4, T, generator=g, dtype=torch.float64)
    Y = X @ W + 0.3 * torch.randn(n + n_val, T, generator=g, dtype=torch.float64) + 2.0
    return (X[:n], Y[:n]), (X[n:], Y[n:])


def _sources(train, val):
    tr = as_source(train, "train", 32, shuffle=False)
    va = as_source(val, "val", 32, shuffle=False)
    return tr, va


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_train_val_gram_and_linear_term_equal_the_explicit_ones(fit_intercept):
    train, val = _data()
    tr, va = _sources(train, val)
    stats = feature_stats(tr, va, dtype=torch.float64)
    op, c, nd, ybar, mean, std = train_val_problem(stats, target_stats(tr), target_stats(va),
                                                   fit_intercept=fit_intercept, dtype=torch.float64)
    both = ChainedSource(tr, va)
    explicit = feature_stats(both, va, dtype=torch.float64)  # the second pass, the second p x p Gram
    torch.testing.assert_close(mean, explicit.mean)
    torch.testing.assert_close(std, explicit.std)
    G = explicit.gram
    p = G.shape[0]
    torch.testing.assert_close(op.block(torch.arange(p)), G, rtol=0, atol=1e-12)
    idx = torch.tensor([9, 3, 0, 7, 20])
    torch.testing.assert_close(op.block(idx), G[idx[:, None], idx[None, :]], rtol=0, atol=1e-12)
    W = torch.zeros(p, 3, dtype=torch.float64)
    W[[0, 3, 12], :] = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.apply(W), G @ W, rtol=0, atol=1e-12)
    y = torch.randn(p, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op._product(y), G @ y, rtol=0, atol=1e-12)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    ids = torch.tensor([[4, 3, 0], [1, 2, 5]])
    bb = op.batch_block(ids, valid)
    torch.testing.assert_close(bb[1], G[ids[1][:, None], ids[1][None, :]], rtol=0, atol=1e-12)
    torch.testing.assert_close(bb[0, :2, :2], G[ids[0, :2][:, None], ids[0, :2][None, :]], rtol=0, atol=1e-12)
    assert (bb[0, 2] == 0).all() and (bb[0, :, 2] == 0).all()
    Xa = torch.cat([train[0], val[0]])
    Ya = torch.cat([train[1], val[1]])
    Z = torch.where(explicit.nonconst, (Xa - explicit.mean) / explicit.std, torch.zeros_like(Xa))
    Yc = Ya - Ya.mean(0) if fit_intercept else Ya
    torch.testing.assert_close(c, Z.T @ Yc / Xa.shape[0])
    torch.testing.assert_close(nd, (Yc * Yc).mean(0))
    torch.testing.assert_close(ybar, Ya.mean(0))


@pytest.mark.parametrize("relax", [(), (0.0, 0.5, 1.0)])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_refit_in_one_call_equals_the_second_call(fit_intercept, relax):
    train, val = _data(seed=3)
    tr, va = _sources(train, val)
    opts = dict(fit_intercept=fit_intercept, dtype=torch.float64, tol=1e-12)
    one = lasso_path(tr, va, k=8, eps=1e-2, refit_standardization="train_val", relax=relax, **opts)
    path = lasso_path(tr, va, k=8, eps=1e-2, refit=False, relax=relax, **opts)
    two = lasso_path(ChainedSource(tr, va), va, lambdas=path.lam[None], refit=False,
                     phi=path.phi if relax else None, support=(path.weight != 0) if relax else None, **opts)
    torch.testing.assert_close(one.mean, two.mean)
    torch.testing.assert_close(one.std, two.std)
    torch.testing.assert_close(one.weight, two.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(one.bias, two.bias, rtol=1e-6, atol=1e-7)
    assert torch.equal(one.lam, path.lam) and torch.equal(one.phi, path.phi)


def test_train_val_refit_is_fista_only():
    train, val = _data()
    with pytest.raises(ValueError, match="refit_standardization='train_val' in lasso_path is for method='fista'"):
        lasso_path(train, val, k=3, method="saga", refit_standardization="train_val")

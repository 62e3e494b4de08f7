"""Tests of FISTA's stopping rule (the duality gap) and its exact finish on the support
(datamodels_ml.solvers.fista), on seeded problems with answers from scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from datamodels_ml.solvers.path import lasso_path
from datamodels_ml.solvers.fista import duality_gap, fista, support_newton


def _problem(n, p, T=3, seed=0, n_true=4, noise=0.5):
    """Standardized binary masks Z [n, p], centred targets y [n, T]; Gram G = Z'Z/n, c = Z'y/n."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n, p, generator=g) < 0.5).double()
    Z = (X - X.mean(0)) / X.std(0, unbiased=False).clamp_min(1e-12)
    W = torch.zeros(p, T, dtype=torch.float64)
    for t in range(T):
        W[torch.randperm(p, generator=g)[:n_true], t] = 1.0 + torch.rand(n_true, generator=g, dtype=torch.float64)
    Y = Z @ W + noise * torch.randn(n, T, generator=g, dtype=torch.float64)
    Y -= Y.mean(0)
    return Z, Y, Z.T @ Z / n, Z.T @ Y / n, (Y * Y).mean(0)


def _primal(G, c, D, lam, w):
    return 0.5 * (w * (G @ w)).sum(0) - (c * w).sum(0) + 0.5 * D + lam * w.abs().sum(0)


def _sklearn(Z, Y, lam):
    return torch.tensor(np.stack([Lasso(alpha=float(lam[t]), fit_intercept=False, tol=1e-14, max_iter=1_000_000)
                                  .fit(Z.numpy(), Y[:, t].numpy()).coef_ for t in range(Y.shape[1])], 1))


def test_gap_at_zero_has_closed_form():
    Z, Y, G, c, D = _problem(80, 30)
    lmax = c.abs().amax(0)
    lam = 0.3 * lmax
    w = torch.zeros_like(c)
    gap = duality_gap(w, G @ w, c, lam, D)
    torch.testing.assert_close(gap, 0.5 * D * (1 - lam / lmax) ** 2)
    assert torch.equal(duality_gap(w, G @ w, c, lmax, D), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("n, p", [(200, 30), (20, 60)])
def test_gap_bounds_suboptimality_and_vanishes_at_the_solution(n, p):
    Z, Y, G, c, D = _problem(n, p, seed=1)
    lam = 0.1 * c.abs().amax(0)
    w_star = _sklearn(Z, Y, lam)
    p_star = _primal(G, c, D, lam, w_star)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        w = w_star + 0.1 * torch.randn(w_star.shape, generator=g, dtype=torch.float64)
        gap = duality_gap(w, G @ w, c, lam, D)
        assert bool((gap >= _primal(G, c, D, lam, w) - p_star - 1e-12).all())
    assert bool((duality_gap(w_star, G @ w_star, c, lam, D) < 1e-9 * D).all())


def test_support_newton_finishes_from_an_early_iterate():
    # fewer rows than features: the Gram is singular and FISTA converges slowly, but after a few
    # iterations its support is right and one solve on it gives the exact solution
    Z, Y, G, c, D = _problem(20, 60, seed=3)
    lam = 0.2 * c.abs().amax(0)
    w_star = _sklearn(Z, Y, lam)
    x, _, _, _, _ = fista(G, c, lam, torch.zeros_like(c), L=float(torch.linalg.eigvalsh(G)[-1]), nulldev=D,
                    var=torch.ones(60, dtype=torch.float64), tol=1e-30, max_iter=60, newton_after=0)
    assert bool((duality_gap(x, G @ x, c, lam, D) > 1e-10 * D).any())  # not converged yet
    acc, cand, Gc = support_newton(G, x, c, lam, D, None, tol=1e-10, cap=64,
                                   skip=torch.zeros(3, dtype=torch.bool))
    assert bool(acc.all())
    torch.testing.assert_close(Gc, G @ cand)
    torch.testing.assert_close(cand, w_star, rtol=0, atol=1e-6)


def test_support_newton_refuses_a_wrong_support():
    Z, Y, G, c, D = _problem(200, 30, seed=4)
    lam = 0.2 * c.abs().amax(0)
    w_star = _sklearn(Z, Y, lam)
    wrong = torch.zeros_like(w_star)
    for t in range(3):  # one feature per column, outside its support
        wrong[int(w_star[:, t].eq(0).nonzero()[0]), t] = 1.0
    acc, _, _ = support_newton(G, wrong, c, lam, D, None, tol=1e-10, cap=64, skip=torch.zeros(3, dtype=torch.bool),
                               rounds=1)
    assert not bool(acc.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fewer_models_than_features_matches_sklearn_with_fewer_iterations(dtype):
    g = torch.Generator().manual_seed(5)
    X = torch.rand(60, 150, generator=g) < 0.5
    W = torch.zeros(150, 4, dtype=torch.float64)
    W[:3] = 1.5
    Xs = (X.double() - X[:30].double().mean(0)) / X[:30].double().std(0, unbiased=False)
    Y = (Xs @ W + 0.3 * torch.randn(60, 4, generator=g, dtype=torch.float64)).to(dtype)
    kw = dict(k=16, eps=0.01, refit=False, dtype=dtype, min_lambdas=16)
    res = lasso_path((X[:30], Y[:30]), (X[30:], Y[30:]), **kw)
    Z = Xs[:30]
    yc = Y[:30].double() - Y[:30].double().mean(0)
    for i in (3, 8):
        lam = res.lam_path[i]
        ref = lasso_path((X[:30], Y[:30]), (X[30:], Y[30:]), lambdas=lam[None], refit=False, dtype=dtype)
        sk = _sklearn(Z, yc, lam)
        obj = lambda w: _primal(Z.T @ Z / 30, Z.T @ yc / 30, (yc * yc).mean(0), lam, w)  # noqa: E731
        assert bool((obj(ref.weight.double()) <= obj(sk) + 1e-5 * obj(sk)).all()), (obj(ref.weight.double()) - obj(sk)) / obj(sk)
    # the exact finish ends FISTA's slow tail: the same path without it needs more iterations
    import datamodels_ml.solvers.fista as F
    orig = F.fista.__kwdefaults__["newton_after"]
    try:
        F.fista.__kwdefaults__["newton_after"] = 0
        slow = lasso_path((X[:30], Y[:30]), (X[30:], Y[30:]), **kw)
    finally:
        F.fista.__kwdefaults__["newton_after"] = orig
    assert res.epochs < slow.epochs
    torch.testing.assert_close(res.val_mse, slow.val_mse, rtol=1e-3, atol=0, equal_nan=True)


def test_saga_stops_on_its_table_gap_at_1e5_models():
    # the streaming method's old rule (relative change of w over an epoch) never got below its
    # tolerance at 10^5 float32 rows; the gap from the table stops each path point in a few epochs
    g = torch.Generator().manual_seed(6)
    n, p, T = 100_000, 10, 2
    X = torch.rand(n + 2000, p, generator=g) < 0.5
    W = torch.zeros(p, T, dtype=torch.float64)
    W[:3] = 0.5
    Y = ((X.double() - 0.5) / 0.5 @ W + torch.randn(n + 2000, T, generator=g, dtype=torch.float64) + 1).float()
    kw = dict(k=4, eps=0.05, refit=False, min_lambdas=4)
    s = lasso_path((X[:n], Y[:n]), (X[n:], Y[n:]), method="saga", batch_size=4096, max_epochs=60, **kw)
    f = lasso_path((X[:n], Y[:n]), (X[n:], Y[n:]), method="fista", **kw)
    assert s.epochs < 3 * 60  # three of the four points solved (the first is λ_max), none at the cap
    torch.testing.assert_close(s.weight, f.weight, rtol=0, atol=1e-4)
    torch.testing.assert_close(s.val_mse, f.val_mse, rtol=1e-3, atol=0)  # both within the gap tolerance


@pytest.mark.parametrize("L0", [0.05, 1.0, 50.0])
def test_checked_steps_converge_from_any_starting_curvature(L0):
    # the step is 1/L with L checked at every step: from far too small an L (steps that would
    # diverge) it grows to the curvature met; from far too large it just converges more slowly
    Z, Y, G, c, D = _problem(200, 40, seed=6)
    lam = 0.1 * c.abs().amax(0)
    w_star = _sklearn(Z, Y, lam)
    top = float(torch.linalg.eigvalsh(G)[-1])
    W, wGw, it, L, GW = fista(G, c, lam, torch.zeros_like(c), L=L0, nulldev=D, var=torch.ones(40, dtype=torch.float64),
                              tol=1e-12, max_iter=5000)
    torch.testing.assert_close(W, w_star, rtol=0, atol=1e-5)
    torch.testing.assert_close(GW, G @ W)
    torch.testing.assert_close(wGw, (W * (G @ W)).sum(0))
    if L0 < top:
        assert bool((L > L0).all()) and bool((L <= 2.2 * top).all())  # grown, never past 2x the curvature met
    else:
        assert bool((L == L0).all())


def test_path_warm_start_extrapolates_exactly_on_a_fixed_support():
    from datamodels_ml.solvers.point import predict

    # on a fixed support and signs the lasso solution is linear in λ: w(λ) = G_AA^-1 (c_A - λ s)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Gaa = A @ A.T + 6 * torch.eye(6, dtype=torch.float64)
    c = torch.tensor([3.0, -2.0, 4.0, -5.0, 2.5, 3.5], dtype=torch.float64)
    s = torch.sign(torch.linalg.solve(Gaa, c))
    w = lambda lam: torch.linalg.solve(Gaa, c - lam * s)  # noqa: E731
    lams = torch.tensor([0.3, 0.2, 0.12], dtype=torch.float64)[:, None]
    assert bool((torch.sign(w(0.3)) == s).all() and (torch.sign(w(0.12)) == s).all())
    W0, W1 = torch.cat([w(0.3)[:, None], torch.zeros(2, 1, dtype=torch.float64)]), \
        torch.cat([w(0.2)[:, None], torch.zeros(2, 1, dtype=torch.float64)])
    torch.testing.assert_close(predict(W1, W0, lams)[:6, 0], w(0.12))
    assert bool((predict(W1, W0, lams)[6:] == 0).all())
    # a coordinate the extrapolation would carry across zero starts at zero instead
    W1b = W1.clone()
    W1b[0] = 0.01 * torch.sign(W0[0])
    W0b = W0.clone()
    W0b[0] = 10 * W0[0]
    assert float(predict(W1b, W0b, lams)[0, 0]) == 0.0

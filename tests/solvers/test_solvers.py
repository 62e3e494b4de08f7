"""Tests of the lasso path solver (datamodels_ml.solvers) against scikit-learn and planted models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from datamodels_ml.solvers.result import LassoPath
from datamodels_ml.solvers.sources import TensorBatches
from datamodels_ml.solvers import stats as stats_mod
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.grid import lambda_grid, lambda_max
from datamodels_ml.solvers.path import lasso_path

METHODS = ["saga", "fista"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _standardize(X: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    ref = X if ref is None else ref
    ref = ref.double()
    mean, std = ref.mean(0), ref.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (X.double() - mean) / std


def _planted(n=240, p=16, T=3, n_true=3, noise=0.3, seed=0, n_val=80, offset=1.5):
    """Boolean masks X, Y = Z @ W + noise + offset with W sparse (n_true entries per target)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n + n_val, p, generator=g) < 0.5
    W = torch.zeros(p, T, dtype=torch.float64)
    for t in range(T):
        j = torch.randperm(p, generator=g)[:n_true]
        signs = torch.where(torch.rand(n_true, generator=g) < 0.5, -1.0, 1.0).double()
        W[j, t] = signs * (1.0 + torch.rand(n_true, generator=g).double())
    Z = _standardize(X, X[:n])
    Y = Z @ W + noise * torch.randn(n + n_val, T, generator=g, dtype=torch.float64) + offset
    return X[:n], Y[:n], X[n:], Y[n:], W


def _objective(Z, y, w, b, lam):
    r = y - Z @ w - b
    return float((r @ r) / (2 * len(y)) + lam * np.abs(w).sum())


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_fixed_lambda_matches_sklearn(method, fit_intercept, dtype):
    Xt, Yt, Xv, Yv, _ = _planted(seed=1)
    Z = _standardize(Xt).numpy()
    Yn = Yt.numpy()
    lmax = lambda_max(Xt, Yt, mean=Xt.double().mean(0), std=Xt.double().std(0, unbiased=False),
                      fit_intercept=fit_intercept)
    lam = 0.15 * lmax  # [T]
    res = lasso_path((Xt, Yt.to(dtype)), (Xv, Yv.to(dtype)), lambdas=lam[None], method=method,
                     fit_intercept=fit_intercept, refit=False, dtype=dtype)
    assert res.weight.dtype == dtype and res.weight.shape == (Xt.shape[1], Yt.shape[1])
    for t in range(Yt.shape[1]):
        lt = float(lam[t])
        sk = Lasso(alpha=lt, fit_intercept=fit_intercept, tol=1e-12, max_iter=100_000).fit(Z, Yn[:, t])
        w = res.weight[:, t].double().numpy()
        b = float(res.bias[t])
        o_sk = _objective(Z, Yn[:, t], sk.coef_, sk.intercept_, lt)
        o_us = _objective(Z, Yn[:, t], w, b, lt)
        assert abs(o_us - o_sk) <= 1e-4 * abs(o_sk), (o_us, o_sk)
        # well-conditioned: no coefficient near the threshold, so supports must agree exactly
        big = 1e-3 * np.abs(sk.coef_).max()
        assert not np.any((np.abs(sk.coef_) > 1e-9) & (np.abs(sk.coef_) < big))
        np.testing.assert_array_equal(np.abs(w) > big, np.abs(sk.coef_) > big)
        np.testing.assert_allclose(w, sk.coef_, atol=2e-3 * np.abs(sk.coef_).max())
        if not fit_intercept:
            assert b == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_planted_support_and_signs_recovered(method):
    Xt, Yt, Xv, Yv, W = _planted(n=400, p=30, T=4, noise=0.2, seed=2, n_val=150)
    res = lasso_path((Xt, Yt), (Xv, Yv), k=30, eps=1e-3, method=method, refit=True)
    for t in range(W.shape[1]):
        true = W[:, t] != 0
        w = res.weight[:, t].double()
        assert torch.equal(torch.sign(w[true]), torch.sign(W[true, t]))
        # the planted features dominate: everything off the support is far smaller
        assert w[~true].abs().max() < 0.1 * w[true].abs().min()
        np.testing.assert_allclose(w[true].numpy(), W[true, t].numpy(), atol=0.1)
    # the intercept is the train (+val with refit) mean of y: close to the planted offset
    assert torch.allclose(res.bias.double(), torch.full((W.shape[1],), 1.5, dtype=torch.float64), atol=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_selected_lambda_is_argmin_of_val_mse(method):
    # noisy, weak signal: validation MSE turns up along the path so early stopping kicks in
    Xt, Yt, Xv, Yv, _ = _planted(n=120, p=40, T=5, noise=2.0, seed=3, n_val=60)
    calls = []
    res = lasso_path((Xt, Yt), (Xv, Yv), k=25, eps=1e-3, method=method, min_lambdas=3, refit=False,
                     callback=lambda ev, info: calls.append((ev, info)))
    k, T = res.lam_path.shape
    vm = torch.nan_to_num(res.val_mse, nan=float("inf"))
    assert torch.equal(res.best_index, vm.argmin(0))
    assert torch.equal(res.lam, res.lam_path[res.best_index, torch.arange(T)])
    # the weights are those of the selected path point
    for t in range(T):
        bi = int(res.best_index[t])
        assert res.nnz[bi, t] == (res.weight[:, t] != 0).sum()
    # NaN exactly after a target stopped; `active` is the fraction of non-NaN entries
    computed = ~torch.isnan(res.val_mse)
    assert torch.equal(computed, ~torch.isnan(res.train_mse))
    assert torch.equal(computed, ~torch.isnan(res.nnz))
    assert torch.allclose(res.active, computed.double().mean(1))
    n_comp = computed.sum(0)
    for t in range(T):
        assert computed[: n_comp[t], t].all()
        if n_comp[t] < k:  # stopped: its last value is above the best before it
            last = res.val_mse[n_comp[t] - 1, t]
            assert n_comp[t] - 1 >= 3 and last > res.val_mse[: n_comp[t] - 1, t].min()
    assert (n_comp < k).any(), "the noisy problem should trigger early stopping"
    events = [e for e, _ in calls]
    assert events[0] == "start" and events.count("start") == 1 and calls[0][1] == {"n_targets": T, "n_lambdas": k}
    assert "epoch" in events and events.count("lambda") == int((res.active > 0).sum())
    lam_info = [i for e, i in calls if e == "lambda"]
    assert set(lam_info[0]) == {"index", "lam_ratio", "val_mse", "train_mse", "nnz", "active"}
    assert lam_info[0]["lam_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_target_slicing_consistency(method):
    Xt, Yt, Xv, Yv, _ = _planted(n=200, p=20, T=6, noise=0.5, seed=4)
    kw = dict(k=12, eps=1e-2, method=method, dtype=torch.float64)
    full = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    a, b = 2, 5
    part = lasso_path((Xt, Yt[:, a:b]), (Xv, Yv[:, a:b]), **kw)
    assert torch.equal(part.best_index, full.best_index[a:b])
    torch.testing.assert_close(part.lam_path, full.lam_path[:, a:b])
    torch.testing.assert_close(part.weight, full.weight[:, a:b], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.bias, full.bias[a:b], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.val_mse, full.val_mse[:, a:b], rtol=1e-5, atol=1e-8, equal_nan=True)


def test_odd_batch_sizes_give_the_same_solution():
    Xt, Yt, Xv, Yv, _ = _planted(n=150, p=12, T=2, noise=0.3, seed=5)
    kw = dict(k=6, eps=0.05, refit=False, dtype=torch.float64)
    ref = lasso_path((Xt, Yt), (Xv, Yv), method="fista", **kw)
    n = Xt.shape[0]
    for bs in [7, 33, n - 1, n]:
        res = lasso_path((Xt, Yt), (Xv, Yv), method="saga", batch_size=bs, **kw)
        torch.testing.assert_close(res.weight, ref.weight, rtol=0, atol=1e-4)
        torch.testing.assert_close(res.val_mse, ref.val_mse, rtol=1e-3, atol=0, equal_nan=True)
    # a custom BatchSource with uneven batches (uint8 masks) gives the same answer
    src = _UnevenSource(Xt.to(torch.uint8), Yt, sizes=[1, 50, 13, 80, 6])
    res = lasso_path(src, (Xv, Yv), method="saga", **kw)
    torch.testing.assert_close(res.weight, ref.weight, rtol=0, atol=1e-4)
    res = lasso_path(src, (Xv, Yv), method="fista", **kw)
    torch.testing.assert_close(res.weight, ref.weight, rtol=0, atol=1e-8)


class _UnevenSource:
    """A BatchSource with fixed uneven batch sizes and a new random order each epoch."""

    def __init__(self, X, Y, sizes):
        assert sum(sizes) == X.shape[0]
        self.X, self.Y, self.sizes = X, Y, sizes
        self.n_rows, self.n_features, self.n_targets = X.shape[0], X.shape[1], Y.shape[1]
        self.gen = torch.Generator().manual_seed(123)

    def __iter__(self):
        order = torch.randperm(self.n_rows, generator=self.gen)
        s = 0
        for size in self.sizes:
            rows = order[s : s + size]
            s += size
            yield self.X[rows], self.Y[rows], rows


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_lambda_max(method, fit_intercept):
    Xt, Yt, Xv, Yv, _ = _planted(n=150, p=12, T=3, seed=6)
    mean, std = Xt.double().mean(0), Xt.double().std(0, unbiased=False)
    lmax = lambda_max(Xt, Yt, mean=mean, std=std, fit_intercept=fit_intercept)
    Z = _standardize(Xt)
    yc = Yt.double() - (Yt.double().mean(0) if fit_intercept else 0)
    torch.testing.assert_close(lmax, (Z.T @ yc).abs().amax(0) / Xt.shape[0])
    # same through a BatchSource with small batches
    torch.testing.assert_close(
        lambda_max(TensorBatches(Xt, Yt, batch_size=7), mean=mean, std=std, fit_intercept=fit_intercept), lmax)
    kw = dict(method=method, fit_intercept=fit_intercept, refit=False, dtype=torch.float64)
    at = lasso_path((Xt, Yt), (Xv, Yv), lambdas=lmax[None] * (1 + 1e-12), **kw)
    assert (at.weight == 0).all()
    below = lasso_path((Xt, Yt), (Xv, Yv), lambdas=0.95 * lmax[None], **kw)
    assert ((below.weight != 0).sum(0) >= 1).all()
    # the default grid starts at lambda_max
    res = lasso_path((Xt, Yt), (Xv, Yv), k=3, eps=0.5, **kw)
    torch.testing.assert_close(res.lam_path[0], lmax)
    assert (res.nnz[0] == 0).all()


def test_lambda_grid():
    lm = torch.tensor([2.0, 1.0], dtype=torch.float64)
    g = lambda_grid(lm, k=5, eps=1e-2)
    assert g.shape == (5, 2)
    torch.testing.assert_close(g[0], lm)
    torch.testing.assert_close(g[-1], 1e-2 * lm)
    ratios = g[1:] / g[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 10 ** (-0.5)))
    torch.testing.assert_close(lambda_grid(lm, k=1, eps=1e-3), lm[None])


@pytest.mark.parametrize("method", METHODS)
def test_refit_solves_train_plus_val(method):
    Xt, Yt, Xv, Yv, _ = _planted(n=160, p=10, T=2, noise=0.5, seed=7)
    res = lasso_path((Xt, Yt), (Xv, Yv), k=8, eps=1e-2, method=method, refit=True, dtype=torch.float64)
    assert isinstance(res, LassoPath)
    Xa, Ya = torch.cat([Xt, Xv]), torch.cat([Yt, Yv]).double()
    Za = _standardize(Xa, Xt).numpy()  # standardization keeps the train statistics
    for t in range(2):
        lt = float(res.lam[t])
        sk = Lasso(alpha=lt, tol=1e-12, max_iter=100_000).fit(Za, Ya[:, t].numpy())
        o_sk = _objective(Za, Ya[:, t].numpy(), sk.coef_, sk.intercept_, lt)
        o_us = _objective(Za, Ya[:, t].numpy(), res.weight[:, t].numpy(), float(res.bias[t]), lt)
        assert abs(o_us - o_sk) <= 1e-6 * o_sk


def test_predict_matches_manual_formula():
    Xt, Yt, Xv, Yv, _ = _planted(seed=8)
    res = lasso_path((Xt, Yt), (Xv, Yv), k=5, eps=0.1, method="fista")
    manual = ((Xv.float() - res.mean) / res.std) @ res.weight + res.bias
    torch.testing.assert_close(res.predict(Xv), manual)
    torch.testing.assert_close(res.mean, Xt.float().mean(0))
    torch.testing.assert_close(res.std, Xt.float().std(0, unbiased=False))


def test_constant_feature_gets_unit_std_and_zero_weight():
    Xt, Yt, Xv, Yv, _ = _planted(seed=9)
    Xt = Xt.clone()
    Xt[:, 0] = True
    res = lasso_path((Xt, Yt), (Xv, Yv), k=5, eps=0.1, method="fista")
    assert res.std[0] == 1.0 and res.mean[0] == 1.0
    assert (res.weight[0] == 0).all()


def test_tensor_batches():
    X = torch.arange(20).reshape(10, 2)
    Y = torch.arange(10.0)[:, None]
    src = TensorBatches(X, Y, batch_size=3, seed=1)
    assert (src.n_rows, src.n_features, src.n_targets) == (10, 2, 1)
    orders = []
    for _ in range(2):
        batches = list(src)
        assert [len(r) for _, _, r in batches] == [3, 3, 3, 1]
        rows = torch.cat([r for _, _, r in batches])
        assert sorted(rows.tolist()) == list(range(10))
        for xb, yb, r in batches:
            assert torch.equal(xb, X[r]) and torch.equal(yb, Y[r])
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch


def test_bad_inputs_raise():
    Xt, Yt, Xv, Yv, _ = _planted(n=50, p=5, T=2, n_val=20, seed=10)
    with pytest.raises(ValueError, match="same number of rows"):
        lasso_path((Xt, Yt[:-1]), (Xv, Yv))
    with pytest.raises(ValueError, match="same number of rows"):
        TensorBatches(Xt, Yt[:-1], batch_size=4)
    with pytest.raises(ValueError, match="k .* must be an integer >= 1"):
        lasso_path((Xt, Yt), (Xv, Yv), k=0)
    for eps in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
            lasso_path((Xt, Yt), (Xv, Yv), eps=eps)
    with pytest.raises(ValueError, match="unknown method 'cd'"):
        lasso_path((Xt, Yt), (Xv, Yv), method="cd")
    with pytest.raises(ValueError, match="different n_features"):
        lasso_path((Xt, Yt), (Xv[:, :3], Yv))
    with pytest.raises(ValueError, match="different n_targets"):
        lasso_path((Xt, Yt), (Xv, Yv[:, :1]))
    with pytest.raises(ValueError, match="lambdas must have shape"):
        lasso_path((Xt, Yt), (Xv, Yv), lambdas=torch.ones(3, 5))
    with pytest.raises(ValueError, match="k .* must be an integer >= 1"):
        lambda_grid(torch.ones(2), k=0, eps=0.1)


# ---------------------------------------------------------------------------------------------
# solvers package: statistics built in place, screening, shared statistics across target blocks
@pytest.mark.parametrize("kind", ["bool", "uint8", "float"])
@pytest.mark.parametrize("batch", [7, 64])
@pytest.mark.parametrize("tile", [2048, 300])
def test_feature_stats_gram_is_the_standardized_gram(monkeypatch, kind, batch, tile):
    # p > 1024 spans two column blocks of the upper-triangular accumulation; the standardization
    # goes by chunks of 256 rows and, with tile=300, by several column tiles per chunk, ragged at
    # the end and not aligned with the chunks
    monkeypatch.setattr(stats_mod, "_TILE", tile)
    g = torch.Generator().manual_seed(11)
    n, nv, p = 40, 9, 1030
    X = torch.rand(n + nv, p, generator=g) < 0.3
    if kind == "uint8":
        X = X.to(torch.uint8)
    elif kind == "float":
        X = X.double() * torch.rand(n + nv, p, generator=g, dtype=torch.float64)
    X[:, 5] = 1  # constant on the training rows: zero row and column
    Y = torch.zeros(n + nv, 1)
    dtype = torch.float64 if kind == "float" else torch.float32
    st = feature_stats(TensorBatches(X[:n], Y[:n], batch_size=batch, seed=1),
                       TensorBatches(X[n:], Y[n:], batch_size=batch, shuffle=False), dtype=dtype)
    Z = _standardize(X[:n])
    Z[:, 5] = 0
    ref = Z.T @ Z / n
    assert st.gram.dtype == dtype and (st.n_train, st.n_val, st.n_features) == (n, nv, p)
    torch.testing.assert_close(st.gram.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(st.mean, X[:n].double().mean(0))
    assert st.std[5] == 1.0 and not st.nonconst[5]
    assert st.binary == (kind != "float")
    assert st.x_val.dtype == (torch.uint8 if kind != "float" else dtype)
    torch.testing.assert_close(st.x_val.double(), X[n:].double())
    assert st.nbytes == st.gram.numel() * st.gram.element_size() + st.x_val.numel() * st.x_val.element_size() + p * 17


def _sparse_problem(seed, p=120, n=160, n_val=60, T=4, n_true=4, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n + n_val, p, generator=g) < 0.5
    W = torch.zeros(p, T, dtype=torch.float64)
    for t in range(T):
        W[torch.randperm(p, generator=g)[:n_true], t] = 1.0 + torch.rand(n_true, generator=g, dtype=torch.float64)
    Y = _standardize(X, X[:n]) @ W + noise * torch.randn(n + n_val, T, generator=g, dtype=torch.float64)
    return X[:n], Y[:n], X[n:], Y[n:]


@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("seed, T", [(0, 4), (1, 4), (2, 16)])
def test_screened_path_equals_unscreened(seed, T, fit_intercept, refit):
    # p (120) close to n (160): strong rules discard most features at large λ and the KKT check
    # has to add some back at small λ; the result must be the full problem's solution. With 16
    # targets the union of their sets is large next to each one: per-target sub-Grams (batched).
    Xt, Yt, Xv, Yv = _sparse_problem(seed, T=T)
    kw = dict(k=30, eps=1e-3, fit_intercept=fit_intercept, refit=refit, dtype=torch.float64, tol=1e-20,
              max_epochs=50_000, min_lambdas=30)
    full = lasso_path((Xt, Yt), (Xv, Yv), screen=False, **kw)
    scr = lasso_path((Xt, Yt), (Xv, Yv), screen=True, **kw)
    torch.testing.assert_close(scr.nnz, full.nnz, equal_nan=True)
    torch.testing.assert_close(scr.val_mse, full.val_mse, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(scr.train_mse, full.train_mse, rtol=1e-6, atol=1e-9, equal_nan=True)
    assert torch.equal(scr.best_index, full.best_index)
    torch.testing.assert_close(scr.weight, full.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(scr.bias, full.bias, rtol=0, atol=1e-5)


def test_shared_stats_over_target_blocks_equal_one_piece():
    Xt, Yt, Xv, Yv = _sparse_problem(3, p=50, T=6)
    kw = dict(k=15, eps=1e-2, dtype=torch.float64, tol=1e-20, max_epochs=50_000)
    one = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    st = feature_stats(TensorBatches(Xt, Yt[:, :0], batch_size=32), TensorBatches(Xv, Yv[:, :0], batch_size=32,
                       shuffle=False), dtype=torch.float64)
    for a, b in [(0, 2), (2, 6)]:
        part = lasso_path((Xt, Yt[:, a:b]), (Xv, Yv[:, a:b]), stats=st, **kw)
        torch.testing.assert_close(part.weight, one.weight[:, a:b], rtol=0, atol=1e-8)
        torch.testing.assert_close(part.val_mse, one.val_mse[:, a:b], equal_nan=True)
    with pytest.raises(ValueError, match="stats .* do not match the sources"):
        lasso_path((Xt[:-1], Yt[:-1]), (Xv, Yv), stats=st, **kw)


@pytest.mark.parametrize("refit", [False, True])
def test_gram_operators_match_the_explicit_gram(refit):
    from datamodels_ml.solvers.screening import RefitGram, TrainGram

    Xt, Yt, Xv, Yv = _sparse_problem(5, p=30, n=50, n_val=20)
    st = feature_stats(TensorBatches(Xt, Yt, batch_size=16), TensorBatches(Xv, Yv, batch_size=16, shuffle=False),
                       dtype=torch.float64)
    if refit:  # train+val rows, train standardization, centered on their own mean
        Za = _standardize(torch.cat([Xt, Xv]), Xt)
        zbar = Za.mean(0)
        ref = Za.T @ Za / len(Za) - zbar[:, None] * zbar[None, :]
        op = RefitGram(st, torch.float64, zbar)
    else:
        Zt = _standardize(Xt)
        ref, op = Zt.T @ Zt / len(Zt), TrainGram(st, torch.float64)
    idx = torch.tensor([1, 4, 5, 17, 29])
    torch.testing.assert_close(op.block(idx), ref[idx][:, idx])
    W = torch.zeros(30, 3, dtype=torch.float64)
    W[[2, 7, 11], [0, 1, 1]] = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(op.apply(W), ref @ W)
    torch.testing.assert_close(op.block(torch.arange(30)) @ W, ref @ W)
    if refit:  # the product used when the whole refit Gram would not fit
        torch.testing.assert_close(op._product(W), ref @ W)
    # the solver passes each target's features as a transposed view ([m, B].T): the sub-Grams must
    # still come out contiguous, or every batched product on them runs several times slower
    ids = torch.tensor([[1, 2], [4, 9], [5, 0]]).T
    b = op.batch_block(ids, torch.tensor([[True, True], [True, True], [True, False]]).T)
    assert b.is_contiguous()
    torch.testing.assert_close(b[0], ref[[1, 4, 5]][:, [1, 4, 5]])
    torch.testing.assert_close(b[1, :2, :2], ref[[2, 9]][:, [2, 9]])
    assert (b[1, 2] == 0).all() and (b[1, :, 2] == 0).all()


@pytest.mark.parametrize("plan", ["batched", "union", "full"])
def test_every_screening_plan_gives_the_same_path(monkeypatch, plan):
    # the cost model picks a plan per path point; each one must solve the same problem
    from datamodels_ml.solvers import screening
    from datamodels_ml.solvers.supports import size_groups

    Xt, Yt, Xv, Yv = _sparse_problem(6, T=6)
    kw = dict(k=20, eps=1e-3, dtype=torch.float64, tol=1e-20, max_epochs=50_000, min_lambdas=20)
    ref = lasso_path((Xt, Yt), (Xv, Yv), screen=False, **kw)
    chosen = []

    def forced(sizes, n_union, p):
        chosen.append(plan)
        return plan, (size_groups(sizes, screening.copy_budget(p), spread=1.5) if plan == "batched" else [])

    monkeypatch.setattr(screening, "_plan", forced)
    got = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    assert chosen
    torch.testing.assert_close(got.val_mse, ref.val_mse, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(got.weight, ref.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_products_give_the_same_path_as_dense_ones(monkeypatch, dtype):
    # the Gram and validation products of a sparse W go through torch's CSR product when the cost
    # model says so (at scale); forced here, the path must not change
    from datamodels_ml.solvers import blas, kernels

    Xt, Yt, Xv, Yv = _sparse_problem(7, T=5)
    kw = dict(k=20, eps=1e-3, dtype=dtype, tol=1e-20 if dtype == torch.float64 else 1e-7, max_epochs=50_000,
              min_lambdas=20)
    monkeypatch.setattr(blas, "_SPARSE_CALL_S", 1e9)  # never sparse
    dense = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    calls = []
    real = blas.mm_sparse
    monkeypatch.setattr(blas, "_SPARSE_CALL_S", 0.0)
    always = kernels.choose({**kernels.active().rates, "sparse_s": 1e-30})  # a free sparse product
    monkeypatch.setattr(kernels, "_STATE", {"base": always, "env": None, "effective": None})
    monkeypatch.setattr(blas, "mm_sparse", lambda a, w: calls.append(1) or real(a, w))
    sparse = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    assert len(calls) > 10
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse.val_mse, dense.val_mse, equal_nan=True, **tol)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-5 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("relax", [(), (0.0, 0.5, 1.0)])
def test_validation_rows_uncached_give_the_same_path(monkeypatch, relax):
    # past validation.CACHE the validation masks are converted per call from a transposed raw copy,
    # a few features at a time: the same predictions, so the same path and selection
    from datamodels_ml.solvers import validation

    Xt, Yt, Xv, Yv = _sparse_problem(8, T=5)
    kw = dict(k=15, eps=1e-3, dtype=torch.float64, tol=1e-12, min_lambdas=5, relax=relax)
    cached = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    made = []
    real = validation.ValRows.__init__

    def init(self, *a):
        real(self, *a)
        made.append(self.xT is not None and self.zT is None)

    monkeypatch.setattr(validation, "CACHE", 0)
    monkeypatch.setattr(validation, "_CHUNK", 7)  # several chunks
    monkeypatch.setattr(validation.ValRows, "__init__", init)
    uncached = lasso_path((Xt, Yt), (Xv, Yv), **kw)
    assert made == [True]
    torch.testing.assert_close(uncached.val_mse, cached.val_mse, rtol=1e-9, atol=0, equal_nan=True)
    torch.testing.assert_close(uncached.weight, cached.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(uncached.relax_val_mse, cached.relax_val_mse, rtol=1e-9, atol=0, equal_nan=True)
    if not relax:  # (a relaxed fit at φ = 1 on an unchanged support ties across λ: rounding picks one)
        assert torch.equal(uncached.best_index, cached.best_index)


@pytest.mark.parametrize("binary_dtype", [torch.bool, torch.float32])
def test_float32_target_products_keep_the_centred_sums(binary_dtype):
    # X'y in float32 products (0/1 masks), on targets with a mean 1000 times their spread: the
    # shift keeps the centred linear term as accurate as float32 data, not 1000x worse
    from datamodels_ml.solvers.stats import target_stats

    g = torch.Generator().manual_seed(11)
    X = (torch.rand(3000, 50, generator=g) < 0.5).to(binary_dtype)
    Y = 1000.0 + torch.randn(3000, 4, generator=g, dtype=torch.float64)
    src = TensorBatches(X, Y, batch_size=512, shuffle=False)
    exact, low = target_stats(src), target_stats(src, dtype=torch.float32)
    mean, inv = exact.sx / 3000, 1 / (exact.sxx / 3000 - (exact.sx / 3000) ** 2).sqrt()
    c64, nd64 = exact.quad(mean, inv, True)
    c32, nd32 = low.quad(mean, inv, True)
    torch.testing.assert_close(c32, c64, rtol=0, atol=1e-5 * float(c64.abs().max()))
    torch.testing.assert_close(nd32, nd64)
    assert torch.equal(low.sx, exact.sx) and torch.equal(low.sy, exact.sy)

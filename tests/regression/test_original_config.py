"""A regression config written for the original MadryLab tools runs unchanged and keeps its meaning.

The config is written here from the original's documented format (examples/cifar10/
regression_config.yaml: sections data, cfg, early_stopping), not with its code. What it means is
re-implemented below in numpy: fast_l1's SAGA path as the original runs it (``fast_l1_saga``) and the
lasso problems it stands for, solved exactly (``original_lasso``): the first num_train rows train and
the next num_val validate; λ_max on the raw masks; the grid λ = 0, λ_max·eps^(i/k); features
standardized by the training rows; λ picked on validation; the refit on train+val, standardized by
their own mean/std. ``regress`` must fit at least as well on fresh masks (noise-free truth): with
the relaxed lasso (``cfg.relax``, on for an original config) whatever fast_l1's settings, and, read
without it, as well as the exact lasso.
"""

import os

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import Lasso, LinearRegression

from conftest import CONFIGS, run_cli
from datamodels_ml.dataset.reader import read_beton
from datamodels_ml.dataset.write_dataset import write_beton
from datamodels_ml.errors import UserError
from datamodels_ml.regression.original_config import is_original_config, load_config
from datamodels_ml.regression.regress import fit
from datamodels_ml.solvers.path import lasso_path
from conftest import make_store

N, P, T, NUM_TRAIN, NUM_VAL, K, EPS = 300, 40, 3, 200, 40, 10, 1e-2


def soft(w, t):
    return np.sign(w) * np.maximum(np.abs(w) - t, 0.0)


def fast_l1_saga(X, Y, W, b, *, lr, batch, tol, check_every, start, n_lams, decay=1.0, val=None, rng):
    """fast_l1's ``train_saga``: per target λ = 0, then ``start``, ``start·decay``, ... (``n_lams`` of
    them); a λ is done when max_j std_j²·Δw_j² over the last epoch < ``tol`` at a check; a target
    leaves the path when its validation MSE rises against the previous λ after 10 λs (with more than
    one non-zero). Returns ``(W, b, best λ)``."""
    n, p = X.shape
    mu, sig = X.mean(0), X.std(0)
    Z = (X - mu) / (sig + 1e-32)
    table, gw_avg, gb_avg = np.zeros(Y.shape), np.zeros(W.shape), np.zeros(Y.shape[1])
    lam, done_n, on = np.zeros(Y.shape[1]), np.zeros(Y.shape[1], int), np.ones(Y.shape[1], bool)
    last, best, best_lam = np.full(Y.shape[1], np.inf), np.full(Y.shape[1], np.inf), np.zeros(Y.shape[1])
    for epoch in range(5000):
        prev, order = W.copy(), rng.permutation(n)
        for s in range(0, n - n % batch, batch):
            i = order[s:s + batch]
            r = Z[i] @ W + b - Y[i]
            gw = Z[i].T @ (r - table[i]) / batch + gw_avg
            gb = (r - table[i]).sum(0) / batch + gb_avg
            W[:, on] -= lr * gw[:, on]
            b[on] -= lr * gb[on]
            table[i] = r
            gw_avg += batch / n * (gw - gw_avg)
            gb_avg += batch / n * (gb - gb_avg)
            W[:, on] = soft(W[:, on], lr * lam[on])
        done = ((prev - W) ** 2 * sig[:, None] ** 2).max(0) < tol
        if epoch % check_every == check_every - 1:
            done_n += done & on
            fin = done_n == n_lams + 1
            if val is not None:
                mse = ((((val[0] - mu) / (sig + 1e-32)) @ W + b - val[1]) ** 2).mean(0)
                fin |= (mse > last) & (done_n >= 10) & ((W != 0).sum(0) > 1) & done
                better = (mse <= best) & done
                best_lam, best = np.where(better, lam, best_lam), np.where(better, mse, best)
                last = np.where(done, mse, last)
            on &= ~fin
            done &= on
            lam = np.where(done & (done_n == 1), start, np.where(done & (done_n > 1), lam * decay, lam))
        if not on.any():
            break
    return W, b, best_lam


def split(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    return x[:NUM_TRAIN], y[:NUM_TRAIN], x[NUM_TRAIN:NUM_TRAIN + NUM_VAL], y[NUM_TRAIN:NUM_TRAIN + NUM_VAL]


def raw_lambda_max(x, y):
    xt, yt, _, _ = split(x, y)
    return np.abs(xt.T @ (yt - yt.mean(0))).max(0) / NUM_TRAIN


def fast_l1_fit(x, y, *, lr, tol, check_every):
    """The original's two calls of train_saga (path, then the refit on train+val): a predictor."""
    xt, yt, xv, yv = split(x, y)
    W, b, rng = np.zeros((P, T)), np.zeros(T), np.random.default_rng(0)
    opts = dict(lr=lr, batch=10, tol=tol, check_every=check_every, rng=rng)
    W, b, lam = fast_l1_saga(xt, yt, W, b, start=raw_lambda_max(x, y), n_lams=K, decay=EPS ** (1 / K),
                             val=(xv, yv), **opts)
    xa, ya = np.vstack([xt, xv]), np.vstack([yt, yv])
    W, b, _ = fast_l1_saga(xa, ya, W, b, start=lam, n_lams=1, **opts)
    mu, sig = xa.mean(0), xa.std(0)
    return lambda m: ((m - mu) / (sig + 1e-32)) @ W + b


def original_lasso(x, y):
    """The problems the original config poses, solved exactly: ``(predictor, selected λ [T])``."""
    xt, yt, xv, yv = split(x, y)
    xa, ya = np.vstack([xt, xv]), np.vstack([yt, yv])
    lam_max = raw_lambda_max(x, y)

    def solve(X, y_t, lam):
        z = (X - X.mean(0)) / X.std(0)
        model = LinearRegression() if lam == 0 else Lasso(alpha=lam, tol=1e-12, max_iter=100_000)
        return model.fit(z, y_t), X.mean(0), X.std(0)

    preds, lams = [], []
    for t in range(T):
        grid = [0.0] + [lam_max[t] * EPS ** (i / K) for i in range(K)]
        best, best_lam, last = np.inf, 0.0, np.inf
        for n_done, lam in enumerate(grid, start=1):
            model, mu, sd = solve(xt, yt[:, t], lam)
            mse = np.mean((model.predict((xv - mu) / sd) - yv[:, t]) ** 2)
            if mse <= best:
                best, best_lam = mse, lam
            if mse > last and n_done >= 10 and np.count_nonzero(model.coef_) > 1:
                break
            last = mse
        model, mu, sd = solve(xa, ya[:, t], best_lam)
        preds.append(lambda m, model=model, mu=mu, sd=sd: model.predict((m - mu) / sd))
        lams.append(best_lam)
    return (lambda m: np.stack([f(m) for f in preds], 1)), np.array(lams)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A store of N models (sparse truth), its .beton, fresh masks with their noise-free outputs."""
    root = tmp_path_factory.mktemp("origcfg")
    store, w, b = make_store(root / "store", n=N, p=P, t=T, seed=3)
    write_beton(store.path, root / "d.beton", num_workers=1, progress=False)
    x, y, idx = read_beton(root / "d.beton", np.arange(N))
    fresh = np.random.default_rng(7).random((2000, P)) < 0.5
    return root, x, y, idx, fresh, fresh @ w + b


def original_config(root, name, **sections):
    """An original regression_config.yaml (the CIFAR example's keys), ``sections`` replacing parts."""
    cfg = {"data": {"data_path": str(root / "d.beton"), "num_train": NUM_TRAIN, "num_val": NUM_VAL, "seed": 0,
                    "target_start_ind": 0, "target_end_ind": -1},
           "cfg": {"k": K, "batch_size": 10, "lr": 1e-4, "eps": EPS, "out_dir": str(root / f"out_{name}"),
                   "num_workers": 8},
           "early_stopping": {"check_every": 3, "eps": 5e-1}}
    for section, values in sections.items():
        cfg[section] = values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def heldout_mse(predict, fresh, truth):
    return float(np.mean((predict(fresh.astype(np.float64)) - truth) ** 2))


def ours(result):
    d = {k: (v.numpy().astype(np.float64) if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
    return lambda m: ((m - d["mean"]) / d["std"]) @ d["weight"] + d["bias"]


def test_the_original_cifar_config_runs_unchanged_with_its_meaning(data):
    root, x, y, idx, fresh, truth = data
    config = original_config(root, "cifar")
    proc = run_cli("regress", "-C", str(config), cwd=root, check=True)
    for line in ("holds only the original's keys", "data.split=ordered", "cfg.grid=fast_l1",
                 "cfg.refit_standardization=train_val", "cfg.relax=true: the relaxed lasso",
                 "cfg.lr=0.0001 is the saga step size",
                 "early_stopping.eps=0.5 is fast_l1's absolute test"):
        assert line in proc.stderr, proc.stderr
    if (os.cpu_count() or 1) < 8:
        assert "cfg.num_workers=8 is more than" in proc.stderr
    result = torch.load(root / "out_cifar" / "datamodels.pt", weights_only=False)
    assert result["train_indices"].tolist() == sorted(idx[:NUM_TRAIN].tolist())  # the first rows, in order
    assert result["val_indices"].tolist() == sorted(idx[NUM_TRAIN:NUM_TRAIN + NUM_VAL].tolist())
    lam_path = result["lam_path"].numpy()
    np.testing.assert_allclose(lam_path[0], raw_lambda_max(x, y), rtol=1e-5)
    np.testing.assert_allclose(lam_path[:K] / lam_path[0], np.tile(EPS ** (np.arange(K) / K), (T, 1)).T, rtol=1e-6)
    assert lam_path.shape == (K + 1, T) and (lam_path[K] == 0).all()
    both = x[:NUM_TRAIN + NUM_VAL].astype(np.float64)
    np.testing.assert_allclose(result["mean"].numpy(), both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result["std"].numpy(), both.std(0), rtol=1e-5)
    # the relaxed lasso refitted on train+val (their own mean/std): where φ = 1, least squares on
    # the support selected on the training rows
    ya = y[:NUM_TRAIN + NUM_VAL].astype(np.float64)
    z = (both - both.mean(0)) / both.std(0)
    for t in np.flatnonzero(result["phi"].numpy() == 1):
        support = np.flatnonzero(result["weight"][:, t].numpy())
        ols = LinearRegression().fit(z[:, support], ya[:, t])
        np.testing.assert_allclose(result["weight"][support, t].numpy(), ols.coef_, rtol=1e-3, atol=1e-4)


# fast_l1's settings: the CIFAR example's (each λ stops after 3 epochs at step 1e-4) and the original's
# defaults (fast_l1 close to converged, started from the λ = 0 fit: weights between the lasso's and
# least squares', which the exact lasso alone loses to on this sparse, low-noise problem)
@pytest.mark.parametrize("name, settings", [("cifar", dict(lr=1e-4, tol=0.5, check_every=3)),
                                            ("defaults", dict(lr=0.01, tol=1e-5, check_every=2))])
def test_an_original_config_fits_at_least_as_well_as_fast_l1(data, name, settings):
    root, x, y, _, fresh, truth = data
    config = original_config(root, f"vs_{name}", early_stopping={"check_every": settings["check_every"],
                                                                 "eps": settings["tol"]},
                             cfg={"k": K, "batch_size": 10, "lr": settings["lr"], "eps": EPS, "out_dir": "unused",
                                  "num_workers": 8})
    result = fit(load_config([f"config={config}"], quiet=True), progress=False, log=False)
    assert result["phi"].numpy().max() > 0  # relaxed
    mine = heldout_mse(ours(result), fresh, truth)
    reference = heldout_mse(fast_l1_fit(x, y, **settings), fresh, truth)
    assert mine <= reference, (mine, reference)


def test_an_original_config_fits_the_lasso_it_means(data):
    root, x, y, _, fresh, truth = data
    config = original_config(root, "defaults", cfg={"k": K, "batch_size": 10, "eps": EPS, "out_dir": "unused"},
                             early_stopping={})
    result = fit(load_config([f"config={config}", "cfg.relax=false"], quiet=True), progress=False, log=False)
    predict, lam = original_lasso(x, y)
    np.testing.assert_allclose(result["lam"].numpy(), lam, rtol=1e-5)
    mine, reference = heldout_mse(ours(result), fresh, truth), heldout_mse(predict, fresh, truth)
    assert mine <= reference * (1 + 1e-3), (mine, reference)


def test_only_a_file_of_original_keys_is_translated_and_the_command_line_wins(data, capsys):
    root, *_ = data
    assert not is_original_config(yaml.safe_load((CONFIGS / "reg.yaml").read_text()))
    config = original_config(root, "cli")
    cfg = load_config([f"config={config}", "data.split=random", "cfg.method=saga"])
    err = capsys.readouterr().err
    assert (cfg.data.split, cfg.cfg.grid, cfg.cfg.refit_standardization) == ("random", "fast_l1", "train_val")
    assert "data.split=ordered" not in err and "cfg.grid=fast_l1" in err
    assert (cfg.cfg.lr, cfg.early_stopping.eps, cfg.early_stopping.check_every) == (1e-4, 0.5, 3)  # from the file
    defaults = original_config(root, "bare", early_stopping={})
    cfg = load_config([f"config={defaults}"])
    assert (cfg.cfg.lr, cfg.early_stopping.eps, cfg.early_stopping.check_every) == (1e-4, 1e-5, 2)
    assert "early_stopping.check_every=2, early_stopping.eps=1e-05: the original's defaults" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("data.split=shuffled", "data.split must be random or ordered, got 'shuffled'"),
    ("cfg.grid=glmnet", "cfg.grid must be datamodels_ml or fast_l1, got 'glmnet'"),
    ("cfg.refit_standardization=val", "cfg.refit_standardization must be train or train_val, got 'val'"),
    ("cfg.tol=0", "cfg.tol must be > 0, got 0.0"),
    ("early_stopping.eps=-1", "early_stopping.eps must be > 0, got -1.0"),
])
def test_our_keys_refuse_bad_values(data, override, message):
    from datamodels_ml.regression.regress import plan

    root, *_ = data
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(load_config([f"config={original_config(root, 'bad')}", override], quiet=True))


def test_absolute_tolerance_is_in_the_units_of_y():
    """fast_l1's test (tol_mode=absolute) scales with y; ours (relative) does not."""
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.random((120, 15)) < 0.5, dtype=torch.float64)
    y = X @ torch.tensor(rng.normal(size=(15, 1))) + 0.1 * torch.tensor(rng.normal(size=(120, 1)))

    def epochs(scale, mode):
        return lasso_path((X, y * scale), (X[:30], y[:30] * scale), k=3, eps=0.1, method="saga", lr=0.01,
                          batch_size=10, tol=1e-6, tol_mode=mode, max_epochs=500, refit=False,
                          dtype=torch.float64).epochs

    assert epochs(1.0, "relative") == epochs(16.0, "relative")  # a power of two: exact
    assert epochs(1.0, "absolute") < epochs(16.0, "absolute")


def test_relax_under_saga_is_noted(data):
    from datamodels_ml.regression.original_config import notes

    root, *_ = data
    cfg = load_config([f"config={original_config(root, 'saga')}", "cfg.method=saga"], quiet=True)
    assert cfg.cfg.relax is True
    assert "cfg.relax=true (the relaxed lasso) needs the Gram of cfg.method=fista; cfg.method=saga fits the lasso " \
           "alone" in notes(cfg)

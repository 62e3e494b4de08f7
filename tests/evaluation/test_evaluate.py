"""Evaluate: the metric functions against scipy/sklearn, and the command on a synthetic store with a
planted linear truth and datamodels fitted by scikit-learn's Lasso (real files, real MLflow store)."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import Lasso
from sklearn.metrics import r2_score

from conftest import make_store, run_cli, search_runs, tracking_client
from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.evaluate import EvaluateConfig, run_evaluation
from datamodels_ml.evaluation.metrics import (lds, mse, pearson, pearson_per_target, r2, r2_per_target, score,
                                              spearman_per_target)
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store

# -- metrics -------------------------------------------------------------------------------------


def _random_pair(seed, n=40, t=7, ties=False):
    rng = np.random.default_rng(seed)
    actual = rng.normal(size=(n, t))
    pred = actual + rng.normal(scale=rng.uniform(0.2, 3.0, size=t), size=(n, t))
    if ties:  # coarse values: many ties in both
        actual, pred = np.round(actual), np.round(pred * 2) / 2
    return pred, actual


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(seed, ties):
    pred, actual = _random_pair(seed, ties=ties)
    want_s = [spearmanr(pred[:, j], actual[:, j]).statistic for j in range(pred.shape[1])]
    want_p = [pearsonr(pred[:, j], actual[:, j]).statistic for j in range(pred.shape[1])]
    np.testing.assert_allclose(spearman_per_target(pred, actual), want_s, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pearson_per_target(pred, actual), want_p, rtol=1e-10, atol=1e-12)
    assert lds(pred, actual) == pytest.approx(np.mean(want_s), rel=1e-10)
    assert pearson(pred, actual) == pytest.approx(np.mean(want_p), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_r2_and_mse_match_sklearn(seed):
    pred, actual = _random_pair(seed)
    np.testing.assert_allclose(r2_per_target(pred, actual), r2_score(actual, pred, multioutput="raw_values"),
                               rtol=1e-10)
    assert r2(pred, actual) == pytest.approx(r2_score(actual, pred), rel=1e-10)
    assert mse(pred, actual) == pytest.approx(np.mean((pred - actual) ** 2), rel=1e-12)


def test_constant_targets_are_nan_and_left_out_of_the_means():
    pred, actual = _random_pair(3, t=5)
    actual[:, 1] = 0.1  # constant actual output (0.1 does not average exactly: constancy is max == min)
    pred[:, 3] = 2.5  # constant prediction, varying actual: no ranking predicted -> correlation 0
    s = score(pred, actual)
    assert np.isnan(s.spearman_t[1]) and np.isnan(s.pearson_t[1]) and np.isnan(s.r2_t[1])
    assert s.spearman_t[3] == 0.0 and s.pearson_t[3] == 0.0
    assert s.n_constant == 1 and s.n_constant_pred == 1
    keep = [0, 2, 3, 4]
    want = [spearmanr(pred[:, j], actual[:, j]).statistic if j != 3 else 0.0 for j in keep]
    assert s.lds == pytest.approx(np.mean(want), rel=1e-10)
    assert s.r2 == pytest.approx(r2_score(actual[:, keep], pred[:, keep]), rel=1e-10)
    all_const = score(pred, np.ones_like(actual))
    assert np.isnan(all_const.lds) and all_const.n_constant == 5


def test_perfect_and_reversed_rankings():
    x = np.arange(10.0)[:, None]
    assert lds(x ** 3, x) == pytest.approx(1.0)
    assert lds(-x, x) == pytest.approx(-1.0)
    assert pearson(2 * x + 1, x) == pytest.approx(1.0)


# -- a synthetic store with a planted linear truth -------------------------------------------------
P, T, N = 30, 6, 160
TRAIN, VAL = np.arange(0, 100), np.arange(100, 120)


def write_datamodels(store, out, *, train=TRAIN, val=VAL, target_start=0, target_end=T, alpha=0.01,
                     x_name="masks", y_name="margins", n_features=None, store_path=None):
    """Fit sklearn Lasso on standardized masks of ``train`` and save the datamodels.pt contract."""
    x = np.asarray(store.array(x_name), dtype=np.float64)[train]
    y = np.asarray(store.array(y_name), dtype=np.float64)[train][:, target_start:target_end]
    if n_features is not None:
        x = x[:, :n_features]
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    model = Lasso(alpha=alpha).fit((x - mean) / std, y)
    data = {"weight": torch.tensor(model.coef_.T, dtype=torch.float32),
            "bias": torch.tensor(model.intercept_, dtype=torch.float32),
            "lam": torch.full((y.shape[1],), alpha), "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32), "train_indices": torch.as_tensor(train),
            "val_indices": torch.as_tensor(val), "target_start": target_start, "target_end": target_end,
            "x_name": x_name, "y_name": y_name, "store": str(store_path or store.path), "format_version": 1}
    torch.save(data, out)
    return model, mean, std


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts of the experiments it creates: ./mlruns
    store, w, b = make_store(tmp_path / "store")
    return tmp_path, store


@pytest.mark.parametrize("target_start, target_end", [(0, T), (2, 5)])
def test_evaluate_gives_the_direct_answer(synthetic, target_start, target_end):
    tmp_path, store = synthetic
    model, mean, std = write_datamodels(store, tmp_path / "dm.pt", target_start=target_start, target_end=target_end)
    res = run_evaluation(EvaluateConfig(datamodels=str(tmp_path / "dm.pt"), out=str(tmp_path / "eval"),
                                        log_model=False), quiet=True)
    held = np.arange(120, N)
    np.testing.assert_array_equal(res.heldout.indices, held)
    x = np.asarray(store.array("masks"), dtype=np.float64)[held]
    y = np.asarray(store.array("margins"), dtype=np.float64)[held][:, target_start:target_end]
    pred = model.predict((x - mean) / std)
    want = np.mean([spearmanr(pred[:, j], y[:, j]).statistic for j in range(y.shape[1])])
    assert res.scores.lds == pytest.approx(want, abs=1e-5)
    assert res.scores.r2 == pytest.approx(r2_score(y, pred), abs=1e-4)
    assert res.scores.lds > 0.8  # a planted linear truth with little noise is recovered
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_target.csv")))
    assert [int(r["target"]) for r in rows] == list(range(target_start, target_end))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_heldout"] == N - 120 and metrics["lds"] == pytest.approx(res.scores.lds)
    assert (tmp_path / "eval" / "scatter.png").stat().st_size > 1000
    run = tracking_client(tmp_path).get_run(res.run_id)
    assert run.data.metrics["lds"] == pytest.approx(res.scores.lds)
    assert run.data.params["target_start"] == str(target_start)


def test_heldout_store_gives_the_direct_answer(synthetic):
    tmp_path, store = synthetic
    model, mean, std = write_datamodels(store, tmp_path / "dm.pt")
    other, _, _ = make_store(tmp_path / "other", n=25, seed=0, complete=range(0, 25, 2))
    res = run_evaluation(EvaluateConfig(datamodels=str(tmp_path / "dm.pt"), heldout_store=str(other.path),
                                        log_model=False, figure=False), quiet=True)
    held = np.arange(0, 25, 2)
    np.testing.assert_array_equal(res.heldout.indices, held)
    x = np.asarray(other.array("masks"), dtype=np.float64)[held]
    y = np.asarray(other.array("margins"), dtype=np.float64)[held]
    pred = model.predict((x - mean) / std)
    assert res.scores.lds == pytest.approx(np.mean([spearmanr(pred[:, j], y[:, j]).statistic for j in range(T)]),
                                           abs=1e-5)


def own_mlflow_db(cwd):
    """Create ``cwd/mlflow.db`` here, so ``cli_env`` does not copy its session template into place.

    (The template is written through this process's SQLite connections, which ``tracking`` puts in
    WAL mode once an in-process test has logged a run; a copy of the main file alone can then miss
    the last schema migration, still in the -wal file.)
    """
    tracking_client(cwd).search_experiments()


def test_evaluate_cli_prints_and_logs(synthetic):
    tmp_path, store = synthetic
    write_datamodels(store, tmp_path / "dm.pt")
    own_mlflow_db(tmp_path)
    proc = run_cli("evaluate", "datamodels=dm.pt", "out=eval", cwd=tmp_path, check=True)
    # write_datamodels records no store fingerprint: evaluate says, in one line, what it could not check
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:") and "fingerprint" in ln] == [
        "warning: dm.pt records no store fingerprint (fitted before fingerprints were recorded, "
        f"or by the original tools): the store at {store.path} is checked by its sizes and completed models "
        f"only, not by its masks; make sure it is the store the datamodels were fitted on"]
    value = float(re.search(r"LDS \(mean Spearman\): (-?[0-9.]+)", proc.stdout).group(1))
    assert value > 0.8
    runs = search_runs(tmp_path, "tags.`datamodels.stage` = 'evaluate'", training=False)
    assert len(runs) == 1 and runs[0].data.metrics["lds"] == pytest.approx(value, abs=1e-4)
    assert runs[0].data.metrics["n_heldout"] == N - 120
    low, high = (float(v) for v in re.search(r"LDS 95% interval: +\[(-?[0-9.]+), (-?[0-9.]+)\]", proc.stdout).groups())
    assert low < value < high and runs[0].data.metrics["lds_low"] == pytest.approx(low, abs=1e-4)
    assert runs[0].data.tags["method"] == "datamodels"
    # 40 held-out models cannot give an interval 0.02 wide: evaluate says so, with the models it would take
    assert re.search(r"warning: the LDS's 95% interval is 0\.\d+ wide \(> 0\.02\) with 40 held-out models: "
                     r"about \d+ held-out models would narrow it", proc.stderr)
    models = tracking_client(tmp_path).search_logged_models(experiment_ids=[runs[0].info.experiment_id])
    assert [m.source_run_id for m in models] == [runs[0].info.run_id]  # the pyfunc model of the datamodels


@pytest.mark.parametrize("case, message", [
    ("features", r"dm\.pt has 20 features but 'masks' in the store at .*store has shape \[30\] per model; "
                 r"evaluate the datamodels on the store they were fitted on"),
    ("no_heldout", r"no held-out models: all 120 completed models of .*store were used by the regression "
                   r"\(train/val\); train more models \(train n=\.\.\.\) or give heldout_store=DIR"),
    ("targets", r"dm\.pt covers targets 4\.\.7 but 'margins' in the store at .*store has 6 targets per model"),
    ("missing", r"datamodels file not found: .*nope\.pt"),
    ("not_datamodels", r"dm\.pt: not a datamodels file \(missing key 'mean'; expected weight, bias, mean, std\)"),
    ("negative_start", r"dm\.pt records target_start=-2, below 0: the fitted targets must be a slice of the "
                       r"store's outputs starting at 0 or later$"),
    ("no_targets", r"dm\.pt holds no targets \('weight' has shape \[30, 0\]\): nothing to evaluate$"),
])
def test_bad_inputs_fail_with_one_clear_message(tmp_path, case, message):
    complete = range(120) if case == "no_heldout" else None
    store, _, _ = make_store(tmp_path / "store", complete=complete)
    path = tmp_path / "dm.pt"
    if case == "features":
        write_datamodels(store, path, n_features=20)
    elif case == "targets":
        write_datamodels(store, path)
        data = torch.load(path)
        data.update(weight=torch.zeros(P, 4), bias=torch.zeros(4), target_start=4, target_end=8)
        torch.save(data, path)
    elif case in ("negative_start", "no_targets"):
        write_datamodels(store, path)
        data = torch.load(path)
        t = 2 if case == "negative_start" else 0
        data.update(weight=torch.zeros(P, t), bias=torch.zeros(t), target_start=-t, target_end=0)
        torch.save(data, path)
    elif case == "not_datamodels":
        torch.save({"weight": torch.zeros(3, 2), "bias": torch.zeros(2), "std": torch.ones(3)}, path)
    else:
        write_datamodels(store, path)
    target = "nope.pt" if case == "missing" else "dm.pt"
    with pytest.raises(UserError, match=message):
        run_evaluation(EvaluateConfig(datamodels=str(tmp_path / target), log_model=False), quiet=True)
    if case not in ("features", "no_heldout", "negative_start"):  # the CLI path is the same for all: a few
        return
    before = path.read_bytes()
    own_mlflow_db(tmp_path)
    proc = run_cli("evaluate", f"datamodels={target}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr.strip().removeprefix("error: ")), proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert path.read_bytes() == before  # nothing destroyed


def test_store_recorded_in_the_file_must_exist(tmp_path):
    store, _, _ = make_store(tmp_path / "store")
    write_datamodels(store, tmp_path / "dm.pt", store_path=tmp_path / "moved")
    with pytest.raises(UserError, match=r"the store recorded in .*dm\.pt does not exist: .*moved; give store=DIR"):
        run_evaluation(EvaluateConfig(datamodels=str(tmp_path / "dm.pt"), log_model=False), quiet=True)


def test_heldout_models_with_nan_outputs_are_left_out(synthetic, capsys):
    tmp_path, store = synthetic
    model, mean, std = write_datamodels(store, tmp_path / "dm.pt")
    y = store.array("margins")
    y[130, 2] = np.nan
    y.flush()
    res = run_evaluation(EvaluateConfig(datamodels=str(tmp_path / "dm.pt"), log_model=False, figure=False), quiet=True)
    assert "note: left out 1 held-out models whose 'margins' holds NaN or inf" in capsys.readouterr().out
    held = np.setdiff1d(np.arange(120, N), [130])
    np.testing.assert_array_equal(res.heldout.indices, held)
    assert np.isfinite(res.scores.lds) and res.scores.n_models == N - 121


def test_no_warning_when_the_store_fingerprint_is_checked(synthetic, capsys):
    from datamodels_ml.provenance import fingerprint, fingerprint_rows

    tmp_path, store = synthetic
    write_datamodels(store, tmp_path / "dm.pt")
    data = torch.load(tmp_path / "dm.pt")
    rows = fingerprint_rows(TRAIN)
    data["store_fingerprint"] = fingerprint(rows, np.asarray(store.array("masks"))[rows])
    torch.save(data, tmp_path / "dm.pt")
    run_evaluation(EvaluateConfig(datamodels=str(tmp_path / "dm.pt"), log_model=False, figure=False,
                                  bootstrap=0), quiet=True)  # no interval: its width warning is tested apart
    assert "warning" not in capsys.readouterr().err


def scored_store(tmp_path, monkeypatch, seed: int):
    """A store, datamodels fitted on it (``write_datamodels``) and a noisy attribution of the planted
    truth ``[training examples, targets]``, with MLflow in ``tmp_path``: what other methods are scored on."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    store, w, _ = make_store(tmp_path / "store")
    write_datamodels(store, tmp_path / "dm.pt")
    return tmp_path, store, w + np.random.default_rng(seed).normal(scale=0.8, size=w.shape)

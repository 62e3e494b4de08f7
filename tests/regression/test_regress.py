"""regress: the command end to end on the digits example, its outputs and MLflow run, its errors, and
``fit`` recovering a planted sparse model."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, EXPERIMENT, run_cli, search_runs, tracking_client
from datamodels_ml.config import load
from datamodels_ml.dataset.write_dataset import write_beton
from datamodels_ml.errors import UserError
from datamodels_ml.datamodel import Datamodels
from datamodels_ml.regression.config import RegressConfig
from datamodels_ml.regression.regress import fit
from datamodels_ml.regression.output_dir import is_up_to_date
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import Store, create_store

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

TINY = str(CONFIGS / "reg_tiny.yaml")
N_DIGITS = 48
K = 10  # cfg.k of reg_tiny.yaml
T = 20  # targets [0:20] in reg_tiny.yaml


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A store of 48 digits models (trained by the real CLI) and its .beton."""
    root = tmp_path_factory.mktemp("digits")
    run_cli("train", "store=store", f"spec={CONFIGS / 'digits_spec.json'}", "main=datamodels_ml.examples.digits",
            f"n={N_DIGITS}", "jobs=2", "args.epochs=30", "progress=false", cwd=root, check=True)
    write_beton(root / "store", root / "reg.beton", progress=False)  # the command itself: test_dataset.py
    return root


def _tree_digest(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def test_regress_end_to_end(digits, tmp_path):
    out = tmp_path / "results"
    run_cli("regress", f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}",
            f"cfg.min_lambdas={K}", cwd=tmp_path, check=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "datamodels.pt", "manifest.json",
                                                     "path.png", "targets.csv"]  # .lock: regress holds it while it runs
    dm = torch.load(out / "datamodels.pt", weights_only=False)
    p = 1000
    shapes = {"weight": (p, T), "bias": (T,), "lam": (T,), "mean": (p,), "std": (p,), "lam_path": (K, T),
              "val_mse": (K, T), "train_mse": (K, T), "nnz": (K, T), "best_index": (T,)}
    for key, shape in shapes.items():
        assert tuple(dm[key].shape) == shape, key
    assert dm["weight"].dtype == torch.float32
    assert dm["format_version"] == 1
    assert (dm["target_start"], dm["target_end"], dm["x_name"], dm["y_name"]) == (0, T, "masks", "margins")
    assert dm["store"] == str((digits / "store").resolve())
    assert dm["config"]["data"]["num_train"] == 30 and dm["config"]["cfg"]["method"] == "saga"
    train, val = dm["train_indices"].numpy(), dm["val_indices"].numpy()
    assert dm["train_indices"].dtype == torch.long and (len(train), len(val)) == (30, 10)
    assert not set(train) & set(val) and set(train) | set(val) <= set(range(N_DIGITS))

    # predictions from raw masks beat the training mean on the validation models
    store = Store(digits / "store", writable=False)
    x, y = store.array("masks")[val], store.array("margins")[val][:, :T]
    pred = ((x - dm["mean"].numpy()) / dm["std"].numpy()) @ dm["weight"].numpy() + dm["bias"].numpy()
    np.testing.assert_allclose(pred, Datamodels.from_dict(dm).predict(x), rtol=1e-5, atol=1e-5)
    baseline = store.array("margins")[train][:, :T].astype(np.float64).mean(0)
    assert ((pred - y) ** 2).mean() < ((baseline - y) ** 2).mean()

    lines = (out / "targets.csv").read_text().splitlines()
    assert lines[0] == "target,lam,lam_ratio,best_val_mse,nnz_at_best,val_r2" and len(lines) == T + 1

    client = tracking_client(tmp_path)
    [run] = search_runs(tmp_path)
    assert re.fullmatch(rf"regress-saga-k{K}-n30-[0-9a-f]{{6}}", run.info.run_name), run.info.run_name
    assert run.info.status == "FINISHED"
    note = run.data.tags["mlflow.note.content"]
    assert "step = round(100·log10(λ_max/λ))" in note and "**best_val_mse**" in note
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {k: run.data.tags[k] for k in ("datamodels.stage", "method", "k", "num_train")} == \
        {"datamodels.stage": "regress", "method": "saga", "k": str(K), "num_train": "30"}
    steps = [round(200 * i / (K - 1)) for i in range(K)]  # 100 * log10(λ_max / λ) on the grid 1 .. 0.01
    for metric in ("val_mse", "train_mse", "nnz", "lam_ratio", "active_fraction"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == steps, metric
    lam_ratio = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lam_ratio")}
    assert lam_ratio[0] == pytest.approx(1.0) and lam_ratio[200] == pytest.approx(0.01)
    assert all(lam_ratio[s] == pytest.approx(10 ** (-s / 100), rel=0.012) for s in steps)
    for metric in ("best_val_mse", "mean_nnz_at_best", "mean_val_r2", "epochs", "fit_seconds"):
        assert metric in run.data.metrics
    assert run.data.params["data.num_train"] == "30" and run.data.params["cfg.k"] == str(K)
    assert run.data.params["data.data_path"] == str(digits / "reg.beton")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "datamodels.pt", "path.png", "targets.csv", "path_table.json"} <= artifacts
    import mlflow.pyfunc

    [model] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "datamodels"
    served = mlflow.pyfunc.load_model(model.artifact_location)
    np.testing.assert_allclose(served.predict(x.astype(bool)), Datamodels.from_dict(dm).predict(x), rtol=1e-6)

    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}",
                               f"cfg.min_lambdas={K}"], config_key="config")
    assert is_up_to_date(cfg)
    cfg.cfg.k = 11
    assert not is_up_to_date(cfg)


BAD = {
    "unknown key": (["cfg.bogus=1"], "unknown config key 'cfg.bogus' (from the command line)"),
    "missing data_path": (["data.data_path=__drop__"], "missing required config key 'data.data_path'"),
    "too many models": (["data.num_train=40", "data.num_val=10"],
                        "data.num_train + data.num_val = 50 exceeds the 48 models in {beton}"),
    "bad k": (["cfg.k=0"], "cfg.k must be >= 1, got 0"),
    "existing out_dir": (["cfg.force=false"], "cfg.out_dir {out} already holds a fit with other settings or data: "
                                              "give this one its own cfg.out_dir=..., or cfg.force=true to replace it"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_keep_existing_out_dir(digits, tmp_path, case):
    out = tmp_path / "results"
    out.mkdir()
    (out / "datamodels.pt").write_bytes(b"older results")
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "inputs": {}}))  # an older regression
    (out / "notes.txt").write_text("the user's")
    before = _tree_digest(out)
    overrides, message = BAD[case]
    args = [f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}"]
    if case != "existing out_dir":
        args.append("cfg.force=true")  # even with force, a refused command keeps the old results
    if case == "missing data_path":
        args = [a for a in args if not a.startswith("data.data_path")]
    else:
        args += overrides
    proc = run_cli("regress", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: " + message.format(beton=digits / "reg.beton", out=out)
    assert _tree_digest(out) == before


def test_the_same_fit_again_is_reused_not_refused(digits, tmp_path):
    """``make regress`` after ``make demo``: the out_dir holds this very fit, so it is reused (exit 0,
    no new run, nothing written); a fit with other settings there is refused in one line."""
    out = tmp_path / "results"
    args = [f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}", "cfg.progress=false"]
    run_cli("regress", *args, cwd=tmp_path, check=True)
    before = _tree_digest(out)
    [fitted] = search_runs(tmp_path)
    again = run_cli("regress", *args, cwd=tmp_path, check=True)
    assert f"regress: {out} already holds this fit (same config and data, MLflow run {fitted.info.run_id}): " \
           "reused, nothing refitted (cfg.force=true fits again)" in again.stderr
    assert _tree_digest(out) == before and len(search_runs(tmp_path)) == 1
    other = run_cli("regress", *args, "cfg.k=7", cwd=tmp_path, check=False)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: cfg.out_dir {out} already holds a fit with other settings or data: give this one its own "
        "cfg.out_dir=..., or cfg.force=true to replace it")


def test_mlflow_run_of_the_same_fit_is_reused(digits, tmp_path):
    """The README's ``mlflow run . -e regress -P config=... --env-manager local`` after the demo: the
    run MLflow made ends FINISHED, named after the fit, linked to the run that fitted it."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    out = tmp_path / "results"
    config = tmp_path / "reg.yaml"
    config.write_text((CONFIGS / "reg_tiny.yaml").read_text())
    args = [f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}"]
    run_cli("regress", f"config={config}", *args, cwd=tmp_path, check=True)
    import yaml

    doc = yaml.safe_load(config.read_text())
    doc["data"]["data_path"], doc["cfg"]["out_dir"] = str(digits / "reg.beton"), str(out)
    config.write_text(yaml.safe_dump(doc))
    [fitted] = search_runs(tmp_path)
    env = cli_env(tmp_path)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    mlflow_cli = shutil.which("mlflow", path=env["PATH"])
    proc = subprocess.run([mlflow_cli, "run", str(ROOT), "-e", "regress", "-P", f"config={config}",
                           "--env-manager", "local"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    runs = tracking_client(tmp_path).search_runs(
        [e.experiment_id for e in tracking_client(tmp_path).search_experiments()])
    [made] = [r for r in runs if r.info.run_id != fitted.info.run_id]
    assert made.info.status == "FINISHED" and made.info.run_name == fitted.info.run_name
    assert made.data.tags["datamodels.reused_run_id"] == fitted.info.run_id


# -- fit on a planted sparse model -----------------------------------------------------------------
N_SYN, P_SYN, T_SYN = 600, 30, 3
SUPPORT = {0: [1, 5, 9, 20], 1: [0, 2, 3, 29], 2: [7, 8, 14, 15]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A .beton of masks -> outputs with a known 4-sparse linear model per target (+ offset 3)."""
    root = tmp_path_factory.mktemp("planted")
    spec = {"num_models": N_SYN, "schema": {"masks": {"shape": [P_SYN], "dtype": "bool_"},
                                            "with_bias": {"shape": [T_SYN], "dtype": "float32"},
                                            "no_bias": {"shape": [T_SYN], "dtype": "float32"}}}
    store = create_store(root / "store", parse_spec(spec))
    rng = np.random.default_rng(0)
    w = np.zeros((P_SYN, T_SYN))
    for t, cols in SUPPORT.items():
        w[cols, t] = rng.choice([-1.0, 1.0], size=len(cols)) * rng.uniform(1.0, 2.0, size=len(cols))
    x = rng.random((N_SYN, P_SYN)) < 0.5
    signal = (2.0 * x - 1.0) @ w  # (x - 0.5) / 0.5: the standardized scale
    noise = 0.1 * rng.normal(size=(N_SYN, T_SYN))
    for i in range(N_SYN):
        store.write_row(i, {"masks": x[i], "with_bias": (signal[i] + 3.0 + noise[i]).astype(np.float32),
                            "no_bias": (signal[i] + noise[i]).astype(np.float32)})
    for y_name in ("with_bias", "no_bias"):
        write_beton(store.path, root / f"{y_name}.beton", y_name=y_name, progress=False)
    return root, w, x, signal


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("method", ["saga", "fista"])
def test_fit_recovers_planted_support(planted, method, use_bias):
    root, w, x, signal = planted
    y_name = "with_bias" if use_bias else "no_bias"
    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={root / y_name}.beton", "cfg.out_dir=unused",
                               "data.num_train=400", "data.num_val=150", "data.target_end_ind=-1", "cfg.k=20",
                               "cfg.eps=0.001", "cfg.batch_size=50", f"cfg.method={method}", f"cfg.use_bias={use_bias}",
                               "cfg.max_epochs=100", "cfg.tol=1e-8"], config_key="config")
    dm = fit(cfg, progress=False, log=False)
    weight = dm["weight"].numpy()
    assert weight.shape == (P_SYN, T_SYN)
    for t, cols in SUPPORT.items():
        top = np.argsort(-np.abs(weight[:, t]))[:len(cols)]
        assert sorted(top.tolist()) == cols
        np.testing.assert_allclose(weight[cols, t], w[cols, t], atol=0.15)
        assert np.abs(np.delete(weight[:, t], cols)).max() < 0.1
    truth = signal + (3.0 if use_bias else 0.0)  # the noise-free outputs
    # without an intercept, the offset left by centering on the train mean (~0.1) is not fitted
    assert np.sqrt(((Datamodels.from_dict(dm).predict(x) - truth) ** 2).mean()) < (0.1 if use_bias else 0.25)
    assert (dm["val_r2"].numpy() > 0.95).all()
    assert len(set(dm["train_indices"].tolist()) | set(dm["val_indices"].tolist())) == 550


def test_fit_split_is_seeded(planted):
    root = planted[0]
    args = [f"config={TINY}", f"data.data_path={root / 'with_bias.beton'}", "cfg.out_dir=unused", "cfg.k=2",
            "data.target_end_ind=-1",
            "cfg.method=fista", "cfg.refit=false"]
    a = fit(load(RegressConfig, args, config_key="config"), progress=False, log=False)
    b = fit(load(RegressConfig, args, config_key="config"), progress=False, log=False)
    c = fit(load(RegressConfig, args + ["data.seed=1"], config_key="config"), progress=False, log=False)
    assert a["train_indices"].tolist() == b["train_indices"].tolist()
    assert a["train_indices"].tolist() != c["train_indices"].tolist()


@pytest.mark.parametrize("override, message", [
    ("data.target_end_ind=4", "target range data.target_start_ind=0, data.target_end_ind=4 is not inside the 3 targets"),
    ("cfg.eps=0", "cfg.eps must be in (0, 1], got 0.0"),
    ("cfg.method=lars", "cfg.method must be saga or fista, got 'lars'"),
    ("cfg.batch_size=0", "cfg.batch_size must be >= 1, got 0"),
    ("cfg.target_block=-1", "cfg.target_block must be >= 0 (0: automatic), got -1"),
    ("gpus=64 cfg.device=auto", "gpus=64 but"),
    ("gpus=1 cfg.device=cpu", "gpus=1 spreads the blocks over CUDA devices: leave cfg.device auto or cuda, not 'cpu'"),
])
def test_fit_rejects_bad_values(planted, override, message):
    root = planted[0]
    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={root / 'with_bias.beton'}", "cfg.out_dir=unused",
                               "data.target_end_ind=-1", *override.split()], config_key="config")
    with pytest.raises(UserError, match="^" + re.escape(message)):
        fit(cfg, progress=False, log=False)


def test_an_error_in_the_background_statistics_fails_the_command_cleanly(planted, tmp_path, monkeypatch):
    # the masks' statistics run in a thread while MLflow starts: their error is the command's,
    # the run ends FAILED and no results are written
    import datamodels_ml.regression.regress as regress_module
    from datamodels_ml.regression import block_fit

    def broken(p, device, widen=None):
        raise UserError("the masks could not be read")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(block_fit, "mask_statistics", broken)
    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={planted[0] / 'with_bias.beton'}",
                               f"cfg.out_dir={tmp_path / 'out'}", "data.target_end_ind=-1", "cfg.method=fista"],
               config_key="config")
    with pytest.raises(UserError, match="^the masks could not be read$"):
        regress_module.regress(cfg)
    assert not (tmp_path / "out" / "datamodels.pt").exists()
    [run] = search_runs(tmp_path)
    assert run.info.status == "FAILED"


def test_missing_beton_is_a_user_error(tmp_path):
    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={tmp_path / 'nope.beton'}", "cfg.out_dir=x"],
               config_key="config")
    with pytest.raises(UserError, match="^" + re.escape(f"dataset not found: {tmp_path / 'nope.beton'}")):
        fit(cfg, progress=False, log=False)


# -- the output directory: only our files are replaced ---------------------------------------------
def test_force_replaces_only_our_files(digits, tmp_path):
    out = tmp_path / "results"
    args = [f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}", "cfg.method=fista"]
    run_cli("regress", *args, cwd=tmp_path, check=True)
    (out / "notes.txt").write_text("the user's")
    (out / "mine").mkdir()
    (out / "mine" / "data.csv").write_text("1,2\n")
    first = torch.load(out / "datamodels.pt", weights_only=True)
    run_cli("regress", *args, "cfg.k=4", "cfg.force=true", cwd=tmp_path, check=True)
    assert (out / "notes.txt").read_text() == "the user's" and (out / "mine" / "data.csv").read_text() == "1,2\n"
    second = torch.load(out / "datamodels.pt", weights_only=True)
    assert first["lam_path"].shape[0] == K and second["lam_path"].shape[0] == 4
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "datamodels.pt", "manifest.json", "mine",
                                                     "notes.txt", "path.png", "targets.csv"]


def test_force_refuses_a_directory_that_is_not_ours(digits, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "manifest.json").write_text('{"name": "another tool"}')
    before = _tree_digest(out)
    proc = run_cli("regress", f"config={TINY}", f"data.data_path={digits / 'reg.beton'}", f"cfg.out_dir={out}",
                   "cfg.force=true", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cfg.out_dir {out} is not empty and holds no regression of ours (no manifest.json written by "
        "regress): choose another cfg.out_dir; cfg.force=true never replaces such a directory")
    assert _tree_digest(out) == before


DEMO_TINY = [f"config={CONFIGS / 'demo_tiny.yaml'}", f"spec={CONFIGS / 'digits_spec.json'}",
             f"reg_config={TINY}"]


@pytest.mark.parametrize("case", ["results", "beton"])
def test_demo_refuses_to_replace_what_it_did_not_write(tmp_path, case):
    """The demo always forces its outputs: a path naming the user's files is refused before training."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    target = mine if case == "results" else mine / "thesis.tex"
    proc = run_cli("demo", *DEMO_TINY, f"{case}={target}", "store=store", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    expected = (f"error: cfg.out_dir {mine} is not empty and holds no regression of ours (no manifest.json written "
                "by regress): choose another cfg.out_dir; cfg.force=true never replaces such a directory"
                if case == "results" else
                f"error: beton={target} exists but was not written by write_dataset (no {target}.json beside it): "
                "choose another beton path; the demo replaces only files it wrote")
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert (mine / "thesis.tex").read_text() == "years of work" and not (tmp_path / "store").exists()


def test_evaluate_refuses_to_overwrite_files_it_did_not_write(tmp_path):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "scatter.png").write_bytes(b"the user's figure")
    proc = run_cli("evaluate", "datamodels=dm.pt", f"out={out}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: out {out} holds scatter.png, which evaluate did not write (no metrics.json of an evaluation "
        "there): choose another out directory")
    assert (out / "scatter.png").read_bytes() == b"the user's figure"


def _path_result(val, best):
    val = torch.tensor(val, dtype=torch.float32)
    k, t = val.shape
    nnz = torch.arange(k * t, dtype=torch.float32).reshape(k, t)
    nnz[val.isnan()] = float("nan")  # the solver leaves a stopped target's entries NaN
    return {"val_mse": val, "train_mse": val / 2, "nnz": nnz,
            "best_index": torch.tensor(best), "lam_ratio": torch.tensor([[1.0] * t, [0.1] * t, [0.01] * t])}


def test_path_metric_is_the_mean_over_all_targets():
    """A target past its early stop counts with its selected value: the mean does not fall as
    targets stop (target 1 stops after index 1, having selected index 0)."""
    from datamodels_ml.regression.output_dir import path_curves

    nan = float("nan")
    lam, val, train, nnz = path_curves(_path_result([[2.0, 1.0], [1.0, 3.0], [0.5, nan]], [2, 0]))
    np.testing.assert_allclose(lam, [1.0, 0.1, 0.01])
    np.testing.assert_allclose(val, [1.5, 2.0, (0.5 + 1.0) / 2])  # not 0.5, the mean over target 0 alone
    np.testing.assert_allclose(train, val / 2)
    np.testing.assert_allclose(nnz, [0.5, 2.5, (4 + 1) / 2])


def test_two_fits_that_differ_get_different_names():
    """120 vs 30 training models (here 30 vs 20): never the same run name; the same fit again: the same."""
    from datamodels_ml.tracking.run_names import fit_name

    from datamodels_ml.evaluation.budget import load_regress_config
    from datamodels_ml.regression.output_dir import config_dict

    names = [fit_name(config_dict(load_regress_config(TINY, ["data.data_path=reg.beton", f"data.num_train={n}", f"cfg.out_dir=o{n}"])))
             for n in (30, 20, 30)]
    assert names[0] != names[1] and names[0] == names[2]
    assert names[0].startswith(f"saga-k{K}-n30-") and names[1].startswith(f"saga-k{K}-n20-")


def test_read_batches_of_byte_masks_are_larger_than_float_ones():
    # the Gram's counts are added to all p²/2 entries once per batch: 0/1 masks (multiplied as bytes)
    # are read in batches of up to 8192 rows within 256 MB of bytes; float masks within 256 MB of
    # float32; saga its minibatch
    from types import SimpleNamespace

    import numpy as np

    from datamodels_ml.regression.block_fit import read_rows

    fista, saga = SimpleNamespace(method="fista", batch_size=200), SimpleNamespace(method="saga", batch_size=200)
    masks = lambda p, dtype: SimpleNamespace(n_features=p, x_dtype=np.dtype(dtype))  # noqa: E731
    assert read_rows(fista, masks(50_000, bool)) == 5368
    assert read_rows(fista, masks(50_000, np.uint8)) == 5368
    assert read_rows(fista, masks(1000, bool)) == 8192
    assert read_rows(fista, masks(50_000, np.float32)) == 1342
    assert read_rows(fista, masks(1000, np.float32)) == 4096
    assert read_rows(saga, masks(50_000, bool)) == 200

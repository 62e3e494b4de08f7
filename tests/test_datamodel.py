"""Datamodels: loading, prediction from raw masks, top-k on planted weights, and the MLflow pyfunc model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import cli_env
from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError


def planted(p=12, t=3, seed=0, *, zero_std=()):
    """A datamodels dict with known weights (standardized scale) and statistics."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.3, 0.6, size=p)
    for j in zero_std:
        std[j] = 0.0
    return {"weight": torch.tensor(rng.normal(size=(p, t)), dtype=torch.float32),
            "bias": torch.tensor(rng.normal(size=t), dtype=torch.float32),
            "lam": torch.full((t,), 0.1), "mean": torch.tensor(rng.uniform(0.3, 0.7, size=p), dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32), "target_start": 5, "target_end": 5 + t,
            "x_name": "masks", "y_name": "margins", "store": None, "format_version": 1}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["bool", "int", "float", "torch"])
def test_predict_equals_the_formula(seed, kind):
    data = planted(seed=seed)
    dm = Datamodels.from_dict(data)
    rng = np.random.default_rng(seed + 10)
    masks = rng.random((9, 12)) < 0.5
    x = {"bool": masks, "int": masks.astype(np.int64), "float": masks.astype(np.float32),
         "torch": torch.from_numpy(masks)}[kind]
    mean, std = data["mean"].double().numpy(), data["std"].double().numpy()
    want = ((masks - mean) / std) @ data["weight"].double().numpy() + data["bias"].double().numpy()
    got = dm.predict(x)
    assert got.shape == (9, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    w, b = dm.weights_raw_scale()
    np.testing.assert_allclose(masks @ w + b, want, rtol=1e-10, atol=1e-10)
    assert (dm.n_features, dm.n_targets) == (12, 3)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_and_dense_raw_weights_predict_the_same(monkeypatch, density):
    # raw-scale weights are held sparse up to SPARSE_DENSITY non-zeros: each form forced in turn
    import datamodels_ml.datamodel as dmod

    data = planted(seed=3, zero_std=(2,))
    data["weight"][2] = 0.7  # a constant feature's weight counts as zero in either form
    masks = np.random.default_rng(4).random((300, 12)) < 0.5  # more rows than one predict chunk
    monkeypatch.setattr(dmod, "_PREDICT_ROWS", 64)
    monkeypatch.setattr(dmod, "SPARSE_DENSITY", density)
    dm = Datamodels.from_dict(data)
    assert hasattr(dm._w_raw, "indptr") == (density == 1.0)
    assert dm.weight.dtype == np.float32  # the file's dtype: no float64 copy
    mean, std = data["mean"].double().numpy(), data["std"].double().numpy()
    z = np.where(std > 0, (masks - mean) / np.where(std > 0, std, 1), 0.0)
    want = z @ data["weight"].double().numpy() + data["bias"].double().numpy()
    np.testing.assert_allclose(dm.predict(masks), want, rtol=1e-10, atol=1e-10)
    w, b = dm.weights_raw_scale()
    assert isinstance(w, np.ndarray) and w.dtype == np.float64
    np.testing.assert_allclose(masks @ w + b, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(dm.nnz(), (w != 0).sum(axis=0))
    assert dm.nnz()[0] == (data["weight"][:, 0].numpy()[std > 0] != 0).sum()
    top = dm.top_k(0, k=2)
    np.testing.assert_allclose(top.positive_weights, w[top.positive_indices, 0])


def test_zero_std_features_count_as_zero():
    data = planted(zero_std=(2,))
    dm = Datamodels.from_dict(data)
    masks = np.zeros((2, 12), dtype=bool)
    masks[1, 2] = True  # toggling a feature with std 0 changes nothing
    pred = dm.predict(masks)
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred[0], pred[1])


def test_top_k_on_planted_weights():
    p = 20
    w = np.zeros((p, 2))
    w[[3, 7, 11, 15], 1] = [0.5, 2.0, -1.0, -3.0]
    w[[0, 1], 0] = [1.0, 1.0]
    std = np.full(p, 0.5)
    data = {"weight": torch.tensor(w * std[:, None]), "bias": torch.zeros(2), "mean": torch.full((p,), 0.5),
            "std": torch.tensor(std), "target_start": 10, "target_end": 12}
    dm = Datamodels.from_dict(data)
    top = dm.top_k(1, k=3)
    assert top.target == 1 and top.absolute_target == 11
    np.testing.assert_array_equal(top.positive_indices, [7, 3])  # only the non-zero weights, largest first
    np.testing.assert_allclose(top.positive_weights, [2.0, 0.5])  # raw scale: the planted values
    np.testing.assert_array_equal(top.negative_indices, [15, 11])
    np.testing.assert_allclose(top.negative_weights, [-3.0, -1.0])
    top0 = dm.top_k(0, k=1)
    np.testing.assert_array_equal(top0.positive_indices, [0])  # ties: the lower index first
    assert top0.negative_indices.size == 0
    with pytest.raises(UserError, match=r"target 2 out of range: the datamodels cover targets 0\.\.1 "
                                        r"\(store targets 10\.\.11\)"):
        dm.top_k(2)


@pytest.mark.parametrize("case, message", [
    ("missing", r"datamodels file not found: .*absent\.pt"),
    ("keys", r"dm\.pt: not a datamodels file \(missing key 'std'; expected weight, bias, mean, std\)"),
    ("list", r"dm\.pt: not a datamodels file \(expected a dict, got list\)"),
    ("shape", r"dm\.pt: 'mean' has 11 entries, expected 12 to match 'weight' \[12, 3\]"),
    ("garbage", r"dm\.pt: cannot read as a datamodels file"),
])
def test_load_errors(tmp_path, case, message):
    path = tmp_path / "dm.pt"
    data = planted()
    if case == "keys":
        del data["std"]
    if case == "list":
        data = [1, 2]
    if case == "shape":
        data["mean"] = data["mean"][:11]
    if case == "garbage":
        path.write_bytes(b"not a torch file")
    elif case != "missing":
        torch.save(data, path)
    with pytest.raises(UserError, match=message):
        Datamodels.load(tmp_path / "absent.pt" if case == "missing" else path)


def test_load_and_predict_errors(tmp_path):
    torch.save(planted(), tmp_path / "datamodels.pt")
    dm = Datamodels.load(tmp_path)  # regress's out_dir works as well as the file in it
    assert dm.n_features == 12
    with pytest.raises(UserError, match=r"masks have shape \[4, 11\]; expected \[n, 12\]"):
        dm.predict(np.zeros((4, 11), dtype=bool))


def test_pyfunc_model_predicts_like_datamodels(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts of the experiments it creates: ./mlruns
    import mlflow.pyfunc

    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.pyfunc import log_datamodels_model

    data = planted(p=40, t=5, seed=3)
    torch.save(data, tmp_path / "datamodels.pt")
    with tracking.run("pyfunc-test"):
        uri = log_datamodels_model(tmp_path / "datamodels.pt")
    assert uri is not None
    model = mlflow.pyfunc.load_model(uri)
    dm = Datamodels.load(tmp_path / "datamodels.pt")
    masks = np.random.default_rng(0).random((17, 40)) < 0.5
    np.testing.assert_array_equal(model.predict(masks), dm.predict(masks))
    import pandas as pd

    np.testing.assert_array_equal(model.predict(pd.DataFrame(masks)), dm.predict(masks))
    schema = model.metadata.get_input_schema()
    assert schema.inputs[0].shape == (-1, 40)
    with pytest.raises(Exception, match=r"Shape of input \(3, 39\) does not match expected shape"):
        model.predict(np.zeros((3, 39), dtype=bool))

    # What `mlflow models serve --env-manager local` runs: the scoring server's JSON input (0/1 ints).
    (tmp_path / "in.json").write_text(json.dumps({"inputs": masks.astype(int).tolist()}))
    proc = subprocess.run([sys.executable, "-m", "mlflow", "models", "predict", "-m", uri, "-i", "in.json", "-t", "json",
                           "--env-manager", "local", "-o", "out.json"], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.array(json.loads((tmp_path / "out.json").read_text())["predictions"])
    np.testing.assert_allclose(served, dm.predict(masks), rtol=1e-12)

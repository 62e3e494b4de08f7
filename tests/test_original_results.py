"""A ``datamodels.pt`` of the original tools (weight, bias, lam only) is read with the standardization
recovered from the original regression config and its .beton, and scored by ``evaluate``.

The original file is written here from its documented format (not by the original code): a lasso fitted
on the first num_train + num_val rows of the .beton, standardized with their population mean/std."""

import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import Lasso

from conftest import run_cli
from datamodels_ml.datamodel import Datamodels
from datamodels_ml.dataset.reader import read_beton
from datamodels_ml.errors import UserError
from conftest import make_store

NUM_TRAIN, NUM_VAL = 90, 30


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    store, _, _ = make_store(root / "store", n=160, seed=3)
    run_cli("write_dataset", f"store={store.path}", f"out={root / 'd.beton'}", "x_name=masks", "y_name=margins",
            "progress=false", cwd=root, check=True)
    x, y, idx = read_beton(root / "d.beton", np.arange(NUM_TRAIN + NUM_VAL))
    x = x.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    model = Lasso(alpha=0.02).fit((x - mean) / np.where(std > 0, std, 1), y[:, 1:5])
    torch.save({"weight": torch.tensor(model.coef_.T, dtype=torch.float32),
                "bias": torch.tensor(model.intercept_, dtype=torch.float32),
                "lam": torch.full((4,), 0.02)}, root / "datamodels.pt")
    config = {"data": {"data_path": str(root / "d.beton"), "num_train": NUM_TRAIN, "num_val": NUM_VAL, "seed": 0,
                       "target_start_ind": 1, "target_end_ind": 5},
              "cfg": {"k": 10, "lr": 0.01, "eps": 1e-5, "batch_size": 30, "out_dir": str(root / "out"),
                      "num_workers": 8, "use_bias": 1},
              "early_stopping": {"check_every": 2, "eps": 5e-1}}
    (root / "regression_config.yaml").write_text(yaml.safe_dump(config))
    return root, model, mean, std, idx


def test_original_file_needs_its_config(original):
    root, *_ = original
    with pytest.raises(UserError, match=r"written by the original tools \(weight, bias, lam only\): give "
                                        r"original_config="):
        Datamodels.load(root / "datamodels.pt")


def test_original_file_predicts_as_the_original_standardized(original):
    root, model, mean, std, idx = original
    dm = Datamodels.load(root / "datamodels.pt", original_config=root / "regression_config.yaml")
    np.testing.assert_allclose(dm.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(dm.std, std, rtol=1e-12)
    assert dm.indices("train_indices").tolist() == idx[:NUM_TRAIN].tolist()
    assert dm.indices("val_indices").tolist() == idx[NUM_TRAIN:].tolist()
    assert (dm.target_start, dm.target_end) == (1, 5)
    masks = np.random.default_rng(0).random((20, mean.size)) < 0.5
    want = model.predict((masks - mean) / np.where(std > 0, std, 1))
    np.testing.assert_allclose(dm.predict(masks), want, rtol=1e-5, atol=1e-5)


def test_evaluate_scores_an_original_result(original):
    root, *_ = original
    proc = run_cli("evaluate", f"datamodels={root / 'datamodels.pt'}", f"original_config={root / 'regression_config.yaml'}",
                   f"out={root / 'eval'}", cwd=root, check=True)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["n_heldout"] == 160 - NUM_TRAIN - NUM_VAL and metrics["target_start"] == 1
    assert metrics["lds"] > 0.5, proc.stdout


@pytest.mark.parametrize("text, message", [
    (None, r"original regression config not found: .*nope\.yaml"),
    ("data: [unclosed", r"cfg\.yaml: not valid YAML"),
    ("cfg:\n  k: 3\n", r"cfg\.yaml: no 'data' section"),
    ("data:\n  data_path: x.beton\n  num_train: 3\n", r"cfg\.yaml: missing data\.num_val"),
])
def test_bad_original_config_is_one_clear_error(original, tmp_path, text, message):
    root, *_ = original
    config = tmp_path / ("nope.yaml" if text is None else "cfg.yaml")
    if text is not None:
        config.write_text(text)
    with pytest.raises(UserError, match=message):
        Datamodels.load(root / "datamodels.pt", original_config=config)

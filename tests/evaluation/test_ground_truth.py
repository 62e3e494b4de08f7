"""Ground truth out (export_lds) and back in (evaluate ground_truth=DIR): files written in each layout are
read the way dattri's, TRAK's and kronfluence's LDS code reads them (re-stated here, the tools not installed),
and read back by evaluate they reproduce the store's LDS; files written by the tools' scripts are read too."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import run_cli, search_runs
from datamodels_ml.evaluation import ground_truth
from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.evaluate import EvaluateConfig, run_evaluation
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store
from test_evaluate import N, P, T, scored_store

HELD = np.arange(120, N)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    return scored_store(tmp_path, monkeypatch, 3)


def spearman_mean(pred, actual):
    return float(np.mean([spearmanr(pred[:, j], actual[:, j]).statistic for j in range(actual.shape[1])]))


def tool_lds(fmt, directory, scores):
    """The LDS as each tool's own LDS code computes it from the exported files."""
    if fmt == "trak":  # TRAK's quickstart: masks = np.load('mask.npy'); preds = masks @ scores
        masks = np.load(directory / "mask.npy").astype(np.float64)
        margins = np.load(directory / "val_margins.npy")
    elif fmt == "kronfluence":  # examples/*/evaluate_lds.py: torch.from_numpy(torch.load(open(..., 'rb')))
        masks = torch.from_numpy(torch.load(open(directory / "masks.pt", "rb"), weights_only=False)).double().numpy()
        margins = torch.from_numpy(torch.load(open(directory / "margins.pt", "rb"), weights_only=False)).numpy()
    elif fmt == "dattri":  # dattri.metric.lds: sum_scores[i] = score.T[:, indices[i]].sum(dim=1)
        values = torch.load(directory / "target_values_lds.pt")
        indices = torch.load(directory / "indices_lds.pt")
        st = torch.tensor(scores).T
        sums = torch.stack([st[:, indices[i]].sum(dim=1) for i in range(len(indices))]).numpy()
        return spearman_mean(sums, values.numpy())
    else:
        with np.load(directory / "ground_truth.npz") as z:
            masks, margins = z["masks"].astype(np.float64), z["outputs"]
    return spearman_mean(masks @ scores, margins)


@pytest.mark.parametrize("fmt", ground_truth.FORMATS)
def test_export_is_read_by_the_tools_and_back_by_evaluate(setup, fmt):
    tmp_path, store, scores = setup
    out = tmp_path / f"gt_{fmt}"
    run_cli("export_lds", "store=store", f"out={out.name}", f"format={fmt}", "datamodels=dm.pt", cwd=tmp_path,
            check=True)
    x = np.asarray(store.array("masks"), dtype=np.float64)[HELD]
    y = np.asarray(store.array("margins"), dtype=np.float32).astype(np.float64)[HELD]
    want = spearman_mean(x @ scores, y)
    assert tool_lds(fmt, out, scores) == pytest.approx(want, abs=1e-6)
    # and back in: the store's own LDS, for the datamodels and for the score matrix
    base = run_evaluation(EvaluateConfig(datamodels="dm.pt", log_model=False, bootstrap=0), quiet=True)
    back = run_evaluation(EvaluateConfig(datamodels="dm.pt", ground_truth=str(out), log_model=False, bootstrap=0),
                          quiet=True)
    np.testing.assert_array_equal(back.heldout.indices, HELD)
    assert back.scores.lds == pytest.approx(base.scores.lds, abs=1e-6)
    np.save(tmp_path / "s.npy", scores)
    res = run_evaluation(EvaluateConfig(scores="s.npy", ground_truth=str(out), format=fmt, bootstrap=0), quiet=True)
    assert res.scores.lds == pytest.approx(want, abs=1e-6)


def test_dattri_indices_are_one_tensor_when_subsets_have_equal_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rng = np.random.default_rng(0)
    spec = parse_spec({"num_models": 12, "schema": {"masks": {"shape": [10], "dtype": "bool_"},
                                                    "margins": {"shape": [3], "dtype": "float32"}}})
    st = create_store(tmp_path / "store", spec)
    for i in range(12):
        mask = np.zeros(10, dtype=bool)
        mask[rng.choice(10, 5, replace=False)] = True
        st.write_row(i, {"masks": mask, "margins": rng.normal(size=3).astype(np.float32)})
    ground_truth.export_lds(ground_truth.ExportConfig(store=str(tmp_path / "store"), out=str(tmp_path / "gt"),
                                                      format="dattri"))
    indices = torch.load(tmp_path / "gt" / "indices_lds.pt")
    assert isinstance(indices, torch.Tensor) and indices.shape == (12, 5)  # what dattri's lds() indexes
    np.testing.assert_array_equal(np.asarray(st.array("masks"))[3], np.isin(np.arange(10), indices[3].numpy()))


def test_files_written_by_the_tools_scripts_are_read_without_our_json(setup):
    tmp_path, store, scores = setup
    x = np.asarray(store.array("masks"))[HELD]
    y = np.asarray(store.array("margins"))[HELD]
    want = spearman_mean(x.astype(np.float64) @ scores, y.astype(np.float64))
    trak = tmp_path / "trak_gt"
    trak.mkdir()
    np.save(trak / "mask.npy", x)
    np.save(trak / "val_margins.npy", y)
    dattri = tmp_path / "dattri_gt"
    dattri.mkdir()
    torch.save(torch.tensor(y), dattri / "target_values_lds.pt")
    torch.save([torch.from_numpy(np.flatnonzero(m)) for m in x], dattri / "indices_lds.pt")
    np.save(tmp_path / "s.npy", scores)
    for directory in (trak, dattri):  # format auto: by the files present; dattri's size: the scores' rows
        res = run_evaluation(EvaluateConfig(scores="s.npy", ground_truth=str(directory), bootstrap=0), quiet=True)
        assert res.scores.lds == pytest.approx(want, abs=1e-6)
        assert res.heldout.indices.tolist() == [-1] * HELD.size  # store rows unknown


def test_refusals_are_one_line(setup):
    tmp_path, _, _ = setup
    run_cli("export_lds", "store=store", "out=gt", "format=trak", cwd=tmp_path, check=True)
    meta = json.loads((tmp_path / "gt" / "ground_truth.json").read_text())
    assert meta["models"] == "completed" and len(meta["indices"]) == N and meta["n_train"] == P
    runs = search_runs(tmp_path, "tags.`datamodels.stage` = 'export_lds'", training=False)
    assert len(runs) == 1 and runs[0].data.metrics["n_models"] == N
    proc = run_cli("export_lds", "store=store", "out=gt", "format=trak", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("mask.npy exists: give force=true to replace it, or another out directory")
    proc = run_cli("export_lds", "store=store", "out=gt2", "format=csv", cwd=tmp_path, check=False)
    assert proc.stderr.strip() == "error: format must be one of npz, trak, kronfluence, dattri, got 'csv'"
    proc = run_cli("export_lds", "store=store", "out=gt2", "bogus=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown config key 'bogus'" in proc.stderr
    np.save(tmp_path / "s.npy", np.zeros((P, T + 2)))
    with pytest.raises(UserError, match=r"have shape \[30, 8\] .* the outputs of the ground truth in .*gt have "
                                         r"shape \[160, 6\] \(\[models, targets\]\): the targets differ"):
        run_evaluation(EvaluateConfig(scores="s.npy", ground_truth="gt"), quiet=True)
    with pytest.raises(UserError, match=r"store holds no ground-truth layout \(none of npz, trak, kronfluence, dattri\)"):
        run_evaluation(EvaluateConfig(scores="s.npy", ground_truth="store"), quiet=True)

"""evaluate scores=FILE: a score matrix saved in each supported layout (numpy, torch, dattri, kronfluence's
safetensors, TRAK's save_dir as TRAK writes it) gives the LDS a direct scipy computation gives on the same
held-out models as the datamodels' evaluation (real files, real MLflow store, the CLI in a subprocess)."""

import json
import re
import struct

import numpy as np
import pytest
import torch
from numpy.lib.format import open_memmap
from scipy.stats import pearsonr, spearmanr

from conftest import run_cli, search_runs, tracking_client
from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.evaluate import EvaluateConfig, run_evaluation
from datamodels_ml.evaluation.scores import read_safetensors, read_scores
from test_evaluate import N, P, T, scored_store, write_datamodels

HELD = np.arange(120, N)  # the models write_datamodels' regression did not use


@pytest.fixture
def setup(tmp_path, monkeypatch):
    return scored_store(tmp_path, monkeypatch, 7)


def direct(store, scores, held=HELD):
    """LDS and mean Pearson of masks @ scores, computed with scipy, target by target."""
    x = np.asarray(store.array("masks"), dtype=np.float64)[held]
    y = np.asarray(store.array("margins"), dtype=np.float64)[held]
    pred = x @ scores
    return (np.mean([spearmanr(pred[:, j], y[:, j]).statistic for j in range(y.shape[1])]),
            np.mean([pearsonr(pred[:, j], y[:, j]).statistic for j in range(y.shape[1])]))


def write_safetensors(path, tensors):
    """The safetensors layout (8-byte header length, JSON header, raw data), written here byte by byte."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_trak(save_dir, scores, exp="quickstart", finalized=1):
    """A TRAK save_dir as traker's savers.MmapSaver leaves it after finalize_scores (float16 scores)."""
    (save_dir / "scores").mkdir(parents=True)
    (save_dir / "metadata.json").write_text(json.dumps(
        {"JL dimension": 2048, "JL matrix type": "rademacher", "train set size": scores.shape[0]}))
    (save_dir / "experiments.json").write_text(json.dumps({exp: {
        "num_targets": scores.shape[1], "scores_path": str(save_dir / "scores" / f"{exp}.mmap"),
        "scores_finalized": finalized}}))
    mm = open_memmap(save_dir / "scores" / f"{exp}.mmap", mode="w+", dtype=np.float16, shape=scores.shape)
    mm[:] = scores
    mm.flush()


LAYOUTS = ["npy", "pt_tensor", "pt_numpy", "dattri", "kronfluence", "trak", "loss_scores"]


def save_layout(tmp_path, layout, scores):
    """Save ``scores`` the way ``layout``'s tool does; returns (path, extra settings, the values as stored)."""
    if layout == "npy":
        np.save(tmp_path / "s.npy", scores)
        return tmp_path / "s.npy", {}, scores
    if layout == "pt_tensor":
        torch.save(torch.tensor(scores, dtype=torch.float64), tmp_path / "s.pt")
        return tmp_path / "s.pt", {}, scores
    if layout == "pt_numpy":
        torch.save(scores, tmp_path / "s.pt")
        return tmp_path / "s.pt", {}, scores
    if layout == "dattri":  # attributor.attribute(...) returns a float32 tensor [train, test]
        torch.save(torch.tensor(scores, dtype=torch.float32), tmp_path / "dattri_scores.pt")
        return tmp_path / "dattri_scores.pt", {}, scores.astype(np.float32)
    if layout == "kronfluence":  # pairwise_scores.safetensors, key all_modules, [query, train]
        write_safetensors(tmp_path / "pairwise_scores.safetensors", {"all_modules": scores.T})
        return tmp_path / "pairwise_scores.safetensors", {"transpose": True}, scores.astype(np.float32)
    if layout == "trak":
        write_trak(tmp_path / "trak_results", scores)
        return tmp_path / "trak_results", {}, scores.astype(np.float16)
    np.save(tmp_path / "loss.npy", -scores)  # scores of a loss: positive raises the loss
    return tmp_path / "loss.npy", {"sign": -1.0}, scores


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_direct_lds(setup, layout):
    tmp_path, store, scores = setup
    path, extra, stored = save_layout(tmp_path, layout, scores)
    res = run_evaluation(EvaluateConfig(scores=str(path), datamodels=str(tmp_path / "dm.pt"), bootstrap=0, **extra),
                         quiet=True)
    np.testing.assert_array_equal(res.heldout.indices, HELD)  # the datamodels' held-out models
    want_lds, want_pearson = direct(store, np.asarray(stored, dtype=np.float64))
    assert res.scores.lds == pytest.approx(want_lds, abs=1e-6)
    assert res.scores.pearson == pytest.approx(want_pearson, abs=1e-6)
    run = tracking_client(tmp_path).get_run(res.run_id)
    assert run.data.metrics["lds"] == pytest.approx(want_lds, abs=1e-6) and "r2" not in run.data.metrics


def test_a_per_target_offset_changes_nothing_and_scale_gives_r2(setup):
    tmp_path, store, scores = setup
    np.save(tmp_path / "s.npy", scores)
    base = run_evaluation(EvaluateConfig(scores="s.npy", datamodels="dm.pt", bootstrap=0), quiet=True)
    scaled = run_evaluation(EvaluateConfig(scores="s.npy", datamodels="dm.pt", bootstrap=0, scale=True), quiet=True)
    assert scaled.scores.lds == pytest.approx(base.scores.lds, abs=1e-12)
    assert scaled.scores.pearson == pytest.approx(base.scores.pearson, abs=1e-12)
    x = np.asarray(store.array("masks"), dtype=np.float64)[HELD]
    y = np.asarray(store.array("margins"), dtype=np.float64)[HELD]
    pred = x @ scores
    pred += (y - pred).mean(axis=0)
    r2 = np.mean(1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    assert scaled.scores.r2 == pytest.approx(r2, abs=1e-9)


def test_store_alone_uses_every_completed_model(setup):
    tmp_path, store, scores = setup
    np.save(tmp_path / "s.npy", scores)
    res = run_evaluation(EvaluateConfig(scores="s.npy", store="store", bootstrap=0), quiet=True)
    assert res.heldout.indices.size == N
    assert res.scores.lds == pytest.approx(direct(store, scores, np.arange(N))[0], abs=1e-6)


def test_cli_logs_a_method_run_next_to_the_datamodels_evaluation(setup):
    tmp_path, store, scores = setup
    torch.save(torch.tensor(scores), tmp_path / "if_scores.pt")
    run_cli("evaluate", "datamodels=dm.pt", "log_model=false", "bootstrap=50", cwd=tmp_path, check=True)
    proc = run_cli("evaluate", "scores=if_scores.pt", "method=influence", "datamodels=dm.pt", "bootstrap=50",
                   cwd=tmp_path, check=True)
    value = float(re.search(r"LDS \(mean Spearman\): (-?[0-9.]+)", proc.stdout).group(1))
    assert value == pytest.approx(direct(store, scores)[0], abs=1e-4)
    assert "a per-target offset changes no rank correlation" in proc.stdout
    assert re.search(r"LDS 95% interval: +\[", proc.stdout)
    runs = search_runs(tmp_path, "tags.`datamodels.stage` = 'evaluate'", training=False)
    by_method = {r.data.tags["method"]: r for r in runs}
    assert set(by_method) == {"datamodels", "influence"}
    assert by_method["influence"].info.experiment_id == by_method["datamodels"].info.experiment_id
    assert by_method["influence"].info.run_name == "evaluate-influence"
    m = by_method["influence"].data.metrics
    assert m["lds_low"] < m["lds"] < m["lds_high"]


@pytest.mark.parametrize("shape, message", [
    ((P + 1, T), r"scores .*s\.npy have shape \[31, 6\] \(\[training examples, targets\]\) but the masks of the "
                 r"held-out models of .*dm\.pt in .*store have shape \[40, 30\] \(\[models, training examples\]\): "
                 r"the training examples differ$"),
    ((P, T + 1), r"scores .*s\.npy have shape \[30, 7\] \(\[training examples, targets\]\) but the outputs of .* "
                 r"have shape \[40, 6\] \(\[models, targets\]\): the targets differ$"),
    ((T, P), r"have shape \[6, 30\] .* the training examples differ \(transpose=true reads \[targets, training "
             r"examples\]\)$"),
])
def test_a_shape_that_does_not_match_is_refused_naming_both(setup, shape, message):
    tmp_path, _, _ = setup
    np.save(tmp_path / "s.npy", np.zeros(shape))
    with pytest.raises(UserError, match=message):
        run_evaluation(EvaluateConfig(scores="s.npy", datamodels="dm.pt"), quiet=True)
    if shape != (P + 1, T):
        return
    proc = run_cli("evaluate", "scores=s.npy", "datamodels=dm.pt", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: scores ") and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error")]) == 1


def test_trak_files_are_checked_against_what_trak_records(tmp_path):
    scores = np.arange(12.0).reshape(4, 3)
    write_trak(tmp_path / "t", scores)
    np.testing.assert_array_equal(read_scores(tmp_path / "t"), scores)
    np.testing.assert_array_equal(read_scores(tmp_path / "t" / "scores" / "quickstart.mmap"), scores)
    meta = json.loads((tmp_path / "t" / "metadata.json").read_text())
    (tmp_path / "t" / "metadata.json").write_text(json.dumps({**meta, "train set size": 5}))
    with pytest.raises(UserError, match=r"quickstart\.mmap has shape \[4, 3\] but TRAK records \[5, 3\]"):
        read_scores(tmp_path / "t")
    write_trak(tmp_path / "u", scores, finalized=0)
    with pytest.raises(UserError, match=r"'quickstart' in .*u is not finalized .*finalize_scores"):
        read_scores(tmp_path / "u")


def test_safetensors_reader_matches_bf16_and_f32(tmp_path):
    a = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "x.safetensors", {"all_modules": a, "other": a[:1]})
    got = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["all_modules"], a)
    np.testing.assert_array_equal(read_scores(tmp_path / "x.safetensors"), a.astype(np.float64))
    with pytest.raises(UserError, match=r"has no key 'nope' \(it has: all_modules, other\)"):
        read_scores(tmp_path / "x.safetensors", key="nope")

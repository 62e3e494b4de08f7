"""The demo pipeline end to end on configs/demo_tiny.yaml (real training, FFCV, lasso, MLflow), its
reuse of finished stages on a second run, and the model-budget curve on the same data."""

import csv
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CONFIGS, TRAIN_EXPERIMENT, cli_env, search_runs, tracking_client
from datamodels_ml.datamodel import Datamodels

STAGES = ("init", "train", "write_dataset", "regress")


def run_demo(cwd, *args):
    """``python -m datamodels_ml demo ...`` in ``cwd``; returns (process, seconds)."""
    cmd = [sys.executable, "-m", "datamodels_ml", "demo", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(cwd), capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - t0


TINY = [f"config={CONFIGS / 'demo_tiny.yaml'}", f"spec={CONFIGS / 'digits_spec.json'}",
        f"reg_config={CONFIGS / 'reg_tiny.yaml'}"]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The tiny demo run twice in the same directory: (cwd, first, second, seconds1, seconds2)."""
    cwd = tmp_path_factory.mktemp("demo")
    tracking_client(cwd).search_experiments()  # its own MLflow store (see test_evaluate.own_mlflow_db)
    first, t1 = run_demo(cwd, *TINY, "progress=true")  # bars into a pipe: see test_progress_in_a_pipe
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    second, t2 = run_demo(cwd, *TINY)
    assert second.returncode == 0, f"stdout:\n{second.stdout}\nstderr:\n{second.stderr}"
    return cwd, first, second, t1, t2


def _lds(stdout):
    match = re.search(r"^LDS = (-?[0-9.]+) on (\d+) held-out models, (\d+) targets", stdout, re.M)
    assert match, stdout
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def test_first_run_does_every_stage_and_prints_the_lds(demo_runs):
    cwd, first, _, _, _ = demo_runs
    lds, n_heldout, n_targets = _lds(first.stdout)
    assert -1 <= lds <= 1 and n_heldout == 60 - 30 - 10 and n_targets == 20
    for stage in (*STAGES, "evaluate"):
        assert re.search(rf"^{stage}\s+ran\s", first.stdout, re.M), first.stdout
    assert "make ui" in first.stdout
    for name in ("data/digits/reg_data.beton", "data/digits/reg_results/datamodels.pt",
                 "data/digits/evaluate/per_target.csv", "data/digits/evaluate/scatter.png",
                 "data/digits/evaluate/digits_influence.png"):
        assert (cwd / name).is_file(), name


def test_progress_in_a_pipe(demo_runs):
    """Piped output gets labelled plain lines (at most one per tenth, plus one every 10 s), no \\r."""
    _, first, _, t1, _ = demo_runs
    assert "\r" not in first.stderr and "\r" not in first.stdout
    labels = ("train", "write_dataset: checking rows", "write_dataset: writing rows", "regress")
    counts = {label: len(re.findall(rf"^{label}: \d+(/\d+)? \w+s( \(\d+%\))?, \d+ s", first.stderr, re.M))
              for label in labels}
    assert all(1 <= c <= 11 + t1 / 10 for c in counts.values()), (counts, first.stderr)
    assert re.search(r"^train: 60/60 models \(100%\), \d+ s, completed=60, failed=0$", first.stderr, re.M)
    assert re.search(r"^write_dataset: writing rows: 60/60 rows \(100%\)", first.stderr, re.M), first.stderr


def test_second_run_reuses_the_finished_stages(demo_runs):
    _, first, second, t1, t2 = demo_runs
    for stage in STAGES:
        assert re.search(rf"^{stage}: .*: skipped$", second.stdout, re.M), second.stdout
        assert re.search(rf"^{stage}\s+reused\s", second.stdout, re.M), second.stdout
    assert re.search(r"^evaluate\s+ran\s", second.stdout, re.M)
    assert _lds(second.stdout) == _lds(first.stdout)  # same datamodels, same held-out models
    assert t2 < t1


def test_mlflow_holds_one_parent_run_with_a_nested_run_per_stage(demo_runs):
    """The demo and its stages in experiment 'datamodels'; its train run (with the model runs) in
    'datamodels-train', linked to the demo by tags; every run named by what it is. A rerun adds
    the demo run and its evaluation only: reused stages are tags on it, not runs."""
    cwd, _, _, _, _ = demo_runs
    client = tracking_client(cwd)
    parents = search_runs(cwd, "tags.`pipeline.stage` = 'pipeline'", order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    first, second = parents
    for parent in parents:
        assert parent.info.run_name == "demo-60" and parent.info.status == "FINISHED"
    children = search_runs(cwd, f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    stages = {c.data.tags["datamodels.stage"]: c for c in children}
    [train] = search_runs(cwd, f"tags.`pipeline.parent_run_id` = '{first.info.run_id}'", training=True)
    stages["train"] = train
    assert set(stages) == {*STAGES, "evaluate"} and len(children) == 4, sorted(stages)
    assert first.data.tags["pipeline.train_run_id"] == train.info.run_id
    assert client.get_experiment(train.info.experiment_id).name == TRAIN_EXPERIMENT
    for stage in STAGES:
        assert stages[stage].info.run_name.startswith(f"{stage}-") and "reused" not in stages[stage].info.run_name
    assert stages["regress"].info.run_name.startswith("regress-fista-k")
    assert first.data.metrics["lds"] == pytest.approx(stages["evaluate"].data.metrics["lds"])
    [again] = search_runs(cwd, f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    assert again.data.tags["datamodels.stage"] == "evaluate"
    assert again.info.run_name == stages["evaluate"].info.run_name  # the same fit, the same name
    assert search_runs(cwd, f"tags.`pipeline.parent_run_id` = '{second.info.run_id}'", training=True) == []
    for stage in STAGES:
        assert second.data.tags[f"pipeline.{stage}"] == "reused" and second.data.tags[f"pipeline.{stage}_note"]
    assert second.data.metrics["lds"] == pytest.approx(again.data.metrics["lds"])
    assert all("reused" not in r.info.run_name for r in search_runs(cwd) + search_runs(cwd, training=True))
    first_train = search_runs(cwd, f"tags.`pipeline.parent_run_id` = '{first.info.run_id}'", training=True)[0]
    assert first_train.info.run_name == "train-60"
    models = search_runs(cwd, f"tags.mlflow.parentRunId = '{first_train.info.run_id}'", training=True)
    assert sorted(m.info.run_name for m in models) == sorted(f"model-{i}" for i in range(60))


def test_budget_curve_on_the_demo_data(demo_runs):
    cwd, _, _, _, _ = demo_runs
    args = ["budget", f"reg_config={CONFIGS / 'reg_tiny.yaml'}", "reg.data.data_path=data/digits/reg_data.beton",
            "reg.cfg.out_dir=unused", "reg.cfg.method=fista", "fractions=[0.5,1.0]", "out=budget"]
    proc = subprocess.run([sys.executable, "-m", "datamodels_ml", *args], cwd=cwd, env=cli_env(cwd),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "core-seconds" in proc.stdout and "note:" not in proc.stdout, proc.stdout
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+(-?[0-9.]+|nan)\s", proc.stdout, re.M)
    assert [(int(n), int(used)) for n, used, _, _ in rows] == [(15, 25), (30, 40)], proc.stdout  # + 10 val
    with open(cwd / "budget" / "budget.csv") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:4] == ["num_models", "models_used", "compute_seconds", "lds"]
    # the compute of the full point: the recorded seconds of the demo regression's 40 models (same split)
    seconds = {}
    for train_run in search_runs(cwd, "tags.`datamodels.stage` = 'train'", training=True):  # the second reused
        children = search_runs(cwd, f"tags.mlflow.parentRunId = '{train_run.info.run_id}'", training=True)
        seconds.update({int(c.data.params["index"]): c.data.metrics["duration"] for c in children})
    assert len(seconds) == 60
    dm = Datamodels.load(cwd / "data/digits/reg_results/datamodels.pt")
    expected = sum(seconds[int(i)] for i in np.union1d(dm.indices("train_indices"), dm.indices("val_indices")))
    assert float(table[1]["compute_seconds"]) == pytest.approx(expected, rel=1e-6)
    assert 0 < float(table[0]["compute_seconds"]) < float(table[1]["compute_seconds"])
    assert (cwd / "budget" / "budget.png").is_file()
    # each point's bootstrap interval, and one line on whether more models still pay
    assert all(float(r["lds_low"]) <= float(r["lds"]) <= float(r["lds_high"]) for r in table)
    assert re.search(r"^(more models still pay|more models do not pay \(the LDS falls\)|no clear gain from more "
                     r"models): [+-]0\.\d+ LDS per doubling of the models \(95% interval [+-]0\.\d+ to [+-]0\.\d+\)",
                     proc.stdout, re.M), proc.stdout
    [run] = search_runs(cwd, "tags.`datamodels.stage` = 'budget'")
    assert {"lds_low", "lds_high", "lds_slope_per_doubling"} <= set(run.data.metrics)
    assert run.info.run_name == "budget-fista-n15-30"
    history = tracking_client(cwd).get_metric_history(run.info.run_id, "lds")
    assert sorted(m.step for m in history) == [25, 40]  # step: models used
    assert run.data.params["compute_unit"] == "core-seconds"
    assert not (cwd / "unused").exists()  # fit writes no files


def test_demo_refuses_a_split_that_leaves_nothing_to_evaluate(demo_runs):
    cwd, _, _, _, _ = demo_runs
    proc, _ = run_demo(cwd, *TINY, "reg.data.num_train=50")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: the regression uses data.num_train + data.num_val = 60 models but there are only 60: "
        "none would be left to evaluate on; raise n or lower them (reg.data.num_train=...)")
    assert (cwd / "data/digits/reg_results/datamodels.pt").is_file()  # the finished regression is kept

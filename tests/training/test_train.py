"""The training stage through the real CLI: init, worker, train, status, with a real MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS, MAINS, ROOT, cli_env, run_cli, search_runs

SPEC = str(CONFIGS / "minimal_spec.json")
FLAKY = str(MAINS / "flaky.py")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def runs_of(tmp_path, parent_id=None):
    runs = search_runs(tmp_path, training=True)
    if parent_id is not None:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    return runs


def parent_run(tmp_path):
    runs = [r for r in runs_of(tmp_path) if r.data.tags.get("datamodels.stage") == "train"]
    return sorted(runs, key=lambda r: r.info.start_time)[-1]


# -- init ------------------------------------------------------------------------------------
def test_init_creates_store_and_rerun_is_noop(cli, tmp_path):
    out = cli("init", f"spec={SPEC}", "store=st", check=True)
    assert "created store st for 100 models" in out.stdout
    assert sorted(os.listdir(tmp_path / "st")) == [".lock", "_completed.npy", "index.npy", "spec.json", "values.npy"]
    before = snapshot(tmp_path / "st")
    out = cli("init", f"spec={SPEC}", "store=st", check=True)
    assert "already exists with this spec: nothing to do" in out.stdout
    assert snapshot(tmp_path / "st") == before


@pytest.mark.parametrize("args, message", [
    (["spec=nope.json", "store=st"], "error: spec file not found: nope.json"),
    (["spec=bad.json", "store=st"], "error: bad.json: spec key 'a/b': use letters"),
    (["store=st"], "error: missing required config key 'spec'"),
    ([f"spec={SPEC}", "store=st", "bogus=1"], "error: unknown config key 'bogus'"),
    ([f"spec={SPEC}", "store=st", "force=maybe"], "error: invalid value for 'force'"),
    ([f"spec={SPEC}", "store"], "error: expected key=value, got 'store'"),
])
def test_init_bad_inputs(cli, tmp_path, args, message):
    (tmp_path / "bad.json").write_text(json.dumps({"num_models": 2, "schema": {"a/b": {"shape": [1], "dtype": "uint8"}}}))
    out = cli("init", *args, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "st").exists()


def test_init_refuses_other_spec_and_keeps_store(cli, tmp_path):
    cli("init", f"spec={SPEC}", "store=st", check=True)
    cli("worker", "store=st", "index=4", "main=datamodels_ml.examples.minimal", "args.multiple=9", check=True)
    before = snapshot(tmp_path / "st")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"num_models": 7, "schema": {"values": {"shape": [10], "dtype": "uint8"}}}))
    out = cli("init", f"spec={other}", "store=st", check=False)
    assert out.returncode == 2
    assert "error: a store with a different spec already exists at st (num_models 100 there, 7 requested)" in out.stderr
    assert snapshot(tmp_path / "st") == before


# -- worker ----------------------------------------------------------------------------------
def test_worker_writes_row_and_is_its_own_run(cli, tmp_path):
    cli("init", f"spec={SPEC}", "store=st", check=True)
    out = cli("worker", "store=st", "index=5", "main=datamodels_ml.examples.minimal", "args.multiple=7", check=True)
    assert "model 5 completed" in out.stdout
    assert np.load(tmp_path / "st" / "values.npy")[5].tolist() == [7] * 10
    assert np.load(tmp_path / "st" / "_completed.npy").nonzero()[0].tolist() == [5]
    (run,) = runs_of(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"store": "st", "index": "5", "main": "datamodels_ml.examples.minimal", "args.multiple": "7"}
    assert run.data.tags["status"] == "completed"
    assert run.data.metrics["index"] == 5.0 and "duration" in run.data.metrics
    again = cli("worker", "store=st", "index=5", "main=datamodels_ml.examples.minimal", check=True)
    assert "already complete" in again.stdout
    assert len(runs_of(tmp_path)) == 1


def test_worker_failure_is_recorded(cli, tmp_path):
    cli("init", f"spec={SPEC}", "store=st", check=True)
    out = cli("worker", "store=st", "index=3", f"main={FLAKY}", check=False)
    assert out.returncode == 2
    assert "error: model 3 failed: RuntimeError: planted failure at 3" in out.stderr
    assert not np.load(tmp_path / "st" / "_completed.npy").any()
    (run,) = runs_of(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert "planted failure at 3" in run.data.tags["error"]


@pytest.mark.parametrize("args, message", [
    (["store=nowhere", "index=0", "main=datamodels_ml.examples.minimal"], "error: no store at nowhere (neither spec.json nor _completed.npy)"),
    (["store=st", "index=100", "main=datamodels_ml.examples.minimal"], "error: index 100 out of range: the store holds models 0..99"),
    (["store=st", "index=0", "main=no_such_module"], "error: cannot import main module 'no_such_module': no module named 'no_such_module'"),
    (["store=st", "index=0", f"main={MAINS / 'broken_import.py'}"], "error: cannot import main module"),
    (["store=st", "index=0", "main=json"], "error: module 'json' has no function main"),
    (["store=st", "index=x", "main=json"], "error: invalid value for 'index'"),
])
def test_worker_bad_inputs(cli, tmp_path, args, message):
    cli("init", f"spec={SPEC}", "store=st", check=True)
    before = snapshot(tmp_path / "st")
    out = cli("worker", *args, check=False)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(tmp_path / "st") == before


def test_worker_timeout(cli, tmp_path):
    cli("init", f"spec={SPEC}", "store=st", check=True)
    out = cli("worker", "store=st", "index=1", f"main={MAINS / 'misbehave.py'}", "timeout=1", check=False)
    assert "error: model 1 failed: timed out after 1 s" in out.stderr


# -- train -----------------------------------------------------------------------------------
def test_train_crash_and_resume(cli, tmp_path):
    out = cli("train", "store=st", f"spec={SPEC}", f"main={FLAKY}", "n=12", "jobs=2", "progress=false", check=False)
    assert out.returncode == 1
    assert "train: 8 completed, 4 failed, 0 not run (8/12 complete in st)" in out.stdout
    assert "failed indices: 0, 3, 6, 9" in out.stdout
    assert "RuntimeError: planted failure at 0" in out.stdout
    done = np.load(tmp_path / "st" / "_completed.npy")
    assert done[:12].nonzero()[0].tolist() == [1, 2, 4, 5, 7, 8, 10, 11]
    status = cli("status", "store=st", check=True).stdout
    assert "completed: 8/100" in status and "failures of the last train (4):" in status
    assert "9: RuntimeError: planted failure at 9" in status
    assert "training model 4" in (tmp_path / "st" / "workers" / "4" / "output.log").read_text()

    parent = parent_run(tmp_path)
    assert parent.info.status == "FAILED"
    assert {k: parent.data.params[k] for k in ("n", "gpus", "jobs", "main", "store")} == {
        "n": "12", "gpus": "0", "jobs": "2", "main": FLAKY, "store": "st"}
    assert parent.data.metrics["progress"] == 1.0
    children = runs_of(tmp_path, parent.info.run_id)
    assert sorted(int(c.data.params["index"]) for c in children) == list(range(12))
    failed = {int(c.data.params["index"]) for c in children if c.info.status == "FAILED"}
    assert failed == {0, 3, 6, 9}
    assert all(c.data.tags["status"] == ("failed" if int(c.data.params["index"]) in failed else "completed") for c in children)
    assert "planted failure at 6" in next(c for c in children if c.data.params["index"] == "6").data.tags["error"]
    assert all("duration" in c.data.metrics for c in children)

    (tmp_path / "st" / "calls.log").unlink()
    out = cli("train", "store=st", f"main={FLAKY}", "n=12", "jobs=2", "args.fixed=true", "progress=false", check=True)
    assert "train: 4 completed, 0 failed" in out.stdout
    calls = sorted(int(x) for x in (tmp_path / "st" / "calls.log").read_text().split())
    assert calls == [0, 3, 6, 9]
    values = np.load(tmp_path / "st" / "values.npy")
    assert [int(values[i, 0]) for i in range(12)] == list(range(12))
    out = cli("train", "store=st", f"main={FLAKY}", "n=12", check=True)
    assert "all 12 models are already complete" in out.stdout


def test_train_timeout_dead_process_bad_result(cli, tmp_path):
    out = cli("train", "store=st", f"spec={SPEC}", f"main={MAINS / 'misbehave.py'}", "n=6", "jobs=2",
              "timeout=2", "progress=false", check=False)
    assert out.returncode == 1
    assert "train: 3 completed, 3 failed" in out.stdout
    done = np.load(tmp_path / "st" / "_completed.npy")
    assert done[:6].nonzero()[0].tolist() == [0, 4, 5]
    children = {int(c.data.params["index"]): c for c in runs_of(tmp_path, parent_run(tmp_path).info.run_id)}
    assert "timed out after 2 s" in children[1].data.tags["error"]
    assert "runner process died while training this model: exit code 3" in children[2].data.tags["error"]
    assert "invalid result: key 'values': shape [11] does not match the spec's [10]" in children[3].data.tags["error"]


@pytest.mark.parametrize("args, message", [
    (["store=st", "main=datamodels_ml.examples.minimal", "n=5"], "error: no store at st: give spec=PATH to create it"),
    (["store=st", f"spec={SPEC}", "main=datamodels_ml.examples.minimal", "n=101"], "error: n=101 but the store at st holds only 100 models"),
    (["store=st", f"spec={SPEC}", "main=datamodels_ml.examples.minimal", "n=0"], "error: n must be a positive number of models, got 0"),
    (["store=st", f"spec={SPEC}", "main=nope_mod", "n=3"], "error: cannot start the workers: cannot import main module 'nope_mod'"),
    (["store=st", f"spec={SPEC}", "main=datamodels_ml.examples.minimal", "n=3", "gpus=-1"], "error: gpus and jobs must be non-negative"),
])
def test_train_bad_inputs(cli, tmp_path, args, message):
    out = cli("train", *args, "progress=false", check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    if (tmp_path / "st" / "_completed.npy").exists():
        assert not np.load(tmp_path / "st" / "_completed.npy").any()


def test_concurrent_workers_share_store_and_tracking_db(tmp_path):
    run_cli("init", f"spec={SPEC}", "store=st", cwd=tmp_path, check=True)
    procs = [subprocess.Popen([sys.executable, "-m", "datamodels_ml", "worker", "store=st", f"index={i}",
                               "main=datamodels_ml.examples.minimal", f"args.multiple={i + 1}"],
                              cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1][-2000:] for o in outs]
    assert not any("locked" in o[1] for o in outs)
    values = np.load(tmp_path / "st" / "values.npy")
    assert [int(values[i, 0]) for i in range(8)] == [i + 1 for i in range(8)]
    runs = runs_of(tmp_path)
    assert sorted(int(r.data.params["index"]) for r in runs) == list(range(8))
    assert all(r.info.status == "FINISHED" for r in runs)

    # and 8 slots in one train: every row correct, every child run present
    out = run_cli("train", "store=st", "main=datamodels_ml.examples.minimal", "n=48", "jobs=8", "args.multiple=2",
                  "progress=false", cwd=tmp_path, check=True)
    assert "train: 40 completed, 0 failed" in out.stdout
    values = np.load(tmp_path / "st" / "values.npy")
    assert all(int(values[i, 0]) == 2 for i in range(8, 48))
    children = runs_of(tmp_path, parent_run(tmp_path).info.run_id)
    assert sorted(int(c.data.params["index"]) for c in children) == list(range(8, 48))


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    run_cli("init", f"spec={SPEC}", "store=st", cwd=tmp_path, check=True)
    proc = subprocess.Popen([sys.executable, "-m", "datamodels_ml", "train", "store=st", f"main={FLAKY}", "n=60",
                             "jobs=2", "args.fixed=true", "args.sleep=0.2", "progress=false"],
                            cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = tmp_path / "st" / "calls.log"
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 6):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: completed models are kept" in out
    assert "Traceback" not in err
    done = np.load(tmp_path / "st" / "_completed.npy")[:60]
    assert 0 < done.sum() < 60
    values = np.load(tmp_path / "st" / "values.npy")
    assert all(int(values[i, 0]) == i for i in np.flatnonzero(done))
    parent = parent_run(tmp_path)
    assert parent.info.status == "KILLED"
    assert len(runs_of(tmp_path, parent.info.run_id)) == int(done.sum())
    out = run_cli("train", "store=st", f"main={FLAKY}", "n=60", "jobs=2", "args.fixed=true", "progress=false",
                  cwd=tmp_path, check=True)
    assert f"train: {60 - int(done.sum())} completed, 0 failed" in out.stdout
    assert np.load(tmp_path / "st" / "_completed.npy")[:60].all()


def test_mlflow_run_worker_entry_point(tmp_path):
    run_cli("init", f"spec={SPEC}", "store=st", cwd=tmp_path, check=True)
    # --env-manager local runs the entry point with the `python` on PATH: the one running the tests
    env = cli_env(tmp_path, {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "worker",
                           "-P", f"store={tmp_path / 'st'}", "-P", "index=2", "-P", "main=datamodels_ml.examples.minimal",
                           "-P", "args.multiple=5", "--env-manager", "local", "--experiment-name", "datamodels-train"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "st" / "values.npy")[2].tolist() == [5] * 10
    (run,) = runs_of(tmp_path)  # in the experiment `mlflow run` made, now of the model-training kind
    assert run.info.status == "FINISHED" and run.info.run_name == "model-2"  # not MLflow's random name
    params = run.data.params
    assert params["index"] == "2" and params["args.multiple"] == "5" and params["main"] == "datamodels_ml.examples.minimal"
    assert sorted(params) == ["args.multiple", "index", "main", "overwrite", "store", "timeout"]
    assert run.data.tags["status"] == "completed"


def test_help_lists_keys(cli):
    top = cli("--help", check=True).stdout
    for command in ("init", "worker", "train", "status", "write_dataset", "regress", "evaluate"):
        assert f"  {command}" in top
    train = cli("train", "--help", check=True).stdout
    assert "gpus" in train and "args" in train and "(required)" in train


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    targets = [line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines()
               if line and not line.startswith(("\t", "#", ".", "$")) and ":" in line and "=" not in line.split(":")[0]
               and "##" in line]
    assert {"setup", "test", "demo", "train", "regress", "ui", "help"} <= set(targets)
    for target in targets:
        assert target in out

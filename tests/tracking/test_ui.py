"""The MLflow UI address: ``make ui`` (``python -m datamodels_ml.tracking.ui``) prints the runs table of the
``datamodels`` experiment, the way the installed MLflow's UI supports, and a command run while it
(or a tracking server) is up ends with its run's link."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, cli_env, free_port, run_cli, tracking_client
from datamodels_ml.tracking import links

BUNDLE = Path(__import__("mlflow").__file__).parent / "server" / "js" / "build" / "static" / "js"


def _bundle_text():
    return "".join(p.read_text(errors="replace") for p in BUNDLE.glob("*.js"))


def test_the_address_uses_what_the_installed_mlflow_ui_reads():
    """workflowType=machine_learning in the URL picks the UI's model-training pages (the experiment
    kind tag is not what it reads), and the runs page takes orderByKey/orderByAsc from the URL."""
    js = _bundle_text()
    assert 'MACHINE_LEARNING="machine_learning"' in js and 'get("workflowType")' in js
    assert '"searchFilter","orderByKey","orderByAsc"' in js
    assert links.experiment_url("http://h:1/", "7") == (
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning&orderByKey=metrics.%60best_val_mse%60"
        "&orderByAsc=true")
    assert links.run_url("http://h:1", "7", "abc") == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_no_link_without_a_ui(tmp_path):
    assert links.ui_base(f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path) is None
    assert links.ui_base("http://127.0.0.1:5999/") == "http://127.0.0.1:5999"


def _start_ui(cwd, port):
    env = cli_env(cwd)
    env.pop("MLFLOW_TRACKING_URI")
    proc = subprocess.Popen([sys.executable, "-m", "datamodels_ml.tracking.ui", "--no-browser", "--port", str(port)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.strip().startswith("http://"):
            return proc, line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("python -m datamodels_ml.tracking.ui printed no address")


def test_make_ui_prints_the_runs_table_and_commands_print_their_run(tmp_path):
    port = free_port()
    proc, url = _start_ui(tmp_path, port)
    try:
        client = tracking_client(tmp_path)
        exp = client.get_experiment_by_name("datamodels")
        assert url == links.experiment_url(f"http://127.0.0.1:{port}", exp.experiment_id)
        assert (tmp_path / links.UI_FILE).is_file()
        run_cli("init", f"spec={CONFIGS / 'minimal_spec.json'}", "store=st", cwd=tmp_path, check=True)
        out = run_cli("worker", "store=st", "index=0", "main=datamodels_ml.examples.minimal", cwd=tmp_path,
                      check=True).stdout
        [run] = client.search_runs([client.get_experiment_by_name("datamodels-train").experiment_id])
        assert out.strip().splitlines()[-1] == (
            f"MLflow run model-0: http://127.0.0.1:{port}/#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id}?workflowType=machine_learning")
        served = run_cli("worker", "store=st", "index=1", "main=datamodels_ml.examples.minimal", cwd=tmp_path,
                         env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, check=True)
        assert re.search(rf"^MLflow run model-1: http://127\.0\.0\.1:{port}/#/experiments/\d+/runs/[0-9a-f]+"
                         r"\?workflowType=machine_learning$", served.stdout, re.M), served.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not (tmp_path / links.UI_FILE).exists()
    later = run_cli("worker", "store=st", "index=2", "main=datamodels_ml.examples.minimal", cwd=tmp_path, check=True)
    assert "MLflow run" not in later.stdout

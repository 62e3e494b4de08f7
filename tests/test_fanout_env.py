"""GPU slots and tracking servers, exercised without a GPU: each slot process must see only its own
GPU through CUDA_VISIBLE_DEVICES, and train must log its child runs to an MLflow tracking server."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS, cli_env, run_cli
from datamodels_ml.errors import UserError
from datamodels_ml.fanout import slot_environments

SPEC = str(CONFIGS / "minimal_spec.json")
WHICH_GPU = str(Path(__file__).parent / "mains" / "which_gpu.py")


@pytest.mark.parametrize("gpus, jobs, visible, expected", [
    (0, 3, None, ["", "", ""]),
    (2, 0, None, ["0", "1"]),
    (2, 4, None, ["0", "1", "0", "1"]),
    (2, 0, "5,7,9", ["5", "7"]),
    (8, 0, None, [str(i) for i in range(8)]),
])
def test_slot_environments(monkeypatch, gpus, jobs, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in slot_environments(gpus, jobs)] == expected


def test_slot_environments_needs_enough_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(UserError, match=r"gpus=2 but CUDA_VISIBLE_DEVICES lists only 1 devices \(3\)"):
        slot_environments(2, 0)


def test_each_gpu_slot_sees_only_its_gpu(tmp_path):
    out = run_cli("train", "store=st", f"spec={SPEC}", f"main={WHICH_GPU}", "n=24", "gpus=2", "jobs=4",
                  "progress=false", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, check=False)
    # an empty CUDA_VISIBLE_DEVICES lists no device: refused with one message
    assert out.returncode == 2 and "gpus=2 but CUDA_VISIBLE_DEVICES lists only 0 devices" in out.stderr
    env = cli_env(tmp_path)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # all GPUs "visible": slots get 0 and 1
    proc = subprocess.run([sys.executable, "-m", "datamodels_ml", "train", "store=st", f"spec={SPEC}",
                           f"main={WHICH_GPU}", "n=24", "gpus=2", "jobs=4", "progress=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on 4 GPU slots" in proc.stdout
    seen = np.load(tmp_path / "st" / "index.npy")[:24]
    assert set(seen.tolist()) <= {0, 1} and {0, 1} <= set(seen.tolist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_logs_to_a_tracking_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        deadline = time.time() + 120
        while True:
            try:
                client.search_experiments()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        out = run_cli("train", "store=st", f"spec={SPEC}", "main=datamodels_ml.examples.minimal", "n=6", "jobs=2",
                      "args.multiple=4", "progress=false", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, check=True)
        assert "train: 6 completed, 0 failed" in out.stdout
        runs = client.search_runs([client.get_experiment_by_name("datamodels-train").experiment_id], max_results=100)
        parent = next(r for r in runs if r.info.run_name == "train-6")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(int(c.data.params["index"]) for c in children) == list(range(6))
        assert all(c.info.status == "FINISHED" and c.data.metrics["index"] == float(c.data.params["index"])
                   for c in children)
    finally:
        server.terminate()
        server.wait(timeout=30)

"""GPU slots and tracking servers, exercised without a GPU: each slot process must see only its own
GPU through CUDA_VISIBLE_DEVICES, and train must log its child runs to an MLflow tracking server."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, MAINS, MlflowServer, cli_env, run_cli
from datamodels_ml.errors import UserError
from datamodels_ml.training.local_slots import LocalSlots, slot_environments
from datamodels_ml.store.spec import load_spec
from datamodels_ml.store.store import create_store

SPEC = str(CONFIGS / "minimal_spec.json")
WHICH_GPU = str(MAINS / "which_gpu.py")


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


def test_each_gpu_slot_sees_only_its_gpu(tmp_path, monkeypatch):
    """The local back end as train runs it after its checks: each slot process sees its own GPU id
    (no CUDA is used, so this runs without GPUs; train itself refuses gpus= here, see below)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # all GPUs "visible": slots get 0 and 1
    store = create_store(tmp_path / "st", load_spec(SPEC))
    job = {"store": str(store.path), "main": WHICH_GPU, "args": {}, "argv": []}
    slots = LocalSlots(job, slot_environments(2, 4), list(range(24)), None)
    assert slots.describe() == "on 4 GPU slots"
    slots.run()
    results = [slots.results.get_nowait() for _ in range(25)]
    assert results[-1] == ("done", "") and slots.fatal is None
    assert sorted(r.index for r in results[:-1] if r.status == "completed") == list(range(24))
    seen = np.load(tmp_path / "st" / "index.npy")[:24]  # rows are written by the runners (not committed)
    assert set(seen.tolist()) == {0, 1}


def test_train_refuses_gpus_it_cannot_see(tmp_path):
    out = run_cli("train", "store=st", f"spec={SPEC}", f"main={WHICH_GPU}", "n=24", "gpus=2", "jobs=4",
                  "progress=false", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, check=False)
    # an empty CUDA_VISIBLE_DEVICES lists no device: refused with one message
    assert out.returncode == 2 and "gpus=2 but CUDA_VISIBLE_DEVICES lists only 0 devices" in out.stderr
    assert not (tmp_path / "st").exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="the exact message of a CPU-only torch build")
@pytest.mark.parametrize("store_exists", [False, True])
def test_train_gpus_without_cuda_fails_fast(tmp_path, store_exists):
    """`make train GPUS=8` on a machine without CUDA: one line naming jobs=, before any store is touched."""
    if store_exists:
        run_cli("init", f"spec={SPEC}", "store=st", cwd=tmp_path, check=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "st").iterdir()} if store_exists else None
    out = run_cli("train", "store=st", f"spec={SPEC}", "main=datamodels_ml.examples.minimal", "n=4", "gpus=8",
                  cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(8)))}, check=False)
    assert out.returncode == 2
    assert out.stderr == ("error: gpus=8 but torch sees 0 CUDA devices (this torch is a CPU-only build): "
                          "to train on CPU slots, drop gpus= and give jobs=N (make train JOBS=N)\n")
    assert out.stdout == ""
    if store_exists:
        assert {p.name: p.read_bytes() for p in (tmp_path / "st").iterdir()} == before
    else:
        assert not (tmp_path / "st").exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="the exact message of a CPU-only torch build")
def test_demo_gpus_without_cuda_fails_before_init(tmp_path):
    out = run_cli("demo", f"config={CONFIGS / 'demo_tiny.yaml'}", f"spec={CONFIGS / 'digits_spec.json'}",
                  f"reg_config={CONFIGS / 'reg_tiny.yaml'}", "gpus=2", cwd=tmp_path,
                  env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: gpus=2 but torch sees 0 CUDA devices"), out.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.gpu
def test_train_on_gpu_slots(tmp_path):
    """On a CUDA machine, the whole train command with gpus=1 and two slots on that GPU."""
    out = run_cli("train", "store=st", f"spec={SPEC}", f"main={WHICH_GPU}", "n=8", "gpus=1", "jobs=2",
                  "progress=false", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "0"}, check=True)
    assert "on 2 GPU slots" in out.stdout
    assert set(np.load(tmp_path / "st" / "index.npy")[:8].tolist()) == {0}


def test_train_logs_to_a_tracking_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        uri, client = server.uri, server.client()
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
        server.kill()

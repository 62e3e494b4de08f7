"""The CIFAR-10 example's code path on tiny synthetic images (CPU); the real run needs a GPU."""

import json

import numpy as np
import pytest

from conftest import run_cli


def test_cifar10_main_on_tiny_synthetic_data(tmp_path):
    from datamodels_ml.examples import cifar10

    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    cifar10.write_betons(x_train, rng.integers(0, 10, 48), x_test, rng.integers(0, 10, 20), tmp_path / "data")
    spec = {"num_models": 1, "schema": {"masks": {"shape": [48], "dtype": "bool_"},
                                        "margins": {"shape": [20], "dtype": "float16"},
                                        "accuracy": {"shape": [], "dtype": "float32"}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = run_cli("train", "store=st", "spec=spec.json", "main=datamodels_ml.examples.cifar10", "n=1", "jobs=1",
                  f"args.data_dir={tmp_path / 'data'}", "args.num_train=48", "args.epochs=1", "args.batch_size=16", "args.lr=0.01",
                  "progress=false", cwd=tmp_path, check=True)
    assert "train: 1 completed, 0 failed" in out.stdout
    margins = np.load(tmp_path / "st" / "margins.npy")
    masks = np.load(tmp_path / "st" / "masks.npy")
    assert np.isfinite(margins).all() and 0 < masks.sum() < 48


@pytest.mark.gpu
def test_cifar10_resnet9_forward_on_gpu():
    import torch

    from datamodels_ml.examples.cifar10 import resnet9

    model = resnet9().cuda()
    assert model(torch.randn(4, 3, 32, 32, device="cuda")).shape == (4, 10)

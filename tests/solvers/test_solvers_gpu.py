"""The solver's CUDA paths against its CPU path (marked ``gpu``: skipped without a CUDA device).

Binary masks make the half-precision Gram exact (integer counts accumulated in float32), so the
CUDA statistics must equal the CPU ones to float32 rounding, and the paths must agree within the
solver's tolerance."""

import numpy as np
import pytest
import torch

from datamodels_ml.solvers.sources import TensorBatches
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.path import lasso_path

pytestmark = pytest.mark.gpu


def _problem(n=3000, n_val=600, p=700, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n + n_val, p, generator=g) < 0.5
    W = torch.zeros(p, T, dtype=torch.float64)
    for t in range(T):
        W[torch.randperm(p, generator=g)[:6], t] = torch.randn(6, generator=g, dtype=torch.float64)
    Y = (X.double() @ W + 0.3 * torch.randn(n + n_val, T, generator=g, dtype=torch.float64)).float()
    return (X[:n], Y[:n]), (X[n:], Y[n:])


@pytest.mark.parametrize("batch", [256, 2048, 5000])  # the CUDA Gram works in chunks of at most 2048 rows
def test_cuda_statistics_equal_the_cpu_ones(batch):
    (Xt, Yt), (Xv, Yv) = _problem()
    cpu = feature_stats(TensorBatches(Xt, Yt, batch_size=batch, shuffle=False),
                        TensorBatches(Xv, Yv, batch_size=batch, shuffle=False), device="cpu")
    gpu = feature_stats(TensorBatches(Xt, Yt, batch_size=batch, shuffle=False),
                        TensorBatches(Xv, Yv, batch_size=batch, shuffle=False), device="cuda")
    assert gpu.binary and cpu.binary
    torch.testing.assert_close(gpu.gram.cpu(), cpu.gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean)
    torch.testing.assert_close(gpu.std.cpu(), cpu.std)


@pytest.mark.parametrize("method", ["fista", "saga"])
def test_cuda_path_equals_the_cpu_path(method):
    train, val = _problem()
    kw = dict(k=12, eps=1e-2, method=method, batch_size=500, max_epochs=200 if method == "saga" else None)
    cpu = lasso_path(train, val, device="cpu", **kw)
    gpu = lasso_path(train, val, device="cuda", **kw)
    assert gpu.weight.is_cuda
    atol = 1e-3 if method == "fista" else 3e-2
    np.testing.assert_allclose(gpu.weight.cpu().numpy(), cpu.weight.numpy(), atol=atol)
    np.testing.assert_allclose(gpu.val_mse.cpu().numpy(), cpu.val_mse.numpy(), rtol=1e-2, atol=1e-3)

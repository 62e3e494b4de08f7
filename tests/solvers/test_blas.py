"""The CPU products through OpenBLAS (datamodels_ml.solvers.blas) against torch's own."""

from __future__ import annotations

import pytest
import torch

from datamodels_ml.solvers.sources import TensorBatches
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers.blas import enabled, mm, syrk_upper_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mm_and_syrk_match_torch(monkeypatch, dtype):
    monkeypatch.setenv("DATAMODELS_KERNELS", "gemm=openblas")  # the OpenBLAS branch, whatever the probe found
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 40, generator=g, dtype=dtype)
    b = torch.randn(40, 7, generator=g, dtype=dtype)
    torch.testing.assert_close(mm(a, b), a @ b)
    torch.testing.assert_close(mm(a.T[:, 3:20], a[3:20, :5]), a.T[:, 3:20] @ a[3:20, :5])  # strided views
    x = (torch.rand(30, 40, generator=g) < 0.5).to(dtype)
    G = torch.full((40, 40), 2.0, dtype=dtype)
    assert syrk_upper_(G, x)
    up = torch.triu(torch.ones(40, 40, dtype=torch.bool))
    torch.testing.assert_close(G[up], (x.T @ x + 2.0)[up])
    assert bool((G[~up] == 2.0).all())  # the lower triangle is untouched


def test_torch_fallback_when_asked_or_not_applicable(monkeypatch):
    x = torch.ones(3, 3)
    monkeypatch.setenv("DATAMODELS_KERNELS", "gemm=openblas")
    assert enabled(x) and not enabled(x.to(torch.int64)) and not enabled(x, x.double())
    monkeypatch.setenv("DATAMODELS_KERNELS", "gemm=torch")
    assert not enabled(x)
    assert not syrk_upper_(torch.zeros(3, 3), x)
    assert enabled(x, force=True)


@pytest.mark.parametrize("gemm", ["openblas", "torch"])
def test_feature_stats_gram_is_the_same_either_way(monkeypatch, gemm):
    monkeypatch.setenv("DATAMODELS_KERNELS", f"gemm={gemm}")
    g = torch.Generator().manual_seed(1)
    X = torch.rand(300, 200, generator=g) < 0.3
    Y = torch.randn(300, 2, generator=g)
    st = feature_stats(TensorBatches(X[:250], Y[:250], batch_size=64), TensorBatches(X[250:], Y[250:], batch_size=64))
    Z = X[:250].double()
    Z = (Z - Z.mean(0)) / Z.std(0, unbiased=False)
    torch.testing.assert_close(st.gram.double(), Z.T @ Z / 250, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset, quiet", [(None, "True"), ("28", "False"), ("4", "True")])
def test_import_shortens_openblas_spin_unless_the_user_set_it(preset, quiet):
    # a real interpreter: the setting only counts before numpy loads OpenBLAS
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import os, datamodels_ml, torch; from datamodels_ml.solvers.blas import mm_iter; "
            "a = torch.randn(30, 20); b = torch.randn(20, 5); torch.testing.assert_close(mm_iter(a, b), a @ b); "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], datamodels_ml.OPENBLAS_QUIET)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [preset or "4", quiet]
    # numpy loaded first: too late to set it, so the iterations keep torch's products
    code = "import numpy, datamodels_ml, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), datamodels_ml.OPENBLAS_QUIET)"
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]


@pytest.mark.parametrize("preset", [None, "300000"])
def test_import_shortens_openmp_spin_unless_the_user_set_it_or_torch_is_loaded(preset):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = "import os, datamodels_ml, torch; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [preset or "10000"]
    env.pop("GOMP_SPINCOUNT", None)  # torch first: its OpenMP runtime has read the environment already
    code = "import torch, datamodels_ml, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_counts_give_the_same_gram_as_float_products(monkeypatch, dtype):
    # 0/1 masks: the int8 products (int32 counts) and the float path accumulate the same integers
    from datamodels_ml.solvers import stats

    g = torch.Generator().manual_seed(2)
    X = torch.rand(700, 1100, generator=g) < 0.4  # more columns than one block, rows over batches
    X[:, 5] = True  # a constant feature
    Y = torch.randn(700, 2, generator=g)
    src = lambda: (TensorBatches(X[:600], Y[:600], batch_size=256), TensorBatches(X[600:], Y[600:], batch_size=256))  # noqa: E731
    monkeypatch.setenv("DATAMODELS_KERNELS", "gram=int8,colsum=int8")
    fast = feature_stats(*src(), dtype=dtype)
    calls = []
    real = stats._int8_counts
    monkeypatch.setattr(stats, "_int8_counts", lambda G, xb: calls.append(1) or real(G, xb))
    assert feature_stats(*src(), dtype=dtype).gram.equal(fast.gram) and len(calls) == 3  # the int8 path ran
    monkeypatch.setenv("DATAMODELS_KERNELS", "gram=syrk,colsum=torch")
    slow = feature_stats(*src(), dtype=dtype)
    assert torch.equal(fast.gram, slow.gram)
    torch.testing.assert_close(fast.mean, slow.mean, rtol=0, atol=0)
    torch.testing.assert_close(fast.std, slow.std, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_product_matches_the_dense_one_and_pays_only_when_sparse(monkeypatch, dtype):
    from datamodels_ml.solvers import kernels
    from datamodels_ml.solvers.blas import mm_sparse, sparse_pays

    g = torch.Generator().manual_seed(2)
    at = torch.randn(300, 120, generator=g, dtype=dtype)
    W = torch.randn(300, 9, generator=g, dtype=dtype) * (torch.rand(300, 9, generator=g) < 0.05)
    torch.testing.assert_close(mm_sparse(at, W), at.T @ W)
    torch.testing.assert_close(mm_sparse(at, torch.zeros(300, 9, dtype=dtype)), torch.zeros(120, 9, dtype=dtype))
    # the 5k benchmark's shapes, at given rates (dense 4e11 FLOP/s, sparse 1.5e-10 s per non-zero
    # and row): 10 non-zeros per target pay, 500 and a dense W do not; with 4x slower dense
    # products 500 pay too
    rates = {"gemm.openblas": 4e11, "gemm.torch": 1e11, "sparse_s": 1.5e-10}
    monkeypatch.setattr(kernels, "_STATE", {"base": kernels.choose(rates), "env": None, "effective": None})
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert sparse_pays(200 * 10, 5000, 5000, 200)
    assert not sparse_pays(200 * 500, 5000, 5000, 200)
    assert not sparse_pays(200 * 2500, 5000, 5000, 200)
    monkeypatch.setattr(kernels, "_STATE", {"base": kernels.choose({**rates, "gemm.openblas": 1e11}), "env": None,
                                            "effective": None})
    assert sparse_pays(200 * 500, 5000, 5000, 200)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 1.0])
def test_rows_product_reads_the_rows_it_needs_by_any_form(density):
    from datamodels_ml.solvers.blas import mm_rows

    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 300, generator=g) / 300**0.5
    G = a @ a.T  # symmetric, entries of order 1
    W = torch.randn(300, 6, generator=g) * (torch.rand(300, 1, generator=g) < density)
    torch.testing.assert_close(mm_rows(G, W, symmetric=True), G @ W)
    torch.testing.assert_close(mm_rows(a, W, rows=7), a.T @ W)  # gathered in pieces
    torch.testing.assert_close(mm_rows(a.double(), W), (a.T @ W))  # rows converted to W's dtype


def test_sparse_product_over_row_blocks_past_the_32_bit_limit(monkeypatch):
    # torch's CSR x dense product crashes past 2^31 dense entries (p >= 46,341 for a Gram): the
    # product then goes over row blocks under the limit; forced here with a tiny limit
    from datamodels_ml.solvers import blas

    g = torch.Generator().manual_seed(5)
    at = torch.randn(300, 70, generator=g)
    W = torch.randn(300, 6, generator=g) * (torch.rand(300, 6, generator=g) < 0.05)
    W[100:200] = 0  # a block without non-zeros is skipped
    calls = []
    real = torch.sparse.mm
    monkeypatch.setattr(torch.sparse, "mm", lambda a, b: calls.append(b.numel()) or real(a, b))
    monkeypatch.setattr(blas, "SPARSE_DENSE_LIMIT", 50 * 70)
    torch.testing.assert_close(blas.mm_sparse(at, W), at.T @ W)
    assert len(calls) == 4 and max(calls) <= 50 * 70  # 6 blocks of 50 rows, 2 of them empty
    torch.testing.assert_close(blas.mm_sparse(at, torch.zeros(300, 6)), torch.zeros(70, 6))

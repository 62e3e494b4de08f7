"""Kernels chosen by measured rate (solvers.kernels) and kept per machine (kernel_cache)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from datamodels_ml import kernel_cache
from datamodels_ml.errors import UserError
from datamodels_ml.solvers.sources import TensorBatches
from datamodels_ml.solvers.stats import feature_stats
from datamodels_ml.solvers import candidates, kernels, probe
from datamodels_ml.solvers.path import lasso_path


@pytest.fixture
def fresh(monkeypatch):
    """This test's own kernel state (restored afterwards), nothing forced."""
    monkeypatch.setattr(kernels, "_STATE", {"base": None, "env": None, "effective": None})
    monkeypatch.delenv(kernels.ENV, raising=False)


def _masks(seed=0, n=700, p=1100):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, p, generator=g) < 0.4  # more columns than one int8 block
    X[:, 5] = True  # a constant feature
    return X, torch.randn(n, 3, generator=g)


GRAM_KERNELS = [("int8", "int8"), ("syrk", "torch"), ("torch", "int8"), ("int8", "torch"), ("syrk", "bytes")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_gram_kernel_forced_gives_the_same_exact_statistics(fresh, monkeypatch, dtype):
    X, Y = _masks()
    src = lambda: (TensorBatches(X[:600], Y[:600], batch_size=256), TensorBatches(X[600:], Y[600:], batch_size=256))  # noqa: E731
    # the exact integer counts, standardized in float64
    Z = X[:600].double()
    Xc = Z.T @ Z
    got = {}
    for gram, colsum in GRAM_KERNELS:
        monkeypatch.setenv(kernels.ENV, f"gram={gram},colsum={colsum}")
        assert kernels.pick("gram") == gram and kernels.pick("colsum") == colsum
        st = feature_stats(*src(), dtype=dtype)
        got[(gram, colsum)] = st
        assert torch.equal(st.mean, Z.sum(0) / 600)  # exact counts
    ref = got[GRAM_KERNELS[0]]
    for key, st in got.items():
        assert torch.equal(st.gram, ref.gram), key
        assert torch.equal(st.mean, ref.mean) and torch.equal(st.std, ref.std), key
    mean = Z.mean(0)
    inv = torch.where(ref.nonconst, 1 / ref.std, torch.zeros_like(ref.std))
    expect = (Xc / 600 - mean[:, None] * mean[None, :]) * inv[:, None] * inv[None, :]
    torch.testing.assert_close(ref.gram.double(), expect, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_each_kernel_forced_gives_the_same_path(fresh, monkeypatch):
    g = torch.Generator().manual_seed(4)
    X = torch.rand(500, 60, generator=g) < 0.5
    w = torch.zeros(60, 2)
    w[:4] = torch.randn(4, 2, generator=g)
    Y = X.float() @ w + 0.3 * torch.randn(500, 2, generator=g)
    paths = {}
    for forced in ("gram=int8,colsum=int8", "gram=syrk,colsum=torch", "gram=torch,colsum=int8", "gram=syrk,colsum=bytes"):
        monkeypatch.setenv(kernels.ENV, forced)
        paths[forced] = lasso_path((X[:400], Y[:400]), (X[400:], Y[400:]), k=15, eps=1e-3, dtype=torch.float64)
    ref = paths["gram=int8,colsum=int8"]
    for forced, path in paths.items():
        assert torch.equal(path.weight, ref.weight), forced
        torch.testing.assert_close(path.val_mse, ref.val_mse, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setenv(kernels.ENV, "gemm=torch")  # another product: the same path up to rounding
    other = lasso_path((X[:400], Y[:400]), (X[400:], Y[400:]), k=15, eps=1e-3, dtype=torch.float64)
    torch.testing.assert_close(other.weight, ref.weight, rtol=0, atol=1e-8)


def _targets(seed=6, n=900, p=300, T=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, p, generator=g) < 0.5
    w = torch.zeros(p, T)
    w[:6] = torch.randn(6, T, generator=g)
    Y = X.float() @ w + 0.5 * torch.randn(n, T, generator=g) + 40.0  # far from 0: the shift matters
    Y[:, 3] *= 1e4  # another scale per column
    return X, Y


def test_each_xty_kernel_forced_gives_the_same_target_statistics_and_path(fresh, monkeypatch):
    from datamodels_ml.solvers.stats import target_stats

    X, Y = _targets()
    kernels.active()  # probed before the spy
    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}
    calls = []
    for name, fn in candidates.IMPLS["xty"].items():
        impls["xty"][name] = lambda *args, name=name, fn=fn: calls.append(name) or fn(*args)
    monkeypatch.setattr(candidates, "IMPLS", impls)
    got = {}
    for name in candidates.OPS["xty"]:
        monkeypatch.setenv(kernels.ENV, f"xty={name}")
        ts = target_stats(TensorBatches(X[:700], Y[:700], batch_size=256), dtype=torch.float32)
        assert calls == ["int8"] * 3 if name == "int8" else calls == [], (name, calls)  # 3 batches
        calls.clear()
        got[name] = ts
        # both round like float32 data: within 1e-7 of each column's sums of |y|
        scale = X[:700].double().T @ Y[:700].double().abs()
        assert float(((ts.sxy - X[:700].double().T @ Y[:700].double()) / scale).abs().max()) < 1e-7, name
        assert torch.equal(ts.sx, got["int8"].sx) and torch.equal(ts.sy, got["int8"].sy)
    paths = {}
    for name in candidates.OPS["xty"]:
        monkeypatch.setenv(kernels.ENV, f"xty={name}")
        paths[name] = lasso_path((X[:700], Y[:700]), (X[700:], Y[700:]), k=12, eps=1e-2, dtype=torch.float32)
    a, b = paths["int8"], paths["float"]
    assert torch.equal(a.weight != 0, b.weight != 0)  # the same supports at every λ
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-4 * float(a.weight.abs().max()))
    torch.testing.assert_close(a.val_mse, b.val_mse, rtol=1e-5, atol=0, equal_nan=True)


def test_a_float64_solve_never_rounds_its_targets_to_int8_digits(fresh, monkeypatch):
    from datamodels_ml.solvers.stats import target_stats

    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}

    def refused(*args):
        raise AssertionError("int8 digits in a float64 solve")

    impls["xty"]["int8"] = refused
    monkeypatch.setenv(kernels.ENV, "xty=int8")
    assert kernels.pick("xty") == "int8"  # probed before the replacement
    monkeypatch.setattr(candidates, "IMPLS", impls)
    X, Y = _targets()
    ts = target_stats(TensorBatches(X, Y, batch_size=256), dtype=torch.float64)
    torch.testing.assert_close(ts.sxy, X.double().T @ Y.double(), rtol=1e-12, atol=1e-9)


def test_xty_without_int8_products_falls_back_to_the_float_product(fresh, monkeypatch):
    from datamodels_ml.solvers.stats import target_stats

    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}

    def missing(out, x, y):
        raise candidates.Unavailable("torch._int_mm: not in this build")

    impls["xty"]["int8"] = missing
    monkeypatch.setattr(candidates, "IMPLS", impls)
    monkeypatch.setenv(kernels.ENV, "xty=int8")
    assert kernels.pick("xty") == "int8"
    X, Y = _targets()
    ts = target_stats(TensorBatches(X, Y, batch_size=256), dtype=torch.float32)
    scale = X.double().T @ Y.double().abs()
    assert float(((ts.sxy - X.double().T @ Y.double()) / scale).abs().max()) < 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float_xty_converts_a_large_batch_of_bytes_by_row_chunks(fresh, monkeypatch, dtype):
    # a read batch of 0/1 bytes may be larger than its float copy may be: at most FLOAT_BYTES at once
    from datamodels_ml.solvers import stats

    X, Y = _targets()
    itemsize = 4 if dtype == torch.float32 else 8
    monkeypatch.setattr(stats, "FLOAT_BYTES", 100 * X.shape[1] * itemsize)  # 100 rows
    shapes = []
    monkeypatch.setattr(stats, "mm", lambda a, b: shapes.append(tuple(a.shape)) or a @ b)
    monkeypatch.setenv(kernels.ENV, "xty=float")
    ts = stats.target_stats(TensorBatches(X, Y, batch_size=450), dtype=dtype)
    assert shapes == [(X.shape[1], 100)] * 4 + [(X.shape[1], 50)] + [(X.shape[1], 100)] * 4 + [(X.shape[1], 50)]
    scale = X.double().T @ Y.double().abs()
    assert float(((ts.sxy - X.double().T @ Y.double()) / scale).abs().max()) < (1e-7 if itemsize == 4 else 1e-14)


def test_int8_digits_of_a_constant_or_zero_or_single_spike_target(fresh):
    g = torch.Generator().manual_seed(7)
    X = torch.rand(300, 40, generator=g) < 0.5
    Y = torch.zeros(300, 4, dtype=torch.float64)
    Y[:, 1] = 2.5  # constant
    Y[17, 2] = -3e7  # one value, the largest negative digit pattern
    Y[:, 3] = torch.randn(300, generator=g, dtype=torch.float64)
    out = torch.zeros(40, 4, dtype=torch.float64)
    candidates.xty_int8(out, X, Y)
    exact = X.double().T @ Y
    assert torch.equal(out[:, :3], exact[:, :3])  # each a multiple of its column's step: exact
    assert float((out[:, 3] - exact[:, 3]).abs().max()) < 300 * 0.5 * float(Y[:, 3].abs().max()) / candidates.DIGITS_MAX
    candidates.xty_int8(out, X[:0], Y[:0])  # no rows: nothing added
    assert torch.equal(out[:, :3], exact[:, :3])


@pytest.mark.parametrize("slow, expect", [("int8", "float"), ("float", "int8")])
def test_the_probe_picks_the_faster_xty_kernel(fresh, monkeypatch, slow, expect):
    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}
    fn = impls["xty"][slow]
    impls["xty"][slow] = lambda *args: time.sleep(0.05) or fn(*args)
    monkeypatch.setattr(candidates, "IMPLS", impls)
    k = kernels.choose(probe.probe(("xty",)))
    assert k.picks["xty"] == expect and k.rates[f"xty.{slow}"] < k.rates[f"xty.{expect}"]


def _slowed(fn, seconds):
    def slow(*args):
        time.sleep(seconds)
        return fn(*args)
    return slow


@pytest.mark.parametrize("slow, expect", [("int8", {"syrk", "torch"}), ("syrk", {"int8", "torch"})])
def test_the_probe_picks_another_kernel_than_a_slow_one(fresh, monkeypatch, slow, expect):
    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}
    impls["gram"][slow] = _slowed(impls["gram"][slow], 0.05)
    if slow == "syrk":  # int8 and syrk beat torch's product anyway; make int8 win clearly
        impls["gram"]["torch"] = _slowed(impls["gram"]["torch"], 0.05)
        expect = {"int8"}
    for name in ("bytes", "int8"):
        impls["colsum"][name] = _slowed(impls["colsum"][name], 0.05)
    monkeypatch.setattr(candidates, "IMPLS", impls)
    k = kernels.choose(probe.probe(("gram", "colsum")))
    assert k.picks["gram"] in expect
    assert k.picks["colsum"] == "torch"
    assert k.rates[f"gram.{slow}"] < min(k.rates[f"gram.{n}"] for n in expect)


def test_a_kernel_far_behind_at_full_size_is_not_timed_again():
    """(an int8 Gram on an AVX2-only CPU: 1.3 s per full-size call, once instead of three times)"""
    calls = {"fast": 0, "slow": 0}

    def candidate(name, seconds):
        def make(full):
            def run():
                if full:
                    calls[name] += 1
                    time.sleep(seconds)
            return run, (1e6 if full else 1e3)  # the trials (no sleep) tie: both go to full size
        return make

    rates = probe._measure({"fast": candidate("fast", 0.001), "slow": candidate("slow", 0.03)}, reps=2)
    assert calls == {"fast": 3, "slow": 1}  # the first full call, then two rounds for the contender only
    assert rates["fast"] > probe._CLOSE * rates["slow"] > 0


def test_a_kernel_this_torch_lacks_rates_zero_and_is_not_picked(fresh, monkeypatch):
    impls = {op: dict(c) for op, c in candidates.IMPLS.items()}

    def missing(G, x):
        raise candidates.Unavailable("torch._int_mm: not in this build")

    impls["gram"]["int8"] = missing
    monkeypatch.setattr(candidates, "IMPLS", impls)
    k = kernels.choose(probe.probe(("gram",)))
    assert k.rates["gram.int8"] == 0.0 and k.picks["gram"] in ("syrk", "torch")


def test_forced_settings_are_checked_by_name():
    assert kernels.parse_forced(" gram=syrk , gemm=torch") == {"gram": "syrk", "gemm": "torch"}
    assert kernels.parse_forced("") == {}
    with pytest.raises(ValueError, match=re.escape("unknown kernel 'avx' for gram: one of int8, syrk, torch")):
        kernels.parse_forced("gram=avx")
    with pytest.raises(ValueError, match=re.escape("unknown kernel setting 'blas=torch': give op=kernel with op one "
                                                   "of gram, colsum, gemm")):
        kernels.parse_forced("blas=torch")
    with pytest.raises(UserError, match=re.escape("cfg.kernels: unknown kernel 'avx' for gram")):
        kernel_cache.load(forced="gram=avx")


def test_rates_are_cached_per_machine_and_measured_again_when_it_changes(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("DATAMODELS_CACHE_DIR", str(tmp_path / "cache"))
    probes = []
    real = probe.probe
    monkeypatch.setattr(probe, "probe", lambda *a: probes.append(1) or real(*a))
    first = kernel_cache.load()
    assert first.source == "measured" and len(probes) == 1
    doc = json.loads((tmp_path / "cache" / "kernels.json").read_text())
    [entry] = doc.values()
    assert entry["key"]["cpu"] == kernel_cache.cpu_model() and entry["key"]["threads"] == torch.get_num_threads()
    again = kernel_cache.load()
    assert again.source == "cached" and len(probes) == 1 and again.picks == first.picks
    # another torch (or CPU, or thread count): measured again, both kept
    key = kernel_cache.machine_key()
    monkeypatch.setattr(kernel_cache, "machine_key", lambda: {**key, "torch": "9.9"})
    assert kernel_cache.load().source == "measured" and len(probes) == 2
    assert len(json.loads((tmp_path / "cache" / "kernels.json").read_text())) == 2
    # a damaged file is measured again and rewritten
    (tmp_path / "cache" / "kernels.json").write_text("{not json")
    assert kernel_cache.load().source == "measured" and len(probes) == 3
    assert kernel_cache.load().source == "cached"
    # a forced kernel wins over the rates, and says so
    k = kernel_cache.load(forced="gram=torch")
    assert k.picks["gram"] == "torch" and "gram=torch forced" in k.describe()
    assert k.params()["kernel.gram"] == "torch (forced)"


def test_an_unwritable_cache_costs_a_probe_not_an_error(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DATAMODELS_CACHE_DIR", str(blocker / "sub"))  # a directory under a file
    assert kernel_cache.load().source == "measured"


def test_the_line_names_every_op_with_its_rate(fresh):
    rates = {"gram.int8": 2e8, "gram.syrk": 9e10, "gram.torch": 5e10, "colsum.int8": 1e10, "colsum.torch": 3e8,
             "gemm.openblas": 2e11, "gemm.torch": 1.9e11, "xty.int8": 7e10, "xty.float": 4e10}
    k = kernels.choose(rates, source="cached")
    assert k.picks == {"gram": "syrk", "colsum": "int8", "gemm": "openblas", "xty": "int8"}
    line = k.describe()
    assert line.startswith("kernels (cached, ")
    assert "gram=syrk 9e+10 MAC/s (int8 2e+08, torch 5e+10)" in line
    assert line.endswith("; xty=int8 7e+10 MAC/s (float 4e+10)")
    assert k.params()["kernel.gram.rate"] == "9e+10"
    assert k.constant("gather_s") == kernels.CONSTANTS["gather_s"]  # unmeasured: the default


def test_measure_measures_again_whatever_the_cache_holds(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("DATAMODELS_CACHE_DIR", str(tmp_path))
    assert kernel_cache.load().source == "measured"
    assert kernel_cache.load().source == "cached"
    k = kernel_cache.load(forced="measure, gemm=torch")
    assert k.source == "measured" and k.picks["gemm"] == "torch" and k.forced == ("gemm",)


@pytest.mark.parametrize("gram", ["int8", "torch"])
def test_the_gram_kernels_step_between_their_column_blocks(fresh, gram):
    # the regression's statistics pass widens to every thread there, inside its first read batch
    X, _ = _masks(p=2 * candidates._BLOCK + 5)  # three column blocks
    G = torch.zeros(X.shape[1], X.shape[1])
    steps = []
    with candidates.stepping(lambda: steps.append(1)):
        try:
            candidates.IMPLS["gram"][gram](G, X)
        except candidates.Unavailable:
            pytest.skip("this torch has no int8 product")
    assert len(steps) == 3
    candidates.IMPLS["gram"][gram](torch.zeros_like(G), X)  # outside: no hook
    assert len(steps) == 3
    Z = X.double()
    torch.testing.assert_close(torch.triu(G).double(), torch.triu(Z.T @ Z))

"""Target blocks: the same datamodels as in one piece, a killed run resumes, the memory plan."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import CONFIGS, run_cli
from datamodels_ml.regression.target_blocks import KILL_AFTER_ENV, merge, remaining
from datamodels_ml.config import load
from datamodels_ml.dataset.write_dataset import write_beton
from datamodels_ml.errors import UserError
from datamodels_ml.regression.memory import plan_memory
from datamodels_ml.regression.config import RegressConfig
from datamodels_ml.regression.regress import fit
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

TINY = str(CONFIGS / "reg_tiny.yaml")
N, P, T = 240, 25, 17  # 17 targets: blocks of 7 are 7, 7, 3


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """Masks -> 17 outputs, each a 3-sparse linear function plus noise."""
    root = tmp_path_factory.mktemp("blocks")
    store = create_store(root / "store", parse_spec({"num_models": N, "schema": {
        "masks": {"shape": [P], "dtype": "bool_"}, "margins": {"shape": [T], "dtype": "float32"}}}))
    rng = np.random.default_rng(0)
    w = np.zeros((P, T))
    for t in range(T):
        w[rng.choice(P, 3, replace=False), t] = rng.normal(size=3)
    x = rng.random((N, P)) < 0.5
    y = x @ w + 0.1 * rng.normal(size=(N, T))
    for i in range(N):
        store.write_row(i, {"masks": x[i], "margins": y[i].astype(np.float32)})
    write_beton(store.path, root / "reg.beton", progress=False)
    return root / "reg.beton"


def _args(beton, *extra):
    return [f"config={TINY}", f"data.data_path={beton}", "data.num_train=160", "data.num_val=60",
            "data.target_end_ind=-1", "cfg.k=8", "cfg.method=fista", *extra]


# Equal within the solver's tolerance. fista: the screened working sets (and the step size of each) are
# chosen per block of targets, so each target stops at a slightly different iterate (measured: 1.2e-4 at
# most, on weights up to 1.1). saga: the epochs at each λ run until the slowest target of the block
# converges and draw the minibatch order from one stream, so a block sees other orders than the whole
# (reg_tiny.yaml caps saga at 20 epochs per λ).
@pytest.mark.parametrize("method, atol", [("fista", 5e-4), ("saga", 2e-2)])
def test_blocks_give_the_one_piece_result(beton, method, atol):
    one = fit(load(RegressConfig, _args(beton, "cfg.out_dir=x", f"cfg.method={method}", f"cfg.target_block={T}"),
                   config_key="config"), progress=False, log=False)
    seven = fit(load(RegressConfig, _args(beton, "cfg.out_dir=x", f"cfg.method={method}", "cfg.target_block=7"),
                     config_key="config"), progress=False, log=False)
    assert seven["weight"].shape == (P, T)
    for key in ("weight", "bias", "lam", "lam_path", "mean", "std"):
        torch.testing.assert_close(seven[key], one[key], rtol=1e-4, atol=atol, msg=key)
    for key in ("val_mse", "train_mse"):
        torch.testing.assert_close(seven[key], one[key], rtol=1e-4 if method == "fista" else 1e-2, atol=atol,
                                   equal_nan=True, msg=key)
    if method == "fista":
        assert seven["best_index"].tolist() == one["best_index"].tolist()
        torch.testing.assert_close(seven["nnz"], one["nnz"], equal_nan=True)
        torch.testing.assert_close(seven["active"], one["active"])


def test_killed_run_resumes_at_the_next_block(beton, tmp_path):
    out = tmp_path / "results"
    args = _args(beton, f"cfg.out_dir={out}", "cfg.target_block=7")
    proc = run_cli("regress", *args, cwd=tmp_path, env={KILL_AFTER_ENV: "1"}, check=False)
    assert proc.returncode == -9  # killed right after saving its first block
    assert sorted(p.name for p in (out / ".blocks").iterdir()) == ["0-7.pt", "blocks.json"]
    saved = torch.load(out / ".blocks" / "0-7.pt", weights_only=True)
    assert saved["weight"].shape == (P, 7)

    refused = run_cli("regress", *args, "cfg.k=9", cwd=tmp_path, check=False)  # another config: no mixing
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {out / '.blocks'} holds target blocks of an unfinished regression with another config or dataset: "
        "rerun that config to resume it, or use cfg.force=true to discard its blocks")

    resumed = run_cli("regress", *args, cwd=tmp_path, check=True)
    assert "resuming: 7 targets in 1 saved block(s), 2 block(s) to fit" in resumed.stderr
    assert not (out / ".blocks").exists()
    dm = torch.load(out / "datamodels.pt", weights_only=True)
    torch.testing.assert_close(dm["weight"][:, :7], saved["weight"])  # the saved block was used as it was
    whole = fit(load(RegressConfig, _args(beton, "cfg.out_dir=x"), config_key="config"), progress=False, log=False)
    torch.testing.assert_close(dm["weight"], whole["weight"], rtol=1e-4, atol=5e-4)  # within the solver tolerance (see above)


@pytest.mark.parametrize("method", ["fista", "saga"])
def test_the_heap_keeps_freed_blocks_on_each_path_only_never_while_reading(beton, monkeypatch, method):
    """fista on the CPU keeps freed blocks from each block's path start to its end: the passes that
    read the targets (the validation variance, X'Y, the validation rows) run before, their large
    batches mapped and unmapped, and the block's weights outlive it in a copy, the heap trimmed
    after; saga never keeps."""
    from datamodels_ml import heap
    from datamodels_ml.dataset import reader

    log = []
    monkeypatch.setattr(heap, "keep_freed_blocks", lambda: log.append("keep") or True)
    monkeypatch.setattr(heap, "release", lambda: log.append("release"))
    monkeypatch.setattr(heap, "trim", lambda: log.append("trim"))
    real = reader.BetonBatches.__iter__

    def reading(self):
        log.append("read")
        yield from real(self)
    monkeypatch.setattr(reader.BetonBatches, "__iter__", reading)
    fit(load(RegressConfig, _args(beton, "cfg.out_dir=x", f"cfg.method={method}", "cfg.target_block=7"),
             config_key="config"), progress=False, log=False)
    blocks = "".join({"read": "r", "keep": "k", "release": "x", "trim": "t"}[e] for e in log)
    if method == "fista":  # the statistics pass (2 reads), then per block: the validation variance, X'Y
        # and the validation rows read, the path kept, released, the heap trimmed (the path's, the weights' copy)
        assert blocks == "rr" + "rrrkxtt" * 3, log
    else:
        assert "k" not in blocks and "t" not in blocks and blocks.count("x") == 3, log


def test_finished_blocks_wait_on_disk_until_the_merge(beton, tmp_path, monkeypatch):
    """With a block store (the regress command), no finished block is held in memory while the next
    ones are fitted: the merge reads them back from disk, and gives the in-memory fit's result."""
    import gc
    import weakref

    from datamodels_ml.regression import block_fit, target_blocks
    from datamodels_ml.regression.regress import fit_plan, plan

    cfg = load(RegressConfig, _args(beton, f"cfg.out_dir={tmp_path}", "cfg.target_block=7"), config_key="config")
    in_memory = fit(cfg, progress=False, log=False)
    fitted, real_fit, real_merge = [], block_fit.fit_block, target_blocks.merge

    def fit_block(*a, **kw):
        block = real_fit(*a, **kw)
        fitted.append(weakref.ref(block["weight"]))
        return block

    def merge(blocks):
        gc.collect()
        assert len(fitted) == 3 and all(ref() is None for ref in fitted)  # every block's weights let go
        return real_merge(blocks)
    monkeypatch.setattr(block_fit, "fit_block", fit_block)
    monkeypatch.setattr(target_blocks, "merge", merge)
    store = target_blocks.BlockStore(tmp_path)
    store.open({"test": 1}, force=False)
    result = fit_plan(plan(cfg), progress=False, log=False, store=store)
    assert store.saved() == [(0, 7), (7, 14), (14, 17)]
    for key in ("weight", "bias", "lam", "val_mse"):
        torch.testing.assert_close(result[key], in_memory[key], equal_nan=True, msg=key)


def test_memory_plan_is_printed(beton, tmp_path):
    proc = run_cli("regress", *_args(beton, f"cfg.out_dir={tmp_path / 'r'}", "cfg.target_block=5"), cwd=tmp_path,
                   check=True)
    assert re.search(r"memory plan: 25 features -> statistics .*, float32; 17 targets in 4 block\(s\) of 5 "
                     r"\(cfg.target_block, .* per target\); about .* on cpu, .* available", proc.stderr)


def test_too_large_is_refused_before_reading(tmp_path):
    """600k features: the Gram alone is terabytes; refused from the header, with the options named."""
    p = 600_000
    store = create_store(tmp_path / "store", parse_spec({"num_models": 6, "schema": {
        "masks": {"shape": [p], "dtype": "bool_"}, "margins": {"shape": [2], "dtype": "float32"}}}))
    for i in range(6):
        store.write_row(i, {"masks": np.arange(p) % (i + 2) == 0, "margins": np.float32([i, -i])})
    write_beton(store.path, tmp_path / "big.beton", progress=False)
    cfg = load(RegressConfig, [f"config={TINY}", f"data.data_path={tmp_path / 'big.beton'}", "cfg.out_dir=x",
                               "data.num_train=4", "data.num_val=2", "data.target_end_ind=-1", "cfg.method=fista"],
               config_key="config")
    with pytest.raises(UserError, match=r"^not enough memory for one target block on cpu: about .* needed \(.* of "
                                        r"statistics for 600000 features, .* per target\), .* available .*; use a device "
                                        r"with more memory \(cfg.device=cuda:N\), spread the blocks over GPUs "
                                        r"\(gpus=N\), use fewer features, or set cfg.target_block=N to skip this check$"):
        fit(cfg, progress=False, log=False)


@pytest.mark.parametrize("room, block, n_blocks", [(10**12, 100, 1), (1_882_400, 23, 5), (-10_000, 1, 100)])
def test_block_size_follows_the_memory(monkeypatch, room, block, n_blocks):
    # fixed: 4.5 * 1000^2 + batch 100 * 1000 * 5 + validation masks 2 * 50 * 1000 = 5.1 MB, plus the
    # process itself on the CPU (RUNTIME_BYTES); per target: 4 * (20 * 1000 + 3 * (100 + 50)) = 81.8 KB
    # (the heap keeping no freed blocks: see the next test)
    from datamodels_ml import heap
    from datamodels_ml.regression.memory import RUNTIME_BYTES

    monkeypatch.setenv(heap.ENV, "system")

    fixed = 5_100_000 + RUNTIME_BYTES
    available = int((fixed + room) / 0.8) + 1
    kw = dict(n_features=1000, n_targets=100, n_train=500, n_val=50, batch_size=100, method="fista",
              dtype="float32", devices=["cpu"])
    if room < 0:
        with pytest.raises(UserError, match="^not enough memory for one target block on cpu"):
            plan_memory(**kw, available=available)
        forced = plan_memory(**kw, available=available, target_block=1)  # the user's block is not checked
        assert (forced.target_block, forced.n_blocks, forced.forced) == (1, 100, True)
        return
    plan = plan_memory(**kw, available=available)
    assert plan.fixed_bytes == fixed and plan.per_target_bytes == 81_800
    assert (plan.target_block, plan.n_blocks) == (block, n_blocks)
    gpu = plan_memory(**{**kw, "devices": ["cuda:0"]}, available=available)  # a device's plan: no process in it
    assert gpu.fixed_bytes == 5_100_000


def test_freed_blocks_kept_in_the_heap_count_per_target_on_the_cpu(monkeypatch):
    from datamodels_ml import heap
    from datamodels_ml.regression.memory import HEAP_COLUMNS

    kw = dict(n_features=1000, n_targets=100, n_train=500, n_val=50, batch_size=100, dtype="float32",
              available=10**12)
    monkeypatch.setattr(heap, "available", lambda: True)
    assert plan_memory(**kw, method="fista", devices=["cpu"]).per_target_bytes == 81_800 + HEAP_COLUMNS * 4 * 1000
    assert plan_memory(**kw, method="fista", devices=["cuda:0"]).per_target_bytes == 81_800  # not a device's
    monkeypatch.setattr(heap, "available", lambda: False)
    assert plan_memory(**kw, method="fista", devices=["cpu"]).per_target_bytes == 81_800


def test_a_batch_of_byte_masks_counts_as_bytes_a_transposed_copy_and_a_float_chunk(monkeypatch):
    # 0/1 masks read as bytes: the batch (b p), a transposed copy for the int8 products (b p), and at
    # most FLOAT_BYTES of it as floats (float64 for the refit), not the whole batch as floats
    from datamodels_ml.regression.memory import estimate
    from datamodels_ml.solvers import stats

    kw = dict(n_features=50_000, n_train=90_000, n_val=10_000, batch_size=5368, method="fista", itemsize=4)
    val_masks = 2 * 10_000 * 50_000
    gram = int(4.5 * 50_000**2)
    assert estimate(**kw, binary=True)[0] == gram + 2 * 5368 * 50_000 + 2**28 + val_masks
    assert estimate(**kw)[0] == gram + 5368 * 50_000 * 5 + val_masks  # float masks: the batch as floats
    monkeypatch.setattr(stats, "FLOAT_BYTES", 10**6)
    assert estimate(**kw, binary=True)[0] == gram + 2 * 5368 * 50_000 + 10**6 + val_masks
    assert estimate(**{**kw, "batch_size": 2}, binary=True)[0] == gram + 2 * 2 * 50_000 + 8 * 2 * 50_000 + val_masks


def test_remaining_fills_the_gaps_between_saved_blocks():
    assert remaining(0, 20, 7, []) == ([], [(0, 7), (7, 14), (14, 20)])
    assert remaining(0, 20, 7, [(0, 7)]) == ([(0, 7)], [(7, 14), (14, 20)])
    # blocks of another size (the memory changed between runs), one outside the range, one overlapping
    assert remaining(5, 20, 4, [(5, 8), (6, 9), (12, 15), (18, 30)]) == (
        [(5, 8), (12, 15)], [(8, 12), (15, 19), (19, 20)])


def test_merge_weights_active_by_block_size():
    def block(t, active):
        return {"weight": torch.zeros(2, t), "bias": torch.zeros(t), "lam": torch.zeros(t),
                "lam_path": torch.zeros(3, t), "best_index": torch.zeros(t, dtype=torch.long),
                "val_mse": torch.zeros(3, t), "train_mse": torch.zeros(3, t), "nnz": torch.zeros(3, t),
                "val_var": torch.ones(t), "mean": torch.ones(2), "std": torch.ones(2),
                "active": torch.tensor(active, dtype=torch.float64), "epochs": torch.tensor(5),
                "seconds": torch.tensor(1.5)}
    m = merge([block(3, [1.0, 1.0, 0.0]), block(1, [1.0, 0.0, 0.0])])
    assert m["weight"].shape == (2, 4) and m["lam_path"].shape == (3, 4)
    assert m["active"].tolist() == [1.0, 0.75, 0.0] and m["epochs"] == 10 and m["seconds"] == 3.0


def test_run_spreads_blocks_over_devices_once_each():
    """The multi-device scheduler (one thread per device), here with a pure function for each block."""
    import threading

    from datamodels_ml.regression.target_blocks import run

    todo = [(s, s + 3) for s in range(0, 30, 3)]
    seen: dict = {}

    def fit_one(s, e, device):
        return {"device": device, "thread": threading.current_thread().name}

    run(todo, ["dev0", "dev1"], fit_one, lambda s, e, block: seen.setdefault((s, e), block))
    assert sorted(seen) == todo
    assert {b["thread"] for b in seen.values()} <= {"regress-dev0", "regress-dev1"}
    assert all(b["thread"] == f"regress-{b['device']}" for b in seen.values())

    def failing(s, e, device):
        if s == 9:
            raise RuntimeError("out of memory on block 9-12")
        return {}

    done = []
    with pytest.raises(RuntimeError, match="^out of memory on block 9-12$"):
        run(todo, ["dev0", "dev1"], failing, lambda s, e, block: done.append((s, e)))
    assert (9, 12) not in done and len(done) < len(todo)


def test_the_kernels_are_printed_logged_and_forced(beton, tmp_path):
    from conftest import search_runs

    proc = run_cli("regress", *_args(beton, f"cfg.out_dir={tmp_path / 'r'}", "cfg.kernels=gram=torch"), cwd=tmp_path,
                   check=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("regress: ")]
    assert any(re.match(r"regress: .*, torch CPU capability \w+, \d+ of \d+ cores allotted, \d+ threads", ln)
               for ln in lines)
    [line] = [ln for ln in lines if "kernels (" in ln]
    assert re.search(r"gram=torch forced [0-9.e+]+ MAC/s \(int8 [0-9.e+]+, syrk [0-9.e+]+\); colsum=\w+ ", line)
    [run] = search_runs(tmp_path)
    assert run.data.params["kernel.gram"] == "torch (forced)"
    assert run.data.params["kernel.source"] in ("measured", "cached")
    assert float(run.data.params["kernel.gemm.rate"]) > 0
    bad = run_cli("regress", *_args(beton, f"cfg.out_dir={tmp_path / 'bad'}", "cfg.kernels=gram=avx"), cwd=tmp_path,
                  check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: cfg.kernels: unknown kernel 'avx' for gram: one of int8, syrk, torch"
    assert not (tmp_path / "bad").exists()

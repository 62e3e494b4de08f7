"""Fault suite, regression side: two regress on one output directory, saved target blocks that are
damaged, crafted or of other settings, a full disk while the results are written, and NaN/inf
targets in a .beton that write_dataset did not write. Real processes and files (the full disk is a
small tmpfs, so that case needs root). Each case checks that nothing written before is lost or
mixed, and that the user gets one clear line."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, cli_env, run_cli
from datamodels_ml.regression.target_blocks import KILL_AFTER_ENV
from datamodels_ml.config import load
from datamodels_ml.dataset.write_dataset import write_beton
from datamodels_ml.errors import UserError
from datamodels_ml.regression.config import RegressConfig
from datamodels_ml.regression.regress import fit
from datamodels_ml.regression.output_dir import rerun_key
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

TINY = str(CONFIGS / "reg_tiny.yaml")
N, P, T = 240, 25, 17  # blocks of 7 targets: 0-7, 7-14, 14-17


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = np.zeros((P, T))
    for t in range(T):
        w[rng.choice(P, 3, replace=False), t] = rng.normal(size=3)
    x = rng.random((N, P)) < 0.5
    return x, (x @ w + 0.1 * rng.normal(size=(N, T))).astype(np.float32)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-regress")
    store = create_store(root / "store", parse_spec({"num_models": N, "schema": {
        "masks": {"shape": [P], "dtype": "bool_"}, "margins": {"shape": [T], "dtype": "float32"}}}))
    x, y = _data()
    for i in range(N):
        store.write_row(i, {"masks": x[i], "margins": y[i]})
    write_beton(store.path, root / "reg.beton", progress=False)
    return root / "reg.beton"


def _args(beton, out, *extra):
    return [f"config={TINY}", f"data.data_path={beton}", f"cfg.out_dir={out}", "data.num_train=160",
            "data.num_val=60", "data.target_end_ind=-1", "cfg.k=8", "cfg.method=fista", "cfg.target_block=7", *extra]


def _fit(beton, *extra):
    return fit(load(RegressConfig, _args(beton, "x", *extra), config_key="config"), progress=False, log=False)


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datamodels_ml", *args], cwd=cwd, env=cli_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_error_line(proc, stderr: str, expected: str) -> None:
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert [ln for ln in stderr.splitlines() if ln.startswith("error:")] == [expected], stderr


def _lock_holder(out: Path) -> int | None:
    try:
        pid = (out / ".lock").read_text().split(" ", 1)[0]
    except OSError:
        return None
    return int(pid) if pid.isdigit() else None


# -- 1. two regress on one out_dir -------------------------------------------------------------------
def test_two_regress_on_one_out_dir_one_is_refused_with_the_holders_pid(beton, tmp_path):
    """Started together with eps 0.01 and 0.001: whichever takes the directory first is frozen
    (SIGSTOP) while it holds it, so the other must meet it; the other is refused in one line naming
    the holder's PID, and the holder's results are its own settings' throughout."""
    out = tmp_path / "results"
    procs = {eps: _start(tmp_path, "regress", *_args(beton, out, f"cfg.eps={eps}")) for eps in ("0.01", "0.001")}
    by_pid = {p.pid: eps for eps, p in procs.items()}
    try:
        deadline = time.time() + 120
        while _lock_holder(out) not in by_pid:
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), "no regress took the lock"
            time.sleep(0.01)
        holder = _lock_holder(out)
        os.kill(holder, signal.SIGSTOP)
        [other] = [p for p in procs.values() if p.pid != holder]
        _, stderr = other.communicate(timeout=300)
        _one_error_line(other, stderr, f"error: cfg.out_dir {out} is in use by PID {holder} (regress); "
                                       "wait for it to finish or stop it")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
    winner = procs[by_pid[holder]]
    _, stderr = winner.communicate(timeout=300)
    assert winner.returncode == 0, stderr
    assert "resuming" not in stderr

    eps = float(by_pid[holder])
    dm = torch.load(out / "datamodels.pt", weights_only=True)
    assert dm["config"]["cfg"]["eps"] == eps
    assert json.loads((out / "manifest.json").read_text())["config"]["cfg"]["eps"] == eps
    mine, theirs = _fit(beton, f"cfg.eps={eps}"), _fit(beton, f"cfg.eps={by_pid[other.pid]}")
    torch.testing.assert_close(dm["lam_path"], mine["lam_path"], rtol=1e-4, atol=0)  # every block: its own settings
    assert not torch.allclose(mine["lam_path"][-1], theirs["lam_path"][-1])  # the two settings differ where it shows
    assert not (out / ".blocks").exists()


# -- 2. saved blocks that cannot be used ---------------------------------------------------------
@pytest.fixture(scope="module")
def killed(beton, tmp_path_factory):
    """An out_dir of a regress (eps=0.01) killed right after it saved its first block, 0-7."""
    root = tmp_path_factory.mktemp("killed")
    proc = run_cli("regress", *_args(beton, root / "out"), cwd=root, env={KILL_AFTER_ENV: "1"}, check=False)
    assert proc.returncode == -9, proc.stderr
    return root / "out"


class _Crafted:
    """A pickle that would create a file if anything unpickled it with its globals."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tamper(case: str, out: Path, beton: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Spoil ``out/.blocks/0-7.pt`` as ``case`` says: (extra settings of the rerun, expected warning)."""
    block = out / ".blocks" / "0-7.pt"
    where = f"warning: {block}: "
    again = "; fitting targets [0:7] again"
    if case == "truncated":
        data = block.read_bytes()
        block.write_bytes(data[: len(data) // 2])
        return [], where + r"unreadable \(.*\)" + re.escape(again)
    if case == "crafted":
        block.write_bytes(pickle.dumps({"weight": _Crafted(tmp_path / "pwned")}))
        return [], where + r"unreadable \(.*\)" + re.escape(again)
    if case == "wrong shapes":
        saved = torch.load(block, weights_only=True)
        saved["weight"] = torch.zeros(P + 1, 7)
        torch.save(saved, block)
        return [], re.escape(where + f"'weight' has shape [{P + 1}, 7], expected [{P}, 7]" + again)
    # other settings: the interleaving, a block of eps=0.01 under the mark of a run with eps=0.001
    other = load(RegressConfig, _args(beton, out, "cfg.eps=0.001"), config_key="config")
    (out / ".blocks" / "blocks.json").write_text(json.dumps({"datamodels_ml_blocks": 1, "inputs": rerun_key(other)}))
    return ["cfg.eps=0.001"], re.escape(where + "was fitted with other inputs" + again)


@pytest.mark.parametrize("case", ["truncated", "crafted", "wrong shapes", "other settings"])
def test_a_saved_block_that_cannot_be_used_is_fitted_again(beton, killed, tmp_path, case):
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    extra, warning = _tamper(case, out, beton, tmp_path)
    proc = run_cli("regress", *_args(beton, out, *extra), cwd=tmp_path, check=True)
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")] and any(
        re.fullmatch(warning, ln) for ln in proc.stderr.splitlines()), proc.stderr
    assert "resuming" not in proc.stderr  # nothing reused: every block fitted by this run
    assert not (tmp_path / "pwned").exists()
    dm = torch.load(out / "datamodels.pt", weights_only=True)
    whole = _fit(beton, *extra)
    torch.testing.assert_close(dm["lam_path"], whole["lam_path"], rtol=1e-4, atol=0)
    torch.testing.assert_close(dm["weight"], whole["weight"], rtol=1e-4, atol=5e-4)  # the solver's tolerance per block


# -- 3. a full disk while the results are written ------------------------------------------------
@pytest.fixture
def small_fs(tmpfs):
    """A 4 MB tmpfs in tmp_path (root only), unmounted after the test."""
    return tmpfs("4m")


def _fill(where: Path) -> Path:
    """Fill the file system of ``where`` to the last byte."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` but the lock (which holds the PID of its last holder)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".lock"}


def test_full_disk_while_writing_results_is_one_line_and_replaces_nothing(beton, tmp_path, small_fs):
    out = small_fs / "results"
    run_cli("regress", *_args(beton, out, "cfg.eps=0.01"), cwd=tmp_path, check=True)
    rerun = _args(beton, out, "cfg.eps=0.001", "cfg.force=true")
    killed = run_cli("regress", *rerun, cwd=tmp_path, env={KILL_AFTER_ENV: "3"}, check=False)
    assert killed.returncode == -9, killed.stderr  # every block of the new settings saved, no results yet
    before = _files(out)
    filler = _fill(small_fs)
    proc = run_cli("regress", *rerun, cwd=tmp_path, check=False)
    _one_error_line(proc, proc.stderr, f"error: cannot write {out / 'datamodels.pt'}: No space left on device; "
                                       f"nothing in {out} was replaced (its fitted target blocks are kept: rerun to "
                                       "write the results without fitting again)")
    assert _files(out) == before  # the earlier results and the saved blocks, byte for byte; no temporary file
    filler.unlink()
    done = run_cli("regress", *rerun, cwd=tmp_path, check=True)
    assert "resuming: 17 targets in 3 saved block(s), 0 block(s) to fit" in done.stderr
    assert torch.load(out / "datamodels.pt", weights_only=True)["config"]["cfg"]["eps"] == 0.001


def test_full_disk_while_saving_a_block_is_one_line_and_keeps_the_saved_ones(tmp_path, small_fs):
    from datamodels_ml.regression.target_blocks import BlockStore

    store = BlockStore(small_fs / "out")
    store.open({"config": {"cfg.eps": 0.01}}, force=False)
    block = {"weight": torch.zeros(P, 7), "bias": torch.zeros(7)}
    store.save(0, 7, block)
    _fill(small_fs)
    with pytest.raises(UserError, match="^" + re.escape(
            f"cannot save the target block {store.path(7, 14)}: No space left on device; the blocks saved before are "
            "kept: rerun the same command to resume from them") + "$"):
        store.save(7, 14, {"weight": torch.zeros(P, 2**16)})
    assert store.saved() == [(0, 7)] and sorted(p.name for p in store.dir.iterdir()) == ["0-7.pt", "blocks.json"]
    torch.testing.assert_close(torch.load(store.path(0, 7), weights_only=True)["weight"], block["weight"])


def test_the_lock_file_of_a_regress_makes_a_directory_ours_and_no_other_file_does(beton, tmp_path):
    from datamodels_ml.store.lock import out_dir_lock
    from datamodels_ml.regression.output_dir import check_out_dir

    out = tmp_path / "out"
    with out_dir_lock(out, "regress"):
        pass  # a regress that stopped after it took the directory (an error, kill -9)
    cfg = load(RegressConfig, _args(beton, out), config_key="config")
    assert check_out_dir(cfg) == out
    (out / ".lock").write_text("the user's own lock file\n")
    with pytest.raises(UserError, match=f"^cfg.out_dir {re.escape(str(out))} is not empty and holds no regression "
                                        "of ours"):
        check_out_dir(cfg)
    assert (out / ".lock").read_text() == "the user's own lock file\n"


# -- 4. NaN/inf targets in a .beton that write_dataset did not write ------------------------------
def _foreign_beton(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """A .beton with our fields, written by FFCV's own writer (as another tool would), NaN rows kept."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    rows = [(x[i], y[i], i) for i in range(len(x))]
    fields = {"mask": NDArrayField(dtype=np.dtype(np.bool_), shape=(P,)),
              "targets": NDArrayField(dtype=np.dtype(np.float32), shape=(T,)), "idx": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(rows)


def test_nan_targets_of_a_foreign_beton_are_left_out_with_a_count(tmp_path):
    x, y = _data()
    bad = [3, 50, 199]
    y[3, 0], y[50, 16], y[199, 5] = np.nan, np.inf, -np.inf
    path = tmp_path / "foreign.beton"
    _foreign_beton(path, x, y)
    out = tmp_path / "out"
    proc = run_cli("regress", *_args(path, out, "data.num_train=160", "data.num_val=70"), cwd=tmp_path, check=True)
    assert f"warning: left out 3 of {N} models of {path} whose targets [0:{T}] hold NaN or inf" in \
        proc.stderr.splitlines(), proc.stderr
    dm = torch.load(out / "datamodels.pt", weights_only=True)
    used = set(dm["train_indices"].tolist()) | set(dm["val_indices"].tolist())
    assert len(used) == 230 and not used & set(bad)
    for key in ("weight", "bias", "lam", "best_val_mse"):
        assert torch.isfinite(dm[key]).all(), key

    # targets [1:5] of those rows are finite: nothing is left out there
    only = fit(load(RegressConfig, _args(path, "x", "data.target_start_ind=1", "data.target_end_ind=5",
                                         "data.num_train=170", "data.num_val=70"), config_key="config"),
               progress=False, log=False)
    assert len(only["train_indices"]) + len(only["val_indices"]) == N
    with pytest.raises(UserError, match="^" + re.escape(
            f"data.num_train + data.num_val = 239 exceeds the 237 models with finite targets [0:{T}] in {path}") + "$"):
        fit(load(RegressConfig, _args(path, "x", "data.num_train=170", "data.num_val=69"), config_key="config"),
            progress=False, log=False)

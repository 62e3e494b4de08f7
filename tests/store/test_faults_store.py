"""Fault suite, store side: crafted pickles, original-layout stores, full and read-only disks, the wrong
store at evaluate, NaN outputs. Each case checks that no completed row is lost or changed, no row is
marked complete without its data, and the user gets one clear line (real files, real subprocesses;
file systems of a given size or read-only are small tmpfs mounts, so those cases need root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, run_cli
from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import Store, create_store, status_report

SPEC = {"num_models": 6, "schema": {"masks": {"shape": [5], "dtype": "bool_"},
                                    "margins": {"shape": [3], "dtype": "float16"}}}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def _one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr


def make_original_store(path: Path, *, n: int = 6, done=(1, 4), seed: int = 0) -> dict[str, np.ndarray]:
    """A store as the original tools write it: open_memmap per key and _completed.npy, no spec.json."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    masks = np.lib.format.open_memmap(path / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, 5))
    margins = np.lib.format.open_memmap(path / "margins.npy", mode="w+", dtype=np.float16, shape=(n, 3))
    completed = np.lib.format.open_memmap(path / "_completed.npy", mode="w+", dtype=np.bool_, shape=(n,))
    for i in done:
        masks[i] = rng.random(5) < 0.5
        margins[i] = rng.normal(size=3)
        completed[i] = True
    (path / "cmds.txt").write_text("python train.py ...\n")
    for arr in (masks, margins, completed):
        arr.flush()
    data = {"masks": np.array(masks), "margins": np.array(margins)}
    del masks, margins, completed
    return data


# -- 1. nothing runs from a data file ------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "datamodels.pt"
    torch.save({"weight": torch.zeros(5, 3), "bias": torch.zeros(3), "lam": torch.zeros(3),
                "mean": torch.zeros(5), "std": torch.ones(5), "payload": _Evil(str(marker))}, evil)
    with pytest.raises(UserError, match=r"datamodels\.pt: refused to load: it holds Python objects"):
        Datamodels.load(evil)
    assert not marker.exists()
    create_store(tmp_path / "store", parse_spec(SPEC))
    proc = run_cli("evaluate", f"datamodels={evil}", f"store={tmp_path / 'store'}", cwd=tmp_path)
    _one_error_line(proc, r"refused to load: it holds Python objects")
    assert not marker.exists()


# -- item 1 of the migration issue: an original store is opened as it is, never zeroed -------------
def test_init_on_an_original_store_keeps_every_row(tmp_path):
    data = make_original_store(tmp_path / "orig")
    before = _snapshot(tmp_path / "orig")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    proc = run_cli("init", f"spec={spec}", f"store={tmp_path / 'orig'}", cwd=tmp_path, check=True)
    assert "original layout, 2/6 complete" in proc.stdout and "left as it is" in proc.stdout
    assert _snapshot(tmp_path / "orig") == before  # not a byte changed, no spec.json written
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SPEC, "num_models": 7}))
    proc = run_cli("init", f"spec={other}", f"store={tmp_path / 'orig'}", cwd=tmp_path)
    _one_error_line(proc, r"different spec already exists .*num_models 6 there, 7 requested.*force=true")
    assert _snapshot(tmp_path / "orig") == before
    run_cli("init", f"spec={spec}", f"store={tmp_path / 'orig'}", "write_spec=true", cwd=tmp_path, check=True)
    assert json.loads((tmp_path / "orig" / "spec.json").read_text()) == SPEC
    store = Store(tmp_path / "orig", writable=False)
    assert store.completed_indices().tolist() == [1, 4]
    np.testing.assert_array_equal(store.array("margins")[[1, 4]], data["margins"][[1, 4]])


def test_every_command_opens_an_original_store(tmp_path):
    data = make_original_store(tmp_path / "orig")
    store = Store(tmp_path / "orig", writable=False)
    assert store.original_layout and store.spec.to_json() == SPEC
    proc = run_cli("status", f"store={tmp_path / 'orig'}", cwd=tmp_path, check=True)
    assert "completed: 2/6" in proc.stdout and "original layout" in proc.stdout
    run_cli("write_dataset", f"store={tmp_path / 'orig'}", f"out={tmp_path / 'd.beton'}", "x_name=masks",
            "y_name=margins", "progress=false", cwd=tmp_path, check=True)
    from datamodels_ml.dataset.reader import read_beton

    x, y, idx = read_beton(tmp_path / "d.beton")
    assert idx.tolist() == [1, 4]
    np.testing.assert_array_equal(x, data["masks"][[1, 4]])
    np.testing.assert_allclose(y, data["margins"][[1, 4]].astype(np.float32))
    assert not (tmp_path / "orig" / "spec.json").exists()


def test_stray_array_files_are_never_overwritten(tmp_path):
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "masks.npy", np.ones((6, 5), bool))
    before = _snapshot(tmp_path / "s")
    with pytest.raises(UserError, match=r"masks\.npy already exists and is not part of a store"):
        create_store(tmp_path / "s", parse_spec(SPEC))
    after = _snapshot(tmp_path / "s")
    after.pop(".lock")  # the creation lock under which the strays were judged: the only file added
    assert after == before


@pytest.mark.parametrize("bad, message", [
    ({"_completed": np.zeros((6, 2), bool)}, r"_completed\.npy: expected a 1-D boolean array"),
    ({"masks": np.zeros((5, 5), bool)}, r"masks\.npy: first dimension \[5\] does not match the 6 models"),
    ({"masks": np.zeros((6, 5), complex)}, r"masks\.npy: dtype complex128 is not a fixed-size numeric"),
])
def test_broken_original_store_is_one_clear_error(tmp_path, bad, message):
    make_original_store(tmp_path / "orig")
    for key, arr in bad.items():
        np.save(tmp_path / "orig" / f"{key}.npy", arr)
    with pytest.raises(UserError, match=message):
        Store(tmp_path / "orig")


# -- 4. sizes and space ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_models", [10**13, 10**9])
def test_absurd_sizes_are_refused_before_any_file(tmp_path, num_models):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"num_models": num_models, "schema": {"masks": {"shape": [50000], "dtype": "bool_"},
                                                                     "margins": {"shape": [10000], "dtype": "float32"}}}))
    proc = run_cli("init", f"spec={spec}", f"store={tmp_path / 'big'}", cwd=tmp_path)
    _one_error_line(proc, rf"the store at .*big for {num_models} models needs [0-9.]+ [TP]B but only .* is free there")
    assert not (tmp_path / "big").exists()


def test_new_store_files_are_fully_allocated(tmp_path):
    store = create_store(tmp_path / "s", parse_spec({"num_models": 3000, "schema": {"x": {"shape": [1000],
                                                                                       "dtype": "float32"}}}))
    st = os.stat(store.path / "x.npy")
    assert st.st_blocks * 512 >= st.st_size  # no holes: a later write cannot meet a full disk


@pytest.fixture
def small_fs(tmpfs):
    """A 2 MB file system."""
    return tmpfs("2m")


def test_full_disk_init_is_one_line_and_leaves_nothing(tmp_path, small_fs):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"num_models": 1000, "schema": {"x": {"shape": [1000], "dtype": "float32"}}}))
    proc = run_cli("init", f"spec={spec}", f"store={small_fs / 'store'}", cwd=tmp_path)
    _one_error_line(proc, r"for 1000 models needs 4\.0 MB but only .* is free there")
    assert list(small_fs.iterdir()) == []


def test_full_disk_write_dataset_is_one_line_and_leaves_nothing(tmp_path, small_fs):
    store = create_store(tmp_path / "store", parse_spec({"num_models": 400, "schema": {
        "masks": {"shape": [2000], "dtype": "bool_"}, "margins": {"shape": [600], "dtype": "float32"}}}))
    rng = np.random.default_rng(0)
    for i in range(400):
        store.write_row(i, {"masks": rng.random(2000) < 0.5, "margins": rng.normal(size=600).astype(np.float32)})
    proc = run_cli("write_dataset", f"store={store.path}", f"out={small_fs / 'd.beton'}", "x_name=masks",
                   "y_name=margins", "progress=false", cwd=tmp_path, timeout=120)
    _one_error_line(proc, r"(No space left on device|not enough space|needs .* free)")
    assert not [f for f in small_fs.iterdir() if f.name.endswith(".beton")]


def test_read_only_store_is_one_line_and_unchanged(tmp_path, tmpfs):
    where = tmpfs("4m")
    store = create_store(where / "store", parse_spec(SPEC))
    store.write_row(2, {"masks": np.ones(5, bool), "margins": np.ones(3, np.float16)})
    del store
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    before = _snapshot(where / "store")
    proc = run_cli("worker", f"store={where / 'store'}", "index=0", "main=datamodels_ml.examples.minimal", cwd=tmp_path)
    _one_error_line(proc, r"store .*store is not writable \(Read-only file system: ")
    proc = run_cli("status", f"store={where / 'store'}", cwd=tmp_path, check=True)
    assert "completed: 1/6" in proc.stdout
    assert _snapshot(where / "store") == before


# -- 9. NaN and inf outputs are counted ----------------------------------------------------------------
def test_status_counts_rows_with_nan_or_inf(tmp_path):
    store = create_store(tmp_path / "s", parse_spec(SPEC))
    for i, v in enumerate([0.0, np.nan, np.inf, 1.0]):
        store.write_row(i, {"masks": np.ones(5, bool), "margins": np.array([v, 0, 0], np.float16)})
    store.array("margins")[5] = np.nan  # not complete: not counted
    report = status_report(Store(tmp_path / "s", writable=False))
    assert "completed rows with NaN/inf: margins 2 (write_dataset drops them)" in report


# -- 8. evaluate refuses a store the datamodels were not fitted on -------------------------------------
def test_evaluate_refuses_another_store_with_the_same_sizes(tmp_path):
    from conftest import make_store

    make_store(tmp_path / "store", n=160, seed=0)
    make_store(tmp_path / "twin", n=160, seed=1)  # same spec and sizes, other masks
    run_cli("write_dataset", f"store={tmp_path / 'store'}", f"out={tmp_path / 'd.beton'}", "x_name=masks",
            "y_name=margins", "progress=false", cwd=tmp_path, check=True)
    run_cli("regress", f"config={CONFIGS / 'reg_tiny.yaml'}", f"data.data_path={tmp_path / 'd.beton'}",
            "data.num_train=100", "data.num_val=20", "data.target_end_ind=-1", f"cfg.out_dir={tmp_path / 'reg'}", "cfg.progress=false",
            cwd=tmp_path, check=True)
    dm = tmp_path / "reg" / "datamodels.pt"
    assert torch.load(dm, weights_only=True)["store_fingerprint"]["masks_sha256"]
    run_cli("evaluate", f"datamodels={dm}", f"store={tmp_path / 'store'}", cwd=tmp_path, check=True)
    proc = run_cli("evaluate", f"datamodels={dm}", f"store={tmp_path / 'twin'}", cwd=tmp_path)
    _one_error_line(proc, r"store at .*twin is not the one .*datamodels\.pt was fitted on: the masks of its "
                          r"training models differ")
    short = tmp_path / "short"
    make_store(short, n=160, seed=0, complete=range(50))
    proc = run_cli("evaluate", f"datamodels={dm}", f"store={short}", cwd=tmp_path)
    _one_error_line(proc, r"fitted on \d+ models that are not complete in the store at .*short")


def test_train_completes_an_original_store_keeping_its_rows(tmp_path):
    """An original store of the minimal example's keys: train fills only the missing rows, writes no spec.json."""
    path = tmp_path / "orig"
    path.mkdir()
    values = np.lib.format.open_memmap(path / "values.npy", mode="w+", dtype=np.uint8, shape=(6, 10))
    index = np.lib.format.open_memmap(path / "index.npy", mode="w+", dtype=np.int64, shape=(6,))
    done = np.lib.format.open_memmap(path / "_completed.npy", mode="w+", dtype=np.bool_, shape=(6,))
    values[2], index[2], done[2] = 77, 2, True  # trained by the original tools with another multiple
    for arr in (values, index, done):
        arr.flush()
    del values, index, done
    run_cli("train", f"store={path}", "main=datamodels_ml.examples.minimal", "n=6", "jobs=1", "args.multiple=3",
            "progress=false", cwd=tmp_path, check=True)
    store = Store(path, writable=False)
    assert store.completed.all() and store.original_layout
    assert store.array("values")[2].tolist() == [77] * 10  # the original's row is untouched
    assert store.array("values")[[0, 1, 3, 4, 5]].tolist() == [[3] * 10] * 5


def test_init_force_is_refused_while_the_store_is_in_use(tmp_path):
    from datamodels_ml.store.lock import store_lock

    store = create_store(tmp_path / "s", parse_spec(SPEC))
    store.write_row(1, {"masks": np.ones(5, bool), "margins": np.ones(3, np.float16)})
    spec = tmp_path / "other.json"
    spec.write_text(json.dumps({**SPEC, "num_models": 9}))
    before = _snapshot(tmp_path / "s")
    with store_lock(tmp_path / "s", "train"):
        proc = run_cli("init", f"spec={spec}", f"store={tmp_path / 's'}", "force=true", cwd=tmp_path)
    _one_error_line(proc, rf"store .*s is in use by PID {os.getpid()} \(train\)")
    assert {k: v for k, v in _snapshot(tmp_path / "s").items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


# -- issue 24, item 4: a truncated array is refused by every command, never zero-extended --------------
MINIMAL = {"num_models": 2000, "schema": {"values": {"shape": [10], "dtype": "uint8"},
                                          "index": {"shape": [], "dtype": "int64"}}}


def _full_minimal_store(path: Path) -> None:
    """Every row complete, as the minimal example with args.multiple=3 writes it."""
    store = create_store(path, parse_spec(MINIMAL))
    store.array("values")[:] = 3
    store.array("index")[:] = np.arange(2000)
    store.commit(list(range(2000)))
    del store


def test_truncated_array_is_refused_by_every_command_and_never_grown(tmp_path):
    _full_minimal_store(tmp_path / "st")
    os.truncate(tmp_path / "st" / "values.npy", 10000)  # what `truncate -s 10000` does: rows 987.. are gone
    before = _snapshot(tmp_path / "st")
    message = r"st/values\.npy is truncated: 10000 bytes, but its header \(\[2000, 10\] uint8\) needs 20128"
    for args in (["status", "store=st"],
                 ["train", "store=st", "main=datamodels_ml.examples.minimal", "n=2000", "jobs=1", "progress=false"],
                 ["worker", "store=st", "index=1500", "main=datamodels_ml.examples.minimal"],
                 ["write_dataset", "store=st", "out=d.beton", "x_name=values", "y_name=index", "progress=false"]):
        _one_error_line(run_cli(*args, cwd=tmp_path, timeout=120), message)
        assert (tmp_path / "st" / "values.npy").stat().st_size == 10000, args[0]
        assert _snapshot(tmp_path / "st") == before, args[0]  # no flag set, no row changed
    assert not list(tmp_path.glob("d.beton*"))


@pytest.mark.parametrize("name, size, message", [
    ("_completed.npy", 1000, r"_completed\.npy is truncated: 1000 bytes, but its header \(\[2000\] bool\) needs 2128"),
    ("index.npy", 128, r"index\.npy is truncated: 128 bytes, but its header \(\[2000\] int64\) needs 16128"),
    ("values.npy", 20129, r"values\.npy has 20129 bytes, but its header \(\[2000, 10\] uint8\) needs 20128"),
])
@pytest.mark.parametrize("writable", [True, False])
def test_a_wrong_size_array_is_refused_on_open(tmp_path, name, size, message, writable):
    _full_minimal_store(tmp_path / "st")
    os.truncate(tmp_path / "st" / name, size)
    before = _snapshot(tmp_path / "st")
    with pytest.raises(UserError, match=message):
        Store(tmp_path / "st", writable=writable)
    assert _snapshot(tmp_path / "st") == before


def test_a_dtype_that_disagrees_with_the_header_is_refused_in_one_line(tmp_path):
    store = create_store(tmp_path / "st", parse_spec({"num_models": 6, "schema": {
        "margins": {"shape": [3], "dtype": "float32"}}}))
    store.write_row(2, {"margins": np.array([1.5, 2.5, 3.5], np.float32)})
    del store
    spec = json.loads((tmp_path / "st" / "spec.json").read_text())
    spec["schema"]["margins"]["dtype"] = "float16"  # the same bytes would read as other numbers
    (tmp_path / "st" / "spec.json").write_text(json.dumps(spec))
    before = _snapshot(tmp_path / "st")
    message = r"margins\.npy: the spec gives key 'margins' dtype float16 but the file holds float32"
    for args in (["status", "store=st"], ["write_dataset", "store=st", "out=d.beton", "x_name=margins",
                                          "y_name=margins", "progress=false"]):
        _one_error_line(run_cli(*args, cwd=tmp_path), message)
    assert _snapshot(tmp_path / "st") == before and not list(tmp_path.glob("d.beton*"))


# -- issue 24, items 9 and 10: a spec that is not UTF-8, a key that is not a plain file name -------------
@pytest.mark.parametrize("text, message", [
    (b'{"num_models": 4, "schema": {"m\xe9": {"shape": [1], "dtype": "uint8"}}}',
     r"spec\.json: not UTF-8 text \(byte 0xe9 at offset 31\)"),
    (b'{"num_models": 4, "schema": {"abc\\n": {"shape": [1], "dtype": "uint8"}}}',
     r"spec key 'abc\\n': use letters, digits"),
])
def test_init_refuses_a_bad_spec_in_one_line_and_creates_nothing(tmp_path, text, message):
    (tmp_path / "spec.json").write_bytes(text)
    _one_error_line(run_cli("init", "spec=spec.json", "store=st", cwd=tmp_path), message)
    assert not (tmp_path / "st").exists()


def test_a_store_whose_spec_is_not_utf8_is_one_line(tmp_path):
    store = create_store(tmp_path / "st", parse_spec(SPEC))
    store.write_row(1, {"masks": np.ones(5, bool), "margins": np.ones(3, np.float16)})
    del store
    (tmp_path / "st" / "spec.json").write_bytes((tmp_path / "st" / "spec.json").read_bytes() + b"\xff")
    before = _snapshot(tmp_path / "st")
    for args in (["status", "store=st"], ["worker", "store=st", "index=0", "main=datamodels_ml.examples.minimal"]):
        _one_error_line(run_cli(*args, cwd=tmp_path), r"st/spec\.json: not UTF-8 text \(byte 0xff at offset \d+\)")
    assert _snapshot(tmp_path / "st") == before

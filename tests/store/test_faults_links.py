"""Fault suite, symbolic links in a store (issue 24, item 6): a link planted at ``.lock``, at
``workers/<i>``, at ``workers/<i>/output.log``, at ``workers`` or at an array is never written
through. Each case runs the real commands, then checks that the link's target is byte for byte
unchanged, that no completed row was lost or changed, that no row is marked complete without its
data, and that the user got one clear line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from datamodels_ml.errors import UserError
from datamodels_ml.store.lock import row_lock, store_lock
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import Store, create_store

MINIMAL = {"num_models": 6, "schema": {"values": {"shape": [10], "dtype": "uint8"},
                                       "index": {"shape": [], "dtype": "int64"}}}
TRAIN = ["train", "store=st", "main=datamodels_ml.examples.minimal", "n=6", "jobs=1", "args.multiple=3",
         "progress=false"]
KEPT = (1, 2)  # rows complete before each command, holding 7s


def _error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr


@pytest.fixture
def victim(tmp_path):
    """A user's file outside the store, and a folder holding one; ``unchanged()`` checks both."""
    file = tmp_path / "precious.txt"
    file.write_bytes(bytes(range(256)) * 2)
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")

    def unchanged() -> bool:
        return (file.read_bytes() == bytes(range(256)) * 2 and sorted(os.listdir(folder)) == ["keep.txt"]
                and (folder / "keep.txt").read_text() == "mine\n")

    unchanged.file, unchanged.folder = file, folder
    return unchanged


@pytest.fixture
def st(tmp_path):
    store = create_store(tmp_path / "st", parse_spec(MINIMAL))
    for i in KEPT:
        store.write_row(i, {"values": np.full(10, 7, np.uint8), "index": np.int64(i)})
    return tmp_path / "st"


def check_rows(path: Path, trained: set[int] = frozenset()) -> None:
    """Rows in ``KEPT`` unchanged; complete rows are exactly ``KEPT`` and ``trained``, each with its data."""
    store = Store(path, writable=False)
    assert set(store.completed_indices().tolist()) == set(KEPT) | set(trained)
    for i in store.completed_indices():
        assert store.array("values")[i].tolist() == [7 if i in KEPT else 3] * 10 and store.array("index")[i] == i


def test_a_link_at_the_lock_is_never_written_through(tmp_path, st, victim):
    (st / ".lock").unlink(missing_ok=True)
    (st / ".lock").symlink_to(victim.file)
    refused = r"st/\.lock is a symbolic link: refusing to write through it"
    for args in (TRAIN, ["worker", "store=st", "index=0", "main=datamodels_ml.examples.minimal"],
                 ["init", f"spec={st / 'spec.json'}", "store=st", "force=true"]):
        _error_line(run_cli(*args, cwd=tmp_path), refused)
        assert victim(), args[0]
        check_rows(st)
    proc = run_cli("status", "store=st", cwd=tmp_path, check=True)  # reading the store writes nothing
    assert "completed: 2/6" in proc.stdout and victim()


def test_a_link_at_a_models_output_log_fails_that_model_alone(tmp_path, st, victim):
    (st / "workers" / "3").mkdir(parents=True)
    (st / "workers" / "3" / "output.log").symlink_to(victim.file)
    refused = r"st/workers/3/output\.log is a symbolic link: refusing to write through it"
    proc = run_cli("worker", "store=st", "index=3", "main=datamodels_ml.examples.minimal", "timeout=60",
                   cwd=tmp_path)  # a timeout runs the model in a runner, whose output goes to output.log
    _error_line(proc, rf"model 3 failed: .*{refused}")
    assert victim()
    check_rows(st)
    proc = run_cli(*TRAIN, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "failed indices: 3" in proc.stdout and "first failure (3): " in proc.stdout
    assert any(line.startswith("first failure (3): ") and "output.log is a symbolic link" in line
               for line in proc.stdout.splitlines()), proc.stdout
    assert victim()
    check_rows(st, trained={0, 4, 5})


@pytest.mark.parametrize("where", ["workers/4", "workers"])
def test_a_link_at_a_workers_folder_is_refused(tmp_path, st, victim, where):
    (st / where).parent.mkdir(exist_ok=True)
    (st / where).symlink_to(victim.folder, target_is_directory=True)
    refused = rf"st/{where} is a symbolic link: refusing to write through it"
    _error_line(run_cli("worker", "store=st", "index=4", "main=datamodels_ml.examples.minimal", cwd=tmp_path),
                refused)
    assert victim()
    check_rows(st)
    proc = run_cli(*TRAIN, cwd=tmp_path)
    if where == "workers":  # the store itself is refused before anything runs
        _error_line(proc, refused)
        check_rows(st)
    else:  # that model fails in one line; the others train
        assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert any(line.startswith("first failure (4): ") and "st/workers/4 is a symbolic link" in line
                   for line in proc.stdout.splitlines()), proc.stdout
        check_rows(st, trained={0, 3, 5})
    assert victim()


def test_a_linked_array_is_refused_for_writing_and_read_as_it_is(tmp_path, st, victim):
    outside = tmp_path / "values-elsewhere.npy"
    (st / "values.npy").rename(outside)
    (st / "values.npy").symlink_to(outside)
    before = outside.read_bytes()
    _error_line(run_cli(*TRAIN, cwd=tmp_path), r"st/values\.npy is a symbolic link: refusing to write through it")
    assert outside.read_bytes() == before
    proc = run_cli("status", "store=st", cwd=tmp_path, check=True)
    assert "completed: 2/6" in proc.stdout
    check_rows(st)


# -- in-process: the locks, a FIFO, and links planted at the names of temporary files -------------------
def test_locks_refuse_links_and_fifos(tmp_path, st, victim):
    (st / ".lock").unlink(missing_ok=True)
    (st / ".lock").symlink_to(victim.file)
    with pytest.raises(UserError, match=r"st/\.lock is a symbolic link: refusing to write through it"):
        with store_lock(st, "train"):
            pass
    (st / ".lock").unlink()
    os.mkfifo(st / ".lock")  # opening a FIFO for writing would wait for a reader forever
    with pytest.raises(UserError, match=r"st/\.lock is not a regular file"):
        with store_lock(st, "train"):
            pass
    (st / "workers").mkdir(exist_ok=True)
    (st / "workers" / "5").symlink_to(victim.folder, target_is_directory=True)
    with pytest.raises(UserError, match=r"st/workers/5 is a symbolic link: refusing to write through it"):
        with row_lock(st, 5, "worker index=5"):
            pass
    assert victim()


def test_create_store_never_writes_through_a_link_at_a_temporary_name(tmp_path, victim):
    path = tmp_path / "new"
    path.mkdir()
    for name in (f".values.npy.tmp-{os.getpid()}", f".spec.json.tmp-{os.getpid()}"):
        (path / name).symlink_to(victim.file)
    store = create_store(path, parse_spec(MINIMAL))
    assert victim() and store.missing_indices().tolist() == list(range(6))
    assert sorted(p.name for p in path.iterdir()) == [".lock", "_completed.npy", "index.npy", "spec.json", "values.npy"]

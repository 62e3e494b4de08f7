"""Fault suite, write_dataset side: a disk that fills in the middle of a write, and a write killed with
kill -9. Each case checks that the command ends with one clear line (or is gone), that no FFCV writer
process outlives it, that the store is unchanged and that its temporary file is removed by the next
run (real files, real processes; the full disk is a small tmpfs, so that case needs root).

The CLI runs here through a small driver that changes one thing before ``main``: ``full`` skips the
up-front free-space check (the disk filled after it passed), ``slow`` makes each row take 20 ms to
read (so the write is still running when it is killed).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env
from datamodels_ml.dataset.reader import read_beton, read_manifest
from datamodels_ml.dataset.write_dataset import write_beton
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store

DRIVER = """
import sys, time
import datamodels_ml.dataset.write_dataset as dataset
mode = sys.argv.pop(1)
if mode == "full":
    dataset._check_space = lambda *args: None
elif mode == "slow":
    read_row = dataset._Rows.__getitem__
    dataset._Rows.__getitem__ = lambda self, j: (time.sleep(0.05), read_row(self, j))[1]
from datamodels_ml.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _store(path: Path, n: int = 300):
    store = create_store(path, parse_spec({"num_models": n, "schema": {
        "masks": {"shape": [400], "dtype": "bool_"}, "margins": {"shape": [50], "dtype": "float32"}}}))
    rng = np.random.default_rng(0)
    for i in range(n):
        store.write_data(i, {"masks": rng.random(400) < 0.5, "margins": rng.normal(size=50).astype(np.float32)})
    store.commit(list(range(n)))
    return store


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _start(mode: str, *args: str, cwd: Path, token: str) -> subprocess.Popen:
    """The CLI under the driver, with ``token`` in its environment (its writer processes inherit it).

    Its output goes to ``cwd/cli.out`` and ``cwd/cli.err``: files, not pipes, whose end a test would
    wait for as long as any writer process holds them open."""
    env = cli_env(cwd, {"DM_FAULT_TOKEN": token})
    with open(cwd / "cli.out", "w") as out, open(cwd / "cli.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", DRIVER, mode, "write_dataset", *args], cwd=cwd, env=env,
                                stdout=out, stderr=err, start_new_session=True)


def _processes(token: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if f"DM_FAULT_TOKEN={token}".encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            continue
    return found


def _none_left(token: str, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := _processes(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # do not leave them to the rest of the suite
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def test_disk_full_in_the_middle_of_a_write_is_one_line(tmp_path, tmpfs):
    store = _store(tmp_path / "store")
    disk = tmpfs("2m")
    (disk / "d.beton").write_bytes(b"an older dataset")
    (disk / "d.beton.json").write_text("{}\n")
    before = _snapshot(store.path)
    token = uuid.uuid4().hex
    proc = _start("full", f"store={store.path}", f"out={disk / 'd.beton'}", "force=true", "progress=false",
                  "num_workers=2", cwd=tmp_path, token=token)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("write_dataset hung on a full disk")
    finally:
        left = _none_left(token)
    out, err = (tmp_path / "cli.out").read_text(), (tmp_path / "cli.err").read_text()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: cannot write {re.escape(str(disk / 'd.beton'))}: No space left on device \(the disk filled while "
        r"writing; nothing was replaced\); free space or write the \.beton to another disk \(out=\.\.\.\)",
        errors[0]), err
    assert left == [], "FFCV writer processes outlived write_dataset"
    assert _snapshot(store.path) == before
    assert sorted(p.name for p in disk.iterdir()) == ["d.beton", "d.beton.json"]  # no temporary file left
    assert (disk / "d.beton").read_bytes() == b"an older dataset" and (disk / "d.beton.json").read_text() == "{}\n"


def test_kill_9_leaves_no_writer_and_the_next_run_removes_its_file(tmp_path, capsys):
    store = _store(tmp_path / "store")
    before = _snapshot(store.path)
    out = tmp_path / "data" / "d.beton"
    token = uuid.uuid4().hex
    proc = _start("slow", f"store={store.path}", f"out={out}", "progress=false", "num_workers=2", cwd=tmp_path,
                  token=token)
    tmp = out.parent / f".d.beton.tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 60
        while not (tmp.exists() and len(_processes(token)) >= 3) and proc.poll() is None:
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "cli.err").read_text()
        proc.kill()  # kill -9 of write_dataset alone; its writers must follow it
        proc.wait()
    finally:
        left = _none_left(token, within=3)
    assert left == [], "FFCV writer processes outlived write_dataset"
    assert tmp.exists() and not out.exists()  # what a killed write leaves: its temporary file only

    write_beton(store.path, out, progress=False)
    assert f"note: removed {tmp}, left by a write_dataset that did not finish" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.beton", "d.beton.json"]
    _, _, idx = read_beton(out)
    assert idx.tolist() == list(range(300)) == read_manifest(out)["indices"]
    assert _snapshot(store.path) == before


def test_only_the_files_of_dead_writes_are_removed(tmp_path, capsys):
    """A temporary file is removed when no process holds its lock, unless it is new and named after a
    live process (a write that has just created it and is about to lock it)."""
    store = _store(tmp_path / "store", n=70)
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    pids = {"dead": gone.pid, "new": live[0].pid, "old": live[1].pid, "locked": gone.pid * 10 + 1}
    files = {case: tmp_path / f".d.beton.tmp-{pid}" for case, pid in pids.items()}
    for case, f in files.items():
        f.write_bytes(b"rows")
        if case in ("old", "locked"):
            os.utime(f, (time.time() - 60,) * 2)
    locker = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(files["locked"])], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"
        write_beton(store.path, tmp_path / "d.beton", progress=False)
    finally:
        for proc in (*live, locker):
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".d.beton")) == sorted(
        files[case].name for case in ("new", "locked"))
    err = capsys.readouterr().err
    for case in ("dead", "old"):
        assert f"note: removed {files[case]}, left by a write_dataset that did not finish" in err

"""Faults during training, through real processes on small stores: a runner or the driver killed with
kill -9, two writers on one store, a main that hangs past its timeout, runners that keep dying,
SIGTERM. Each test checks the store afterwards: no completed row lost or changed, no row marked
complete without its data, no row trained twice, and one clear message."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MAINS, MlflowServer, cli_env, run_cli, search_runs, _template_db, tracking_client
from datamodels_ml.errors import UserError
from datamodels_ml.store.lock import creation_lock, row_lock, store_lock

FAULTS = str(MAINS / "faults.py")
SPEC = {"num_models": 64, "schema": {"values": {"shape": [10], "dtype": "uint8"},
                                     "index": {"shape": [], "dtype": "int64"},
                                     "loss": {"shape": [], "dtype": "float32"}}}


@pytest.fixture
def store(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    run_cli("init", "spec=spec.json", "store=st", cwd=tmp_path, check=True)
    return tmp_path / "st"


def train_args(n, *args, jobs=2):
    return ["train", "store=st", f"main={FAULTS}", f"n={n}", f"jobs={jobs}", "progress=false", *args]


def start(tmp_path, *args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "datamodels_ml", *args], cwd=tmp_path, env=cli_env(tmp_path, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def calls(store):
    log = store / "calls.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def wait_for(predicate, what, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid):
    """Whether ``pid`` runs (a zombie, dead but not reaped by a container's init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def runner_pids(driver):
    """The runner processes a driver started (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == driver and b"datamodels_ml.training.runner_child" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def check_rows(store, multiple_of):
    """Every complete row holds its model's data; returns the complete indices and their rows."""
    done = np.flatnonzero(np.load(store / "_completed.npy"))
    values, index = np.load(store / "values.npy"), np.load(store / "index.npy")
    for i in done:
        assert index[i] == i and values[i].tolist() == [(i * multiple_of(i)) % 256] * 10, f"row {i} is wrong"
    return set(done.tolist()), values[done].copy()


def test_hanging_main_is_killed_after_its_timeout_and_only_it_fails(store, tmp_path):
    # the import takes longer than the timeout (a runner's start-up never counts against a model),
    # and the hanging main swallows any exception raised inside it: only killing its process stops it
    out = run_cli(*train_args(10, "timeout=2", "args.hang=4"), cwd=tmp_path, env={"FAULTS_IMPORT_SECONDS": "2.2"})
    assert out.returncode == 1, out.stderr
    assert "train: 9 completed, 1 failed, 0 not run (9/10 complete in st)" in out.stdout
    assert "failed indices: 4\nfirst failure (4): timed out after 2 s" in out.stdout
    done, _ = check_rows(store, lambda i: 1)
    assert done == set(range(10)) - {4}
    runner, child = (int(p) for p in (store / "hang.pid").read_text().split())
    assert not alive(runner) and not alive(child)  # the runner's whole process group was killed
    assert sorted(calls(store)) == list(range(10))  # no other model retried, none run twice
    assert json.loads((store / "_failures.json").read_text())["4"] == "timed out after 2 s"


def test_runner_killed_mid_run_fails_its_model_only_and_hides_args(store, tmp_path):
    driver = start(tmp_path, *train_args(24, "args.sleep=0.15", "args.multiple=7"))
    wait_for(lambda: len(calls(store)) >= 4 and len(runner_pids(driver.pid)) == 2, "two busy runners")
    victim = runner_pids(driver.pid)[0]
    cmdline = Path(f"/proc/{victim}/cmdline").read_bytes()
    assert b"multiple" not in cmdline and b"sleep" not in cmdline  # args travel on stdin, not in argv
    os.kill(victim, signal.SIGKILL)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err
    assert "1 failed" in out and "the runner process died while training this model: killed by SIGKILL (signal 9)" in out
    assert "Traceback" not in err
    done, _ = check_rows(store, lambda i: 7)
    assert len(done) == 23
    out = run_cli(*train_args(24, "args.multiple=7"), cwd=tmp_path, check=True)
    assert "train: 1 completed, 0 failed" in out.stdout
    assert check_rows(store, lambda i: 7)[0] == set(range(24))


def test_driver_killed_mid_run_then_rerun_resumes(store, tmp_path):
    driver = start(tmp_path, *train_args(40, "args.sleep=0.15"))
    wait_for(lambda: np.load(store / "_completed.npy").sum() >= 6, "six committed rows")
    runners = runner_pids(driver.pid)
    driver.kill()
    driver.communicate(timeout=60)
    wait_for(lambda: not any(alive(p) for p in runners), "the orphaned runners to die with their parent", 10)
    before, rows = check_rows(store, lambda i: 1)
    assert 6 <= len(before) < 40
    (store / "calls.log").unlink()
    # rerun with another multiple: a row kept from the first run still holds multiple=1
    out = run_cli(*train_args(40, "args.multiple=3"), cwd=tmp_path, check=True)
    assert f"train: {40 - len(before)} completed, 0 failed" in out.stdout
    after, _ = check_rows(store, lambda i: 1 if i in before else 3)
    assert after == set(range(40))
    assert np.array_equal(np.load(store / "values.npy")[sorted(before)], rows)
    assert not set(calls(store)) & before and sorted(calls(store)) == sorted(set(range(40)) - before)


def test_second_writer_is_refused_and_sigterm_stops_cleanly(store, tmp_path):
    first = start(tmp_path, *train_args(60, "args.sleep=0.5"))
    wait_for(lambda: len(calls(store)) >= 2, "the first driver to train")
    second = run_cli(*train_args(60), cwd=tmp_path, check=False)
    assert second.returncode == 2
    assert second.stderr == f"error: store st is in use by PID {first.pid} (train); wait for it to finish or stop it\n"
    worker = run_cli("worker", "store=st", "index=59", f"main={FAULTS}", cwd=tmp_path, check=False)
    assert worker.returncode == 2 and f"error: store st is in use by PID {first.pid} (train)" in worker.stderr
    runners = runner_pids(first.pid)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    assert "terminated (SIGTERM): completed models are kept; rerun the same command to resume" in out
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert not any(alive(p) for p in runners)
    done, _ = check_rows(store, lambda i: 1)
    assert 0 < len(done) < 60 and sorted(calls(store)) == sorted(set(calls(store)))  # no row trained twice
    assert f"train: {len(done)} completed, 0 failed, {60 - len(done)} not run" in out
    assert json.loads((store / "_failures.json").read_text()) == {}
    status = run_cli("status", "store=st", cwd=tmp_path, check=True).stdout
    assert f"completed: {len(done)}/64" in status and "failures of the last train: none" in status
    [parent] = search_runs(tmp_path, "tags.`datamodels.stage` = 'train'", training=True)
    assert parent.info.status == "KILLED"  # not left RUNNING
    children = search_runs(tmp_path, f"tags.mlflow.parentRunId = '{parent.info.run_id}'", training=True)
    assert sorted(int(c.data.params["index"]) for c in children) == sorted(done)  # flushed before exiting


def test_a_new_store_is_created_under_its_lock(tmp_path):
    # while another command creates the store (here: this test holding the creation lock), a
    # `train spec=` waits instead of writing the store's files under it, then trains into the store
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    (tmp_path / "new").mkdir()
    with creation_lock(tmp_path / "new", "test"):
        driver = start(tmp_path, "train", "store=new", "spec=spec.json", f"main={FAULTS}", "n=6", "jobs=1",
                       "progress=false")
        time.sleep(3)
        assert driver.poll() is None and sorted(p.name for p in (tmp_path / "new").iterdir()) == [".lock"]
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err
    assert f"waiting for PID {os.getpid()} (test) to release store new ..." in err
    assert "train: 6 completed, 0 failed" in out
    assert check_rows(tmp_path / "new", lambda i: 1)[0] == set(range(6))


def test_two_drivers_on_a_new_store_never_lose_flags(tmp_path):
    # started together with spec=: one creates the store and trains, the other trains too or is
    # refused; whoever says "6/6 complete" is right, as status and the rows show
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    for attempt in range(2):
        name = f"new{attempt}"
        args = ["train", f"store={name}", "spec=spec.json", f"main={FAULTS}", "n=6", "jobs=1", "progress=false"]
        drivers = [start(tmp_path, *args) for _ in range(2)]
        results = [(d.pid, d.returncode, *d.communicate(timeout=120)) for d in drivers]
        results = [(pid, d.returncode, out, err) for d, (pid, _, out, err) in zip(drivers, results)]
        ok = [r for r in results if r[1] == 0]
        assert ok, results
        for pid, rc, out, err in results:
            assert "Traceback" not in err, err
            if rc != 0:
                other = next(p for p, *_ in results if p != pid)
                assert rc == 2 and err.startswith(f"error: store {name} is in use by PID {other} "), err
        done, _ = check_rows(tmp_path / name, lambda i: 1)
        assert done == set(range(6)), results
        status = run_cli("status", f"store={name}", cwd=tmp_path, check=True).stdout
        assert "completed: 6/64" in status


# -- the tracking server goes away ------------------------------------------------------------------
def _completed(store):
    return int(np.load(store / "_completed.npy").sum())


def _start_logged(tmp_path, uri, *args, env=None):
    """A train driver whose stderr goes to a file the test reads while it runs."""
    err = open(tmp_path / "driver.err", "w+")
    env = {"MLFLOW_TRACKING_URI": uri, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "datamodels_ml", *train_args(*args)], cwd=tmp_path,
                            env=cli_env(tmp_path, env), stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, lambda: (tmp_path / "driver.err").read_text()


DOWN = "does not answer; training goes on, the store is unaffected"


def test_a_tracking_server_killed_mid_train_loses_nothing_and_gets_its_runs_when_back(store, tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        driver, err = _start_logged(tmp_path, server.uri, 64, "args.sleep=0.3",
                                    env={"DATAMODELS_TRACKING_WAIT": "180"})
        wait_for(lambda: _completed(store) >= 6, "six committed rows", 120)
        server.kill()
        wait_for(lambda: DOWN in err(), "the one-line warning", 120)
        at_warning = _completed(store)
        wait_for(lambda: _completed(store) >= min(64, at_warning + 6), "training to go on without the server", 60)
        server.start()
        out, _ = driver.communicate(timeout=300)
        stderr = err()
        assert driver.returncode == 0, stderr
        assert "Traceback" not in stderr and stderr.count(DOWN) == 1, stderr
        assert "MLflow: the tracking server is back" in stderr and "were not written" not in stderr
        assert "train: 64 completed, 0 failed" in out
        done, _ = check_rows(store, lambda i: 1)
        assert done == set(range(64)) and sorted(calls(store)) == list(range(64))  # none trained twice
        client = server.client()
        exp = client.get_experiment_by_name("datamodels-train").experiment_id
        [parent] = client.search_runs([exp], "tags.`datamodels.stage` = 'train'")
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
        assert sorted(int(c.data.params["index"]) for c in children) == list(range(64))  # each exactly once
        assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
        assert parent.data.metrics["progress"] == 1.0 and parent.data.metrics["completed"] == 64
    finally:
        server.kill()


def test_sigterm_stops_a_train_whose_tracking_server_is_gone_and_counts_the_runs_not_written(store, tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        driver, err = _start_logged(tmp_path, server.uri, 64, "args.sleep=0.3", env={"DATAMODELS_TRACKING_WAIT": "5"})
        wait_for(lambda: _completed(store) >= 4, "four committed rows", 120)
        server.kill()
        wait_for(lambda: DOWN in err(), "the one-line warning", 120)
        at_warning = _completed(store)
        wait_for(lambda: _completed(store) >= at_warning + 4, "training to go on without the server", 60)
        t0 = time.time()
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
        stopped_in, stderr = time.time() - t0, err()
        assert driver.returncode == 143, stderr
        assert stopped_in < 60, stopped_in  # the close waits 5 s for the server, MLflow's own retries ~7 s
        assert "Traceback" not in stderr and stderr.count(DOWN) == 1, stderr
        done, _ = check_rows(store, lambda i: 1)
        assert len(set(calls(store)) - done) <= 2  # only the models in flight when it stopped are lost
        assert f"train: {len(done)} completed, 0 failed" in out
        # the runs queued since the server went away are counted (all but those written before)
        lost = [line for line in stderr.splitlines() if "MLflow child runs of" in line]
        assert len(lost) == 1 and "were not written (the tracking server did not return); the store is " \
            "unaffected" in lost[0], stderr
        assert 0 < int(lost[0].split()[1]) <= len(done)
    finally:
        server.kill()


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:1", "error: the MLflow tracking server at http://127.0.0.1:1 does not answer: start it "
                           "(make server) or set MLFLOW_TRACKING_URI to a reachable server"),
    ("bogus://nowhere", "error: MLFLOW_TRACKING_URI=bogus://nowhere: MLflow has no tracking store for 'bogus://' "
                        "URIs; use http(s)://HOST:PORT"),
])
def test_a_tracking_uri_that_cannot_work_is_one_line_within_seconds(store, tmp_path, uri, message):
    t0 = time.time()
    out = run_cli(*train_args(8), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert time.time() - t0 < 60  # MLflow's own retries took 249 s
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert calls(store) == [] and _completed(store) == 0


def test_a_full_mlflow_database_is_one_line_and_training_goes_on(store, tmp_path, tmpfs):
    # mlflow.db on a tmpfs with room for a few runs: MLflow logs each failed commit with its
    # traceback (2096 of them were seen); the user gets one line with the count instead
    db = tmpfs("1200k")
    shutil.copyfile(_template_db(), db / "mlflow.db")
    out = run_cli(*train_args(64, jobs=1), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db / 'mlflow.db'}"},
                  check=True)
    assert "train: 64 completed, 0 failed" in out.stdout
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 4, out.stderr
    lost = [line for line in out.stderr.splitlines() if "MLflow child runs of" in line]
    assert len(lost) == 1 and "were not written (first error: MlflowException: (sqlite3.OperationalError) " \
        "database or disk is full)" in lost[0], out.stderr
    assert check_rows(store, lambda i: 1)[0] == set(range(64))


def test_sigterm_stops_a_worker_without_writing_its_row(store, tmp_path):
    worker = start(tmp_path, "worker", "store=st", "index=3", f"main={FAULTS}", "args.sleep=60")
    wait_for(lambda: calls(store) == [3], "the worker to train")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 143
    assert err == "terminated (SIGTERM): model 3 was not written\n"
    assert not np.load(store / "_completed.npy").any()
    [run] = search_runs(tmp_path, training=True)
    assert (run.info.run_name, run.info.status) == ("model-3", "KILLED")


def _mlflow_run(tmp_path, experiment):
    """A run as ``mlflow run`` makes it before starting the command (a random name, RUNNING)."""
    cli_env(tmp_path)  # the test's MLflow store
    client = tracking_client(tmp_path)
    made = client.create_run(client.create_experiment(experiment), run_name="suave-quail-866")
    return client, {"MLFLOW_RUN_ID": made.info.run_id, "MLFLOW_EXPERIMENT_ID": made.info.experiment_id}


def test_a_command_under_mlflow_run_that_fails_ends_its_run_failed_and_names_it(tmp_path):
    """The command ends the run itself: MLflow's wrapper may be gone (killed) or never look."""
    client, env = _mlflow_run(tmp_path, "datamodels")
    proc = run_cli("regress", "config=missing.yaml", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    run = client.get_run(env["MLFLOW_RUN_ID"])
    assert (run.info.run_name, run.info.status, run.data.tags["datamodels.stage"]) == ("regress", "FAILED", "regress")
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_sigterm_under_mlflow_run_ends_the_run_killed_with_its_name(store, tmp_path):
    client, env = _mlflow_run(tmp_path, "datamodels-train")
    worker = start(tmp_path, "worker", "store=st", "index=3", f"main={FAULTS}", "args.sleep=60", env=env)
    wait_for(lambda: calls(store) == [3], "the worker to train")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 143, err
    run = client.get_run(env["MLFLOW_RUN_ID"])
    assert (run.info.run_name, run.info.status) == ("model-3", "KILLED")


def test_runner_skips_a_complete_row_and_exits_quietly_when_its_parent_is_gone(store, tmp_path):
    done = np.load(store / "_completed.npy", mmap_mode="r+")
    done[2] = True  # completed by another writer, e.g. a tool that takes no lock
    done.flush()
    read_fd, write_fd = os.pipe()
    runner = subprocess.Popen([sys.executable, "-m", "datamodels_ml.training.runner_child", "--reply-fd", str(write_fd)],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,), cwd=tmp_path,
                              env=cli_env(tmp_path), text=True)
    os.close(write_fd)
    runner.stdin.write(json.dumps({"store": str(store), "main": FAULTS, "args": {}, "parent": os.getpid()}) + "\n2\n")
    runner.stdin.flush()
    with os.fdopen(read_fd) as reply:
        assert json.loads(reply.readline()) == {"ready": True}
        assert json.loads(reply.readline())["status"] == "skipped"
    runner.stdin.write("0\n")  # trained, but nobody is left to hear the reply
    runner.stdin.close()
    assert runner.wait(timeout=60) == 0
    assert runner.stderr.read() == ""
    assert calls(store) == [0]
    assert np.flatnonzero(np.load(store / "_completed.npy")).tolist() == [2]


def test_runners_that_keep_dying_stop_train_with_one_message(store, tmp_path):
    out = run_cli(*train_args(20, "args.die_from=5", jobs=1), cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert "train: 5 completed, 3 failed, 12 not run (5/20 complete in st)" in out.stdout
    sigbus = "killed by SIGBUS (signal 7) (SIGBUS: is the disk that holds the store full?)"
    assert out.stderr == (f"error: train stopped: the runner of slot 0 died 3 times in a row without completing a "
                          f"model (index 5: {sigbus}; index 6: {sigbus}; index 7: {sigbus}); those indices stay "
                          "incomplete, rerun the same command to retry them once the cause is fixed\n")
    assert check_rows(store, lambda i: 1)[0] == set(range(5))


def test_nan_results_are_counted_and_files_honour_the_umask(store, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "datamodels_ml", *train_args(6, "args.nan=1-4", jobs=1)],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300, umask=0o027)
    assert proc.returncode == 0, proc.stderr
    assert ("warning: 2 models returned NaN/inf (loss: 2); they are stored as complete, "
            "and write_dataset drops such rows") in proc.stdout
    assert np.isnan(np.load(store / "loss.npy")[[1, 4]]).all()
    children = {int(r.data.params["index"]): r for r in search_runs(tmp_path, training=True)
                if "mlflow.parentRunId" in r.data.tags}
    assert {i for i, r in children.items() if r.data.tags.get("nonfinite") == "loss"} == {1, 4}
    out = run_cli("worker", "store=st", "index=9", f"main={FAULTS}", "args.nan=9", cwd=tmp_path, check=True)
    assert "warning: model 9 returned NaN/inf in loss (stored; write_dataset drops such rows)" in out.stdout
    for file in (store / "workers" / "1" / "output.log", store / "_failures.json"):
        assert file.stat().st_mode & 0o777 == 0o640, file


def test_store_lock_refuses_a_second_holder(tmp_path):
    with store_lock(tmp_path, "train"):
        with pytest.raises(UserError, match=rf"^store {tmp_path} is in use by PID {os.getpid()} \(train\); "
                                            "wait for it to finish or stop it$"):
            with store_lock(tmp_path, "init force=true"):
                pass
        with pytest.raises(UserError, match=r"in use by PID \d+ \(train\)"):
            with store_lock(tmp_path, "worker", shared=True):
                pass
    with store_lock(tmp_path, "worker", shared=True), store_lock(tmp_path, "worker", shared=True):
        with row_lock(tmp_path, 3, "worker index=3"), row_lock(tmp_path, 4, "worker index=4"):
            with pytest.raises(UserError, match=rf"^model 3 of store {tmp_path} is in use by PID \d+ \(worker index=3\)"):
                with row_lock(tmp_path, 3, "worker index=3"):
                    pass
    with store_lock(tmp_path, "init force=true"):  # every lock is released on leaving its block
        pass


def test_read_only_store_is_refused_with_one_line(store, tmp_path):
    command = [sys.executable, "-m", "datamodels_ml", *train_args(4)]
    if os.geteuid() == 0:  # root writes through permissions: mount the store read-only in a private namespace
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare for a read-only mount")
        script = f'mount --bind st st && mount -o remount,bind,ro st && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, "sh", *command]
        why = "Read-only file system"
    else:
        store.chmod(0o555)
        why = "Permission denied"
    try:
        out = subprocess.run(command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        store.chmod(0o755)
    if "unshare" in command[0] and out.returncode != 2 and "error: store" not in out.stderr:
        pytest.skip(f"cannot mount here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 2
    assert out.stderr == f"error: store st is not writable ({why}: st)\n"

"""Per-model overhead of `train` on a local two-worker Dask cluster next to the local slots, in one run,
and the absorb rate of the driver (models per second it can write rows and child runs for).

1. local slots: `train jobs=2` (two runner processes);
2. Dask: a `dask scheduler` and two `dask worker` processes (one thread each) on 127.0.0.1, then
   `train scheduler=tcp://...`: each model is a task whose outputs travel back to the driver; then
   a second train (another store) on the same, now warm, workers: main is imported already;
3. absorb: in this process, the driver's own work per model without any training: validate and write
   the row (`Store.write_data`), group commits, one MLflow child run (SQLite) per model, queued to the
   background writer; measured for the driver alone and until every child run is written, through
   the SQLite fast path and through MLflow's public API (`--absorb-only`: this part alone).

Both trains use the no-op main (benchmarks/noop_main.py, digits spec: 1000 masks + 797 margins per
model) and a fresh MLflow SQLite store each; wall times include start-up (imports of torch and ffcv in
every slot or worker). The steady state is the spread of the child runs' end times.

    python benchmarks/bench_dask.py [--n 1000] [--absorb-n 3000] [--absorb-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import MAIN, ROOT, SPEC, child_runs, cli, env_for  # noqa: E402


def start_dask(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    env = env_for(folder)
    file = folder / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(file)], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 60
    while not (file.exists() and "address" in file.read_text()):
        if time.time() > deadline:
            raise RuntimeError("the Dask scheduler did not start")
        time.sleep(0.1)
    address = json.loads(file.read_text())["address"]
    for name in ("w0", "w1"):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                                       "--nworkers", "1", "--nthreads", "1", "--no-dashboard"], cwd=folder, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    return address, procs


def time_train(folder: Path, n: int, *extra: str) -> tuple[float, int, float]:
    folder.mkdir()
    cli(folder, "init", f"spec={SPEC}", "store=st")
    cli(folder, "worker", "store=st", "index=2999", f"main={MAIN}")  # creates the MLflow database, untimed
    t0 = time.perf_counter()
    cli(folder, "train", "store=st", f"main={MAIN}", f"n={n}", "progress=false", *extra)
    return (time.perf_counter() - t0, *child_runs(folder))


def absorb_rate(folder: Path, n: int, public_api: bool = False) -> tuple[float, float]:
    """Models per second the driver records: rows written and committed, child runs queued (the
    driver's own rate: it never waits on MLflow) and, second, until every child run is in MLflow
    (through MLflow's public API, create_run + log_batch + set_terminated per model, with
    ``public_api``; else the SQLite fast path)."""
    folder.mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["DATAMODELS_CHILD_RUNS"] = "api" if public_api else "auto"
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.tracking.child_runs import ChildRunWriter
    from datamodels_ml.training.train import _Recorder
    from datamodels_ml.store.spec import load_spec
    from datamodels_ml.store.store import create_store
    from datamodels_ml.training.run_model import ModelResult, scalar_outputs

    class NoBar:
        def update(self, *_):
            pass

        def set_postfix(self, **_):
            pass

        def close(self):
            pass

    store = create_store(folder / "st", load_spec(SPEC))
    outputs = {"masks": np.zeros(1000, dtype=bool), "margins": np.ones(797, dtype=np.float32), "accuracy": np.float32(1)}
    with tracking.run("absorb") as parent:
        t0 = time.perf_counter()
        children = ChildRunWriter(parent.info.run_id)
        assert children.mode == ("api" if public_api else "sql"), children.mode
        rec = _Recorder(store, children, NoBar(), n)
        for i in range(n):
            rows = store.write_data(i, outputs)
            rec.add(ModelResult(i, "completed", 0.001, scalars=scalar_outputs(store, rows)))
        rec.commit()
        driver = time.perf_counter() - t0
        rec.close()  # the last commit and every child run written
        elapsed = time.perf_counter() - t0
        assert children.written == n, (children.written, children.errors)
    assert int(store.completed.sum()) == n
    return n / driver, n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="models per train")
    parser.add_argument("--absorb-n", type=int, default=3000, help="models for the driver's absorb rate")
    parser.add_argument("--absorb-only", action="store_true", help="only the absorb rates (no training)")
    opts = parser.parse_args()
    from _common import machine_report

    machine_report()
    if opts.absorb_only:
        with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
            print_absorb(Path(tmp), opts.absorb_n)
        return
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        tmp = Path(tmp)
        local_s, local_children, local_steady = time_train(tmp / "local", opts.n, "jobs=2")
        (tmp / "cluster").mkdir()
        address, procs = start_dask(tmp / "cluster")
        try:
            dask_s, dask_children, dask_steady = time_train(tmp / "dask", opts.n, f"scheduler={address}")
            # the same workers again: main is imported already (a long-lived cluster)
            warm_s, warm_children, warm_steady = time_train(tmp / "dask-warm", opts.n, f"scheduler={address}")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait()
    local_ms, dask_ms = local_s / opts.n * 1000, dask_s / opts.n * 1000
    print(f"no-op main, digits spec, n={opts.n} (wall time includes start-up; steady = spread of child-run end times)")
    print(f"  local slots, jobs=2:          {local_s:6.1f} s wall = {local_ms:5.1f} ms/model, steady {local_steady:5.2f} ms/model, "
          f"{local_children} child runs")
    print(f"  Dask, 2 workers x 1 thread:   {dask_s:6.1f} s wall = {dask_ms:5.1f} ms/model, steady {dask_steady:5.2f} ms/model, "
          f"{dask_children} child runs")
    print(f"  Dask again, workers warm:     {warm_s:6.1f} s wall = {warm_s / opts.n * 1000:5.1f} ms/model, steady "
          f"{warm_steady:5.2f} ms/model, {warm_children} child runs")
    verdict = "met" if dask_ms <= max(2 * local_ms, 20.0) else "NOT met"
    print(f"  ratio Dask / local = {dask_ms / local_ms:.2f}x (target: within 2x or under 20 ms/model: {verdict})")
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        print_absorb(Path(tmp), opts.absorb_n)


def print_absorb(tmp: Path, n: int) -> None:
    fast, fast_all = absorb_rate(tmp / "absorb", n)
    api_n = min(n, 1000)
    api, api_all = absorb_rate(tmp / "absorb-api", api_n, public_api=True)
    print("driver absorb rate (write_data + group commit + one queued child run per model), SQLite tracking:")
    print(f"  fast path (ORM batches), n={n}: driver {fast:,.0f} models/s, all child runs written {fast_all:,.0f} models/s "
          f"= {1000 / fast_all:.2f} ms/model")
    print(f"  MLflow's public API, n={api_n}: driver {api:,.0f} models/s, all child runs written {api_all:,.0f} models/s "
          f"= {1000 / api_all:.2f} ms/model")

if __name__ == "__main__":
    main()

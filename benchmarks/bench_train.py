"""Per-model overhead of `train` against the one-process-per-model design, measured in one run.

`train` keeps one runner process per slot (imports paid once) and logs child runs in batches.
The baseline is the original design: one `python -m datamodels_ml worker ...` process per model,
each importing torch, ffcv and mlflow and creating its own MLflow run, two at a time (2 cores).
Both use the same no-op main (benchmarks/noop_main.py) and the digits spec, with a fresh MLflow
SQLite store each. The baseline is timed on a sample of models (it costs seconds per model).

    python benchmarks/bench_train.py [--n 1000] [--baseline-n 16] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "benchmarks" / "noop_main.py")
SPEC = str(ROOT / "configs" / "digits_spec.json")


def env_for(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("MLFLOW_RUN_ID", None)
    return env


def cli(folder: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "datamodels_ml", *args], cwd=folder, env=env_for(folder), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def child_runs(folder: Path) -> tuple[int, float]:
    """(number of child runs, steady-state ms per model from the spread of their end times)."""
    import sqlite3

    con = sqlite3.connect(folder / "mlflow.db")
    try:
        n, first, last = con.execute(
            "select count(*), min(r.end_time), max(r.end_time) from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'mlflow.parentRunId'").fetchone()
    finally:
        con.close()
    return n, (last - first) / max(1, n - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="models for train")
    parser.add_argument("--baseline-n", type=int, default=16, help="models for the one-process-per-model baseline")
    parser.add_argument("--jobs", type=int, default=2, help="parallel slots / processes in both designs")
    opts = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_report

    machine_report()

    def time_train(folder: Path, n: int) -> tuple[float, int, float]:
        folder.mkdir()
        cli(folder, "init", f"spec={SPEC}", "store=st")
        # the first MLflow call creates the database: paid outside the timing in both designs
        cli(folder, "worker", "store=st", "index=2999", f"main={MAIN}")
        t0 = time.perf_counter()
        cli(folder, "train", "store=st", f"main={MAIN}", f"n={n}", f"jobs={opts.jobs}", "progress=false")
        return (time.perf_counter() - t0, *child_runs(folder))

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        # one train command; wall time includes start-up, the parent run and every child run
        fan_s, children, steady_ms = time_train(tmp / "fanout", opts.n)

        base = tmp / "baseline"
        base.mkdir()
        cli(base, "init", f"spec={SPEC}", "store=st")
        cli(base, "worker", "store=st", "index=2999", f"main={MAIN}")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(opts.jobs) as pool:
            list(pool.map(lambda i: cli(base, "worker", "store=st", f"index={i}", f"main={MAIN}"),
                          range(opts.baseline_n)))
        base_s = time.perf_counter() - t0

    fan_ms = fan_s / opts.n * 1000
    base_ms = base_s / opts.baseline_n * 1000
    print(f"train, no-op main, n={opts.n}, {opts.jobs} slots: {fan_s:.1f} s wall = {fan_ms:.1f} ms per model, "
          f"start-up and {children} MLflow child runs included")
    print(f"  steady state (spread of the child runs' end times): {steady_ms:.2f} ms per model; "
          f"the rest, ~{fan_s - steady_ms * opts.n / 1000:.1f} s, is start-up paid once (imports in the parent and each slot)")
    print(f"baseline, one process per model (python -m datamodels_ml worker), {opts.jobs} at a time, "
          f"{opts.baseline_n} models: {base_s:.1f} s wall = {base_ms:.0f} ms per model")
    print(f"ratio: baseline / train = {base_ms / fan_ms:.0f}x less overhead per model at n={opts.n} "
          f"(target <= 20 ms per model: {'met' if fan_ms <= 20 else 'NOT met'})")

if __name__ == "__main__":
    main()

"""``train``: run every incomplete index of a store over GPU or CPU slots with joblib.

Design. A slot is a thread (joblib's threading backend) that supervises one long-lived runner
process (``datamodels_ml.runner``) started with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPU (or
to nothing on CPU slots). The runner imports main, torch and friends once and then trains index
after index, so a model costs only its own work plus a pipe round trip, not a Python start-up.
If main hangs past the timeout or kills its process, the slot records the failure, starts a fresh
runner and goes on. The parent logs one MLflow child run per model, in batches (``tracking``),
after the runner has written the row to the store.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.config import MISSING
from datamodels_ml.errors import UserError
from datamodels_ml.spec import load_spec
from datamodels_ml.store import SPEC_FILE, Store, compress_ranges, create_store
from datamodels_ml.worker import ModelResult


@dataclass
class TrainConfig:
    store: str = field(default=MISSING, metadata={"help": "store directory (created from spec when absent)"})
    main: str = field(default=MISSING, metadata={"help": "dotted module or .py file with main(*, index, logdir, ...)"})
    n: int = field(default=MISSING, metadata={"help": "train indices 0..n-1 (those not complete yet)"})
    spec: str = field(default="", metadata={"help": "spec JSON to create the store from when it does not exist"})
    gpus: int = field(default=0, metadata={"help": "number of GPUs; each slot sees one through CUDA_VISIBLE_DEVICES"})
    jobs: int = field(default=0, metadata={"help": "number of slots (0: one per GPU, or one per CPU core without GPUs)"})
    timeout: float = field(default=0.0, metadata={"help": "per-model timeout in seconds (0: none)"})
    args: dict[str, Any] = field(default_factory=dict, metadata={"help": "args.NAME=VALUE reach main as keyword arguments"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def slot_environments(gpus: int, jobs: int) -> list[dict[str, str]]:
    """Environment overrides per slot: slot s sees GPU s mod G only, or no GPU on CPU slots."""
    if gpus < 0 or jobs < 0:
        raise UserError("gpus and jobs must be non-negative")
    if gpus == 0:
        n_slots = jobs or (os.cpu_count() or 1)
        return [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(n_slots)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # "" hides every GPU; unset shows them all
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else [str(i) for i in range(gpus)]
    if len(ids) < gpus:
        raise UserError(f"gpus={gpus} but CUDA_VISIBLE_DEVICES lists only {len(ids)} devices ({visible})")
    n_slots = jobs or gpus
    return [{"CUDA_VISIBLE_DEVICES": ids[s % gpus]} for s in range(n_slots)]


class _Runner:
    """One runner process and its pipes."""

    def __init__(self, job: dict[str, Any], env: dict[str, str]):
        read_fd, write_fd = os.pipe()
        full_env = dict(os.environ)
        full_env.update(env)
        root = str(Path(__file__).resolve().parent.parent)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), root, full_env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datamodels_ml.runner", "--reply-fd", str(write_fd), "--job", json.dumps(job)],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), env=full_env, text=True, start_new_session=True,
        )
        os.close(write_fd)
        self.reply = os.fdopen(read_fd, "r")

    TIMEOUT = "timeout"
    DEAD = "dead"

    def read(self, timeout: float | None) -> dict | str:
        """The next reply; ``TIMEOUT`` if none came in time, ``DEAD`` if the runner exited."""
        ready, _, _ = select.select([self.reply], [], [], timeout)
        if not ready:
            return self.TIMEOUT
        line = self.reply.readline()
        return json.loads(line) if line else self.DEAD

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def send(self, index: int) -> bool:
        try:
            self.proc.stdin.write(f"{index}\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return True
        except (BrokenPipeError, OSError):
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        self.proc.wait()
        self.reply.close()


class Fanout:
    """Runs indices on slots; results arrive on ``self.results``."""

    def __init__(self, job: dict[str, Any], envs: list[dict[str, str]], todo: list[int], timeout: float | None):
        self.job = job
        self.envs = envs
        self.timeout = timeout
        self.todo: queue.Queue[int] = queue.Queue()
        for i in todo:
            self.todo.put(i)
        self.results: queue.Queue[ModelResult | tuple[str, str]] = queue.Queue()
        self.stop = threading.Event()
        self.fatal: str | None = None
        self._runners: set[_Runner] = set()
        self._lock = threading.Lock()

    def _start(self, slot: int) -> _Runner | None:
        runner = _Runner(self.job, self.envs[slot])
        with self._lock:
            self._runners.add(runner)
        first = runner.read(timeout=600)
        if not isinstance(first, dict) or "fatal" in first:
            self.fatal = (first.get("fatal") if isinstance(first, dict) else None) or (
                f"slot {slot}: the runner process exited during start-up (exit code {runner.exit_code()})"
                if first == _Runner.DEAD else f"slot {slot}: the runner process did not start within 600 s")
            self.stop.set()
            self._close(runner, kill=True)
            return None
        return runner

    def _close(self, runner: _Runner, kill: bool) -> None:
        with self._lock:
            self._runners.discard(runner)
        runner.stop(kill=kill)

    def slot(self, slot: int) -> None:
        """Pull indices until none are left (one joblib task per slot)."""
        runner = None
        while not self.stop.is_set():
            try:
                index = self.todo.get_nowait()
            except queue.Empty:
                break
            if runner is None:
                runner = self._start(slot)
                if runner is None:
                    self.todo.put(index)
                    return
            start = time.perf_counter()
            hard = None if not self.timeout else self.timeout + 30.0
            reply = runner.read(timeout=hard) if runner.send(index) else _Runner.DEAD
            if not isinstance(reply, dict):  # hung past the timeout, or the process died
                if self.stop.is_set():
                    self.todo.put(index)
                    break
                why = (f"timed out after {self.timeout:g} s (process killed)" if reply == _Runner.TIMEOUT
                       else f"the worker process died with exit code {runner.exit_code()} while training this model")
                self._close(runner, kill=True)
                runner = None
                self.results.put(ModelResult(index, "failed", time.perf_counter() - start, error=why))
                continue
            self.results.put(ModelResult(**reply))
        if runner is not None:
            self._close(runner, kill=self.stop.is_set())

    def run(self) -> None:
        from joblib import Parallel, delayed

        try:
            Parallel(n_jobs=len(self.envs), backend="threading")(delayed(self.slot)(s) for s in range(len(self.envs)))
        finally:
            self.results.put(("done", ""))

    def kill_all(self) -> None:
        self.stop.set()
        with self._lock:
            runners = list(self._runners)
        for r in runners:
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    r.proc.kill()


class _Recorder:
    """Turns results into records: group commits of written rows, the progress bar, child runs.

    A runner reports "completed" once its row is written; the row only counts (flag set, child run
    FINISHED) after ``commit`` has synced it, at most ``COMMIT_EVERY`` seconds later.
    """

    COMMIT_EVERY = 0.25

    def __init__(self, store: Store, children: Any, bar: Any, total: int):
        self.store, self.children, self.bar, self.total = store, children, bar, total
        self.pending: list[tuple[ModelResult, int]] = []
        self.failures: dict[int, str] = {}
        self.completed = 0
        self._last_commit = time.monotonic()
        self._last_metric = 0.0

    def add(self, result: ModelResult) -> None:
        now = int(time.time() * 1000)
        if result.status == "completed":
            self.pending.append((result, now))
        else:
            self.failures[result.index] = result.error
            self._record(result, now, ok=False)
        # slow models are committed at once; fast ones in batches of at most COMMIT_EVERY seconds
        if result.duration > self.COMMIT_EVERY or time.monotonic() - self._last_commit > self.COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        self._last_commit = time.monotonic()
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.store.commit([r.index for r, _ in batch])
        for result, now in batch:
            self.completed += 1
            self._record(result, now, ok=True)

    def _record(self, result: ModelResult, now: int, *, ok: bool) -> None:
        from datamodels_ml import tracking

        tags = {"error": result.error[-7000:]} if result.error else {}
        metrics = {"duration": result.duration, **result.scalars}
        self.children.add(tracking.ChildRecord(result.index, "FINISHED" if ok else "FAILED",
                                               now - int(result.duration * 1000), now, metrics, tags))
        self.bar.update(1)
        self.bar.set_postfix(completed=self.completed, failed=len(self.failures), refresh=False)
        if time.monotonic() - self._last_metric > 2.0:
            self._last_metric = time.monotonic()
            self._log_progress()

    def _log_progress(self) -> None:
        from datamodels_ml import tracking

        done = self.completed + len(self.failures)
        tracking.log_metrics({"progress": done / self.total, "completed": self.completed,
                              "failed": len(self.failures)}, step=done)

    def close(self) -> None:
        """Commit what is written, write the failures file, flush the child runs."""
        try:
            self.commit()
        finally:
            self.bar.close()
            self.children.close()
            self.store.write_failures(self.failures)
            self._log_progress()


def _drain(fan: "Fanout", rec: _Recorder) -> None:
    """After Ctrl-C: keep the results that arrived (rows already written) so they get committed."""
    while True:
        try:
            item = fan.results.get_nowait()
        except queue.Empty:
            return
        if not isinstance(item, tuple) and item.status == "completed":
            rec.add(item)


def _open_store(cfg: TrainConfig) -> Store:
    exists = os.path.isfile(os.path.join(cfg.store, SPEC_FILE))
    if cfg.spec:
        return create_store(cfg.store, load_spec(cfg.spec))  # a no-op for the same spec
    if not exists:
        raise UserError(f"no store at {cfg.store}: give spec=PATH to create it")
    return Store(cfg.store)


def train(cfg: TrainConfig) -> int:
    """Create the store if needed, run the incomplete indices below n, record everything in MLflow."""
    if cfg.n <= 0:
        raise UserError(f"n must be a positive number of models, got {cfg.n}")
    if cfg.timeout < 0:
        raise UserError("timeout must be >= 0 seconds")
    envs = slot_environments(cfg.gpus, cfg.jobs)
    store = _open_store(cfg)
    if cfg.n > store.num_models:
        raise UserError(f"n={cfg.n} but the store at {store.path} holds only {store.num_models} models (num_models in its spec)")
    done = store.completed[: cfg.n]
    todo = [int(i) for i in np.flatnonzero(~done)]
    if not todo:
        print(f"all {cfg.n} models are already complete in {store.path}: nothing to do")
        return 0
    envs = envs[: len(todo)]

    from tqdm import tqdm

    from datamodels_ml import tracking

    job = {"store": str(store.path), "main": cfg.main, "args": dict(cfg.args), "timeout": cfg.timeout or None}
    params = {"n": cfg.n, "gpus": cfg.gpus, "jobs": len(envs), "main": cfg.main, "store": cfg.store}
    params.update({f"args.{k}": v for k, v in cfg.args.items()})
    print(f"training {len(todo)} models ({int(done.sum())} of {cfg.n} already complete) on "
          f"{len(envs)} {'GPU' if cfg.gpus else 'CPU'} slot{'s' if len(envs) > 1 else ''}", flush=True)
    with tracking.run("train", params=params) as parent:
        tracking.log_artifact(store.path / SPEC_FILE)
        bar = tqdm(total=len(todo), unit="model", disable=not cfg.progress, dynamic_ncols=True)
        rec = _Recorder(store, tracking.ChildRunWriter(parent.info.run_id), bar, len(todo))
        fan = Fanout(job, envs, todo, cfg.timeout or None)
        thread = threading.Thread(target=fan.run, name="fanout", daemon=True)
        interrupted = False
        try:
            thread.start()
            while True:
                try:
                    item = fan.results.get(timeout=_Recorder.COMMIT_EVERY)
                except queue.Empty:
                    rec.commit()
                    continue
                if isinstance(item, tuple):
                    break
                rec.add(item)
            thread.join()
        except KeyboardInterrupt:
            interrupted = True
            fan.kill_all()
            thread.join(timeout=30)
            _drain(fan, rec)
        finally:
            rec.close()
        completed, failures = rec.completed, rec.failures
        if fan.fatal:
            raise UserError(f"cannot start the workers: {fan.fatal}")
        remaining = len(todo) - completed - len(failures)
        print(f"train: {completed} completed, {len(failures)} failed, {remaining} not run "
              f"({int(store.completed[: cfg.n].sum())}/{cfg.n} complete in {store.path})")
        if failures:
            print(f"failed indices: {compress_ranges(np.array(sorted(failures)))}")
            first = sorted(failures)[0]
            last = failures[first].strip().splitlines()[-1] if failures[first].strip() else "failed"
            print(f"first failure ({first}): {last}\n(see `status store={cfg.store}`; "
                  f"rerun the same command to retry only the incomplete models)")
        if interrupted:
            print("interrupted: completed models are kept; rerun the same command to resume")
            raise KeyboardInterrupt
        if failures:
            raise SystemExit(1)
    return 0

"""``train``: run every incomplete index of a store over GPU or CPU slots with joblib.

Design. A slot is a thread (joblib's threading backend) that supervises one long-lived runner
process (``datamodels_ml.runner``) started with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPU (or
to nothing on CPU slots). The runner imports main, torch and friends once and then trains index
after index, so a model costs only its own work plus a pipe round trip, not a Python start-up.
If main hangs past the timeout (the slot kills the runner's process group: ``runner_process``) or
kills its process, the slot records the failure, starts a fresh runner and goes on; a slot whose
runner keeps dying stops the run with one message. The parent logs one MLflow child run per model, in batches (``tracking``),
after the runner has written the row to the store.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodels_ml.config import MISSING
from datamodels_ml.errors import UserError
from datamodels_ml.interrupts import Terminated, terminate_as_interrupt
from datamodels_ml.lock import store_lock
from datamodels_ml.runner_process import RunnerProcess
from datamodels_ml.spec import load_spec
from datamodels_ml.store import SPEC_FILE, Store, compress_ranges, create_store
from datamodels_ml.store_layout import is_store
from datamodels_ml.worker import ModelResult


@dataclass
class TrainConfig:
    SCRIPT_ARGV = "argv"  # the CLI appends the script's own options (--section.key=value) to this key

    store: str = field(default=MISSING, metadata={"help": "store directory (created from spec when absent)"})
    main: str = field(default=MISSING, metadata={"help": "dotted module or .py file with main(*, index, logdir, ...)"})
    n: int = field(default=MISSING, metadata={"help": "train indices 0..n-1 (those not complete yet)"})
    spec: str = field(default="", metadata={"help": "spec JSON to create the store from when it does not exist"})
    gpus: int = field(default=0, metadata={"help": "number of GPUs; each slot sees one through CUDA_VISIBLE_DEVICES"})
    jobs: int = field(default=0, metadata={"help": "number of slots (0: one per GPU, or one per CPU core without GPUs)"})
    timeout: float = field(default=0.0, metadata={"help": "per-model timeout in seconds (0: none)"})
    args: dict[str, Any] = field(default_factory=dict, metadata={"help": "args.NAME=VALUE reach main as keyword arguments"})
    argv: list[str] = field(default_factory=list, metadata={
        "help": "the script's sys.argv after its name, e.g. '[--training.lr=0.5]' (for scripts that read options)"})
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


class Fanout:
    """Runs indices on slots; results arrive on ``self.results``.

    A slot whose runner dies ``MAX_DEATHS_IN_ROW`` times in a row without completing a model (a
    full disk under the store's memmaps kills every writer with SIGBUS; a broken GPU kills its slot)
    stops the whole run: ``self.deaths`` then says which indices were burned and how each runner died.
    """

    MAX_DEATHS_IN_ROW = 3

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
        self.deaths: str | None = None
        self._runners: set[RunnerProcess] = set()
        self._lock = threading.Lock()

    def _name(self, slot: int) -> str:
        gpu = self.envs[slot].get("CUDA_VISIBLE_DEVICES")
        return f"slot {slot}" + (f" (GPU {gpu})" if gpu else "")

    def _start(self, slot: int) -> RunnerProcess | None:
        runner = RunnerProcess(self.job, self.envs[slot])
        with self._lock:
            self._runners.add(runner)
        fatal = runner.wait_ready()
        if fatal is not None:
            if not self.stop.is_set():  # not a runner that kill_all stopped while it started
                self.fatal = fatal if not fatal.startswith("the runner process") else f"{self._name(slot)}: {fatal}"
                self.stop.set()
            self._close(runner, kill=True)
            return None
        return runner

    def _close(self, runner: RunnerProcess, kill: bool) -> None:
        with self._lock:
            self._runners.discard(runner)
        runner.stop(kill=kill)

    def slot(self, slot: int) -> None:
        """Pull indices until none are left (one joblib task per slot)."""
        runner = None
        burned: list[tuple[int, str]] = []  # deaths since this slot last completed a model
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
            result, outcome = runner.train(index, self.timeout)
            death = runner.death
            if outcome != RunnerProcess.OK:  # timed out (killed already) or died: a fresh runner next
                self._close(runner, kill=True)
                runner = None
                if self.stop.is_set():  # killed by kill_all: not the model's fault
                    self.todo.put(index)
                    break
            self.results.put(result)
            if result.status == "completed":
                burned.clear()
            elif outcome == RunnerProcess.DEAD:
                burned.append((index, death))
                if len(burned) >= self.MAX_DEATHS_IN_ROW:
                    self._stop_after_deaths(slot, burned)
                    break
        if runner is not None:
            self._close(runner, kill=self.stop.is_set())

    def _stop_after_deaths(self, slot: int, burned: list[tuple[int, str]]) -> None:
        with self._lock:
            if self.deaths is None:
                deaths = "; ".join(f"index {i}: {why}" for i, why in burned)
                self.deaths = (f"train stopped: the runner of {self._name(slot)} died {len(burned)} times in a row "
                               f"without completing a model ({deaths}); those indices stay incomplete, "
                               "rerun the same command to retry them once the cause is fixed")
        self.stop.set()

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
            r.kill()


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
        self.skipped = 0  # found complete (another writer) when their turn came
        self.nonfinite: dict[str, int] = {}  # key -> models whose row holds NaN/inf there
        self.nonfinite_models = 0
        self._last_commit = time.monotonic()
        self._last_metric = 0.0

    def add(self, result: ModelResult) -> None:
        now = int(time.time() * 1000)
        if result.status == "completed":
            self.pending.append((result, now))
            if result.nonfinite:
                self.nonfinite_models += 1
                for key in result.nonfinite:
                    self.nonfinite[key] = self.nonfinite.get(key, 0) + 1
        elif result.status == "skipped":
            self.skipped += 1
            self.bar.update(1)
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
        if result.nonfinite:
            tags["nonfinite"] = ",".join(result.nonfinite)  # keys holding NaN/inf, visible in the UI
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
    exists = is_store(cfg.store)  # ours (spec.json) or the original layout (.npy headers only)
    if cfg.spec:
        return create_store(cfg.store, load_spec(cfg.spec))  # a no-op for the same spec
    if not exists:
        raise UserError(f"no store at {cfg.store}: give spec=PATH to create it")
    return Store(cfg.store)


def train(cfg: TrainConfig) -> int:
    """Create the store if needed, run the incomplete indices below n, record everything in MLflow.

    The store stays locked for the whole run (``lock``): a second ``train`` or a ``worker`` on it is
    refused at once. SIGTERM stops it as Ctrl-C does (``interrupts``), then it exits 143.
    """
    if cfg.n <= 0:
        raise UserError(f"n must be a positive number of models, got {cfg.n}")
    if cfg.timeout < 0:
        raise UserError("timeout must be >= 0 seconds")
    envs = slot_environments(cfg.gpus, cfg.jobs)
    store = _open_store(cfg)
    if cfg.n > store.num_models:
        raise UserError(f"n={cfg.n} but the store at {store.path} holds only {store.num_models} models (num_models in its spec)")
    with terminate_as_interrupt(), store_lock(store.path, "train"):
        store.reserve_space()  # a store made sparse (by the original tools, or before 0.2) gets its blocks now
        return _train(cfg, store, envs)


def _train(cfg: TrainConfig, store: Store, envs: list[dict[str, str]]) -> int:
    done = store.completed[: cfg.n]
    todo = [int(i) for i in np.flatnonzero(~done)]
    if not todo:
        print(f"all {cfg.n} models are already complete in {store.path}: nothing to do")
        return 0
    envs = envs[: len(todo)]

    from tqdm import tqdm

    from datamodels_ml import tracking

    job = {"store": str(store.path), "main": cfg.main, "args": dict(cfg.args), "argv": list(cfg.argv)}
    params = {"n": cfg.n, "gpus": cfg.gpus, "jobs": len(envs), "main": cfg.main, "store": cfg.store}
    params.update({f"args.{k}": v for k, v in cfg.args.items()})
    if cfg.argv:
        params["argv"] = " ".join(cfg.argv)
    print(f"training {len(todo)} models ({int(done.sum())} of {cfg.n} already complete) on "
          f"{len(envs)} {'GPU' if cfg.gpus else 'CPU'} slot{'s' if len(envs) > 1 else ''}", flush=True)
    with tracking.run("train", params=params) as parent:
        tracking.log_dict(store.spec.to_json(), SPEC_FILE)
        bar = tqdm(total=len(todo), unit="model", disable=not cfg.progress, dynamic_ncols=True)
        rec = _Recorder(store, tracking.ChildRunWriter(parent.info.run_id), bar, len(todo))
        fan = Fanout(job, envs, todo, cfg.timeout or None)
        thread = threading.Thread(target=fan.run, name="fanout", daemon=True)
        interrupted: KeyboardInterrupt | None = None
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
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            interrupted = exc
            fan.kill_all()
            thread.join(timeout=30)
            _drain(fan, rec)
        finally:
            rec.close()
        if fan.fatal:
            raise UserError(f"cannot start the workers: {fan.fatal}")
        _summary(cfg, store, rec, len(todo))
        if fan.deaths:
            raise UserError(fan.deaths)
        if interrupted is not None:
            what = "terminated (SIGTERM)" if isinstance(interrupted, Terminated) else "interrupted"
            print(f"{what}: completed models are kept; rerun the same command to resume", flush=True)
            raise interrupted
        if rec.failures:
            raise SystemExit(1)
    return 0


def _summary(cfg: TrainConfig, store: Store, rec: _Recorder, total: int) -> None:
    completed, failures = rec.completed, rec.failures
    remaining = total - completed - len(failures) - rec.skipped
    print(f"train: {completed} completed, {len(failures)} failed, {remaining} not run "
          f"({int(store.completed[: cfg.n].sum())}/{cfg.n} complete in {store.path})")
    if rec.skipped:
        print(f"{rec.skipped} models were already complete when their turn came (written by another process): skipped")
    if rec.nonfinite_models:
        keys = ", ".join(f"{k}: {c}" for k, c in sorted(rec.nonfinite.items()))
        print(f"warning: {rec.nonfinite_models} models returned NaN/inf ({keys}); they are stored as complete, "
              "and write_dataset drops such rows")
    if failures:
        print(f"failed indices: {compress_ranges(np.array(sorted(failures)))}")
        first = sorted(failures)[0]
        last = failures[first].strip().splitlines()[-1] if failures[first].strip() else "failed"
        print(f"first failure ({first}): {last}\n(see `status store={cfg.store}`; "
              f"rerun the same command to retry only the incomplete models)")
    sys.stdout.flush()

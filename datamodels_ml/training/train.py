"""``train``: the driver that runs every incomplete index of a store through a fan-out back end.

Two back ends share one small interface (``Backend``): the local slots of this machine
(``training.local_slots``: one long-lived runner process per GPU or CPU slot; the default) and a Dask
cluster (``training.dask_backend``: ``scheduler=tcp://HOST:PORT``, or ``cluster=CONFIG.yaml`` started through
dask-jobqueue). The driver owns what does not depend on where models run: the store lock, the group
commits of written rows (``Store.commit``), one MLflow child run per model, in batches (``tracking``),
the progress bar, Ctrl-C/SIGTERM and the summary. A row counts (flag set, child run FINISHED) only
after the driver has committed it.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from omegaconf import MISSING

from datamodels_ml.errors import UserError
from datamodels_ml.training.local_slots import LocalSlots, check_gpus_visible, slot_environments
from datamodels_ml.interrupts import Terminated, terminate_as_interrupt
from datamodels_ml.store.lock import store_lock
from datamodels_ml.store.spec import load_spec
from datamodels_ml.store.layout import SPEC_FILE
from datamodels_ml.store.store import Store, compress_ranges, create_store
from datamodels_ml.store.layout import is_store
from datamodels_ml.training.run_model import ModelResult


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
    scheduler: str | None = field(default="", metadata={
        "help": "run on the Dask cluster at this scheduler address (tcp://HOST:PORT, or tls://HOST:PORT with the certificates of your Dask config) or scheduler JSON file"})
    cluster: str | None = field(default="", metadata={
        "help": "start a Dask cluster through dask-jobqueue from this YAML file (configs/cluster/slurm.yaml)"})


__all__ = ["Backend", "TrainConfig", "train"]


class Backend(Protocol):
    """Where models run. ``run`` (in a thread of the driver) trains the indices it was given and
    puts one ``ModelResult`` per index on ``regression.output_dir``, then ``("done", "")``; "completed" means the
    row's data are written into the store (not yet committed). ``fatal`` (main cannot be imported,
    workers cannot start) and ``deaths`` (the run had to stop) say why it stopped early."""

    results: queue.Queue
    fatal: str | None
    deaths: str | None

    def describe(self) -> str: ...  # "on 4 CPU slots", "on the Dask cluster at tcp://..."

    def params(self) -> dict[str, Any]: ...  # what the train run logs about the back end

    def run(self) -> None: ...

    def kill_all(self) -> None: ...  # stop soon (Ctrl-C): kill what runs, start nothing new

    def close(self) -> None: ...  # release the cluster connection, if any


def _backend(cfg: TrainConfig, store: Store, job: dict[str, Any], todo: list[int]) -> Backend:
    """The local slots, or a Dask back end connected (or started) now: errors come before any run."""
    timeout = cfg.timeout or None
    if not (cfg.scheduler or cfg.cluster):
        envs = slot_environments(cfg.gpus, cfg.jobs)[: len(todo)]
        return LocalSlots(job, envs, todo, timeout)
    if cfg.scheduler and cfg.cluster:
        raise UserError("give scheduler=ADDRESS (a running Dask cluster) or cluster=CONFIG.yaml (start one), not both")
    if cfg.jobs:
        raise UserError("jobs= sets the number of local slots; on Dask the workers' threads set the parallelism "
                        "(drop jobs=, or set jobs: in the cluster YAML)")
    from datamodels_ml.training.dask_backend import DaskFanout

    return DaskFanout(store, job, todo, timeout, scheduler=cfg.scheduler or "", cluster=cfg.cluster or "", gpus=cfg.gpus)


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
        """Mark the pending rows complete, then record each (child run, progress). A Ctrl-C during the
        store's commit leaves them pending for ``close`` to commit again (idempotent); one while they
        are recorded waits until all are: every completed row gets its MLflow child run."""
        self._last_commit = time.monotonic()
        if not self.pending:
            return
        batch = self.pending
        self.store.commit([r.index for r, _ in batch])
        self.pending = []
        interrupted: KeyboardInterrupt | None = None
        for result, now in batch:
            self.completed += 1
            try:
                self._record(result, now, ok=True)
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def _record(self, result: ModelResult, now: int, *, ok: bool) -> None:
        """Queue the model's child run and, every 2 s, the progress metrics: never waits on MLflow."""
        from datamodels_ml.tracking.child_runs import ChildRecord

        tags = {"error": result.error[-7000:]} if result.error else {}
        if result.nonfinite:
            tags["nonfinite"] = ",".join(result.nonfinite)  # keys holding NaN/inf, visible in the UI
        metrics = {"duration": result.duration, **result.scalars}
        self.children.add(ChildRecord(result.index, "FINISHED" if ok else "FAILED",
                                               now - int(result.duration * 1000), now, metrics, tags))
        self.bar.set_postfix(completed=self.completed, failed=len(self.failures), refresh=False)
        self.bar.update(1)
        if time.monotonic() - self._last_metric > 2.0:
            self._last_metric = time.monotonic()
            self._log_progress()

    def _log_progress(self) -> None:
        done = self.completed + len(self.failures)
        self.children.add_metrics({"progress": done / self.total, "completed": self.completed,
                                   "failed": len(self.failures)}, step=done)

    def close(self) -> None:
        """Commit what is written, write the failures file, flush the child runs (a second Ctrl-C
        while they are written stops that, and only that)."""
        try:
            self.commit()
        finally:
            self.bar.close()
            self.store.write_failures(self.failures)
            self._log_progress()
            self.children.close()


def _drain(fan: Backend, rec: _Recorder) -> None:
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
    if not (cfg.scheduler or cfg.cluster):
        slot_environments(cfg.gpus, cfg.jobs)  # wrong gpus/jobs fail before the store is touched
        check_gpus_visible(cfg.gpus)  # the Dask back end checks its workers' GPUs instead
    elif cfg.gpus < 0:
        raise UserError("gpus must be non-negative")
    store = _open_store(cfg)
    if cfg.n > store.num_models:
        raise UserError(f"n={cfg.n} but the store at {store.path} holds only {store.num_models} models (num_models in its spec)")
    with terminate_as_interrupt(), store_lock(store.path, "train"):
        store.reserve_space()  # a store made sparse (by the original tools, or before 0.2) gets its blocks now
        return _train(cfg, store)


def _train(cfg: TrainConfig, store: Store) -> int:
    from datamodels_ml.store.train_record import record_train

    done = store.completed[: cfg.n]
    todo = [int(i) for i in np.flatnonzero(~done)]
    if not todo:
        if not (cfg.scheduler or cfg.cluster):  # a misspelt main is an error, not "nothing to do"
            from datamodels_ml.training.run_model import load_main

            load_main(cfg.main, cfg.argv)
        record_train(store.path, n=cfg.n, main=cfg.main)
        print(f"all {cfg.n} models are already complete in {store.path}: nothing to do")
        return 0
    record_train(store.path, n=cfg.n, main=cfg.main)
    job = {"store": str(store.path), "main": cfg.main, "args": dict(cfg.args), "argv": list(cfg.argv)}
    fan = _backend(cfg, store, job, todo)
    try:
        return _run(cfg, store, fan, todo, int(done.sum()))
    finally:
        fan.close()


def _run(cfg: TrainConfig, store: Store, fan: Backend, todo: list[int], already: int) -> int:
    from datamodels_ml import progress
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.tracking.child_runs import ChildRunWriter

    params = {"n": cfg.n, "gpus": cfg.gpus, "main": cfg.main, "store": cfg.store, **fan.params()}
    params.update({f"args.{k}": v for k, v in cfg.args.items()})
    if cfg.argv:
        params["argv"] = " ".join(cfg.argv)
    print(f"training {len(todo)} models ({already} of {cfg.n} already complete) {fan.describe()}", flush=True)
    tags = {"n": cfg.n, "to_train": len(todo), "main": cfg.main, "gpus": cfg.gpus,
            "backend": fan.params().get("backend", "local")}
    with tracking.run("train", name=f"train-{cfg.n}", params=params, tags=tags) as parent:
        tracking.log_dict(store.spec.to_json(), SPEC_FILE)
        bar = progress.bar("train", total=len(todo), unit="model", enabled=cfg.progress)
        rec = _Recorder(store, ChildRunWriter(parent.info.run_id), bar, len(todo))
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

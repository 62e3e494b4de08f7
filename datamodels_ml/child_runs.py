"""The MLflow child runs of ``train``: one run per model, written from a background thread.

The driver only puts a ``ChildRecord`` on a queue (``ChildRunWriter.add`` never waits on MLflow, so
training never slows down for tracking, and the queue absorbs bursts); a thread writes what is
queued in batches, and ``close`` (also on Ctrl-C/SIGTERM, from the caller's ``finally``) flushes the
rest. Two ways to write a batch:

* MLflow's public API, always available and the only one for a tracking server: per run one
  ``create_run`` (name, parent, user), one ``log_batch`` (param ``index``, the metrics, the tags
  ``status``/``error``/``nonfinite``) and one ``set_terminated`` (FINISHED or FAILED, end time);
  ``API_THREADS`` runs at a time against a server, so the round trips overlap, one at a time on a
  SQLite file, where writers queue for the lock anyway. Transient errors (a locked database, a
  server briefly unreachable) are retried with backoff.
* On a local SQLite file, where the public API costs ~40 SQL statements and 6 commits per run (15-25
  ms: ~50-70 models/s, below the rate a busy ``train`` finishes models), a fast path inserts a whole
  batch of runs in one transaction through MLflow's ORM tables (~0.3 ms per run). It is used only
  after checking that those tables have exactly the columns it writes; any other MLflow falls back
  to the public API with a one-line note, as does an error on the fast path.
  ``DATAMODELS_CHILD_RUNS=api`` forces the public API.

A tracking failure never loses training results: the store is written first; runs that could not be
written are counted and reported in one line at ``close``.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from datamodels_ml import tracking

API_THREADS = 8  # child runs written at once through the public API to a tracking server
MODE_ENV = "DATAMODELS_CHILD_RUNS"  # "api": always the public API; default "auto"
_TRANSIENT = ("locked", "temporarily", "unavailable", "timed out", "timeout", "connection", "max retries",
              "too many requests", "503", "502", "504", "429")


@dataclass
class ChildRecord:
    """One finished model for the MLflow record: a child run of the train run."""

    index: int
    status: str  # "FINISHED" or "FAILED" (MLflow run status)
    start_ms: int
    end_ms: int
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT)


def _retry(fn: Callable[[], Any], attempts: int = 6) -> Any:
    """Call ``fn``, retrying transient errors with backoff (0.1 s doubling to 5 s)."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps store and HTTP errors in several types
            if attempt == attempts - 1 or not _transient(exc):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class ChildRunWriter:
    """Writes child runs of ``parent_run_id`` from a background thread, in batches."""

    def __init__(self, parent_run_id: str, *, flush_every: float = 0.5, max_batch: int = 500):
        tracking.prepare()
        self.parent_run_id = parent_run_id
        self.client = tracking.MlflowClient()
        parent = _retry(lambda: self.client.get_run(parent_run_id))
        self.experiment_id = parent.info.experiment_id
        self.user = parent.info.user_id or tracking._user()
        self.flush_every = flush_every
        self.max_batch = max_batch
        self.written = 0
        self.failed = 0
        self.lost = 0  # runs not written (failed or abandoned), known after close
        self.errors: list[str] = []
        self._sql = _fast_sql_store(self.client)
        self.mode = "sql" if self._sql is not None else "api"
        server = not tracking.tracking_uri().startswith("sqlite:")
        self._pool = ThreadPoolExecutor(API_THREADS if server else 1, thread_name_prefix="mlflow-child")
        self._queue: queue.Queue[ChildRecord | None] = queue.Queue()
        self._abandon = threading.Event()
        self._finished = threading.Event()  # set by the thread when its counts are final
        self._thread = threading.Thread(target=self._run, name="mlflow-child-runs", daemon=True)
        self._thread.start()

    def add(self, record: ChildRecord) -> None:
        """Queue one model's run; returns at once."""
        self._queue.put(record)

    def close(self) -> None:
        """Write everything queued, then stop; a Ctrl-C while waiting gives up on the rest (counted)."""
        self._queue.put(None)
        pending = self._queue.qsize() - 1
        if pending > 200 and self.mode == "api":
            print(f"MLflow: writing {pending} queued child runs ...", file=sys.stderr, flush=True)
        # an Event, not Thread.join: a KeyboardInterrupt inside join can leave the thread reported
        # as ended while it still runs (and still counts)
        try:
            while not self._finished.wait(0.5):
                pass
        except BaseException:  # Ctrl-C (or a signal handler's SystemExit): give up on the rest
            self._abandon.set()
            self._finished.wait(30)
            raise
        finally:
            stuck = not self._finished.is_set()  # e.g. a server that does not answer: leave it behind
            if not stuck:
                self._thread.join(timeout=5)
            self._pool.shutdown(wait=not stuck, cancel_futures=stuck)
            self._report()

    def _report(self) -> None:
        left = 0
        while True:
            try:
                left += self._queue.get_nowait() is not None
            except queue.Empty:
                break
        self.lost = lost = self.failed + left
        if lost:
            first = f" (first error: {self.errors[0]})" if self.errors else ""
            print(f"warning: {lost} MLflow child runs of {self.parent_run_id} were not written{first}; "
                  "the store is unaffected", file=sys.stderr, flush=True)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._finished.set()

    def _loop(self) -> None:
        done = False
        while not done and not self._abandon.is_set():
            pending: list[ChildRecord] = []
            deadline = time.monotonic() + self.flush_every
            while len(pending) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                pending.append(item)
            if pending:
                self._write(pending)

    def _write(self, records: list[ChildRecord]) -> None:
        if self._sql is not None:
            try:
                _retry(lambda: self._write_sql(records))
                self.written += len(records)
                return
            except Exception as exc:  # noqa: BLE001 - this batch and the next ones through the public API
                self._sql, self.mode = None, "api"
                print(f"MLflow: the fast path for child runs failed ({type(exc).__name__}: {exc}); "
                      "writing them through MLflow's public API", file=sys.stderr, flush=True)
        done = 0
        try:
            for ok in self._pool.map(self._write_api_safely, records):
                done += 1
                if ok:
                    self.written += 1
                else:
                    self.failed += 1
        except RuntimeError:  # the pool was shut down: close gave up waiting for this thread
            self.failed += len(records) - done

    def _tags(self, rec: ChildRecord) -> dict[str, str]:
        """Tags of a child run: who and where (create_run) first, then what happened (log_batch)."""
        return {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": f"model-{rec.index}",
            "mlflow.user": self.user,
            "status": "completed" if rec.status == "FINISHED" else "failed",
            **{k: str(v)[:7900] for k, v in rec.tags.items()},
        }

    def _write_api_safely(self, rec: ChildRecord) -> bool:
        if self._abandon.is_set():
            return False
        try:
            self._write_api(rec)
            return True
        except Exception as exc:  # noqa: BLE001
            if len(self.errors) < 5:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:500])
            return False

    def _write_api(self, rec: ChildRecord) -> None:
        from mlflow.entities import Metric, Param, RunTag

        tags = self._tags(rec)
        first = {k: tags.pop(k) for k in ("mlflow.parentRunId", "mlflow.runName", "mlflow.user")}
        child = _retry(lambda: self.client.create_run(self.experiment_id, start_time=rec.start_ms, tags=first,
                                                      run_name=first["mlflow.runName"]))
        run_id = child.info.run_id
        metrics = [Metric(k, float(v), rec.end_ms, 0) for k, v in rec.metrics.items()]
        _retry(lambda: self.client.log_batch(run_id, metrics=metrics, params=[Param("index", str(rec.index))],
                                             tags=[RunTag(k, v) for k, v in tags.items()]))
        _retry(lambda: self.client.set_terminated(run_id, rec.status, end_time=rec.end_ms))

    def _write_sql(self, records: list[ChildRecord]) -> None:
        from sqlalchemy import insert

        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

        root = self._artifact_root().rstrip("/")
        runs, tags, params, metrics = [], [], [], []
        for rec in records:
            run_id = uuid.uuid4().hex
            run_tags = self._tags(rec)
            runs.append(dict(
                run_uuid=run_id, name=run_tags["mlflow.runName"], source_type="UNKNOWN", source_name="",
                entry_point_name="", user_id=self.user, status=rec.status, start_time=rec.start_ms,
                end_time=rec.end_ms, deleted_time=None, source_version="", lifecycle_stage="active",
                artifact_uri=f"{root}/{run_id}/artifacts", experiment_id=int(self.experiment_id),
            ))
            tags.extend(dict(key=k, value=v, run_uuid=run_id) for k, v in run_tags.items())
            params.append(dict(key="index", value=str(rec.index), run_uuid=run_id))
            for key, value in rec.metrics.items():
                value = float(value)
                is_nan = math.isnan(value)
                metrics.append(dict(key=key, value=0.0 if is_nan else value, timestamp=rec.end_ms, step=0,
                                    is_nan=is_nan, run_uuid=run_id))
        with self._sql.ManagedSessionMaker() as session:
            session.execute(insert(SqlRun.__table__), runs)
            session.execute(insert(SqlTag.__table__), tags)
            session.execute(insert(SqlParam.__table__), params)
            if metrics:
                session.execute(insert(SqlMetric.__table__), metrics)
                session.execute(insert(SqlLatestMetric.__table__), metrics)

    def _artifact_root(self) -> str:
        if not hasattr(self, "_root"):
            self._root = self._sql.get_experiment(self.experiment_id).artifact_location
        return self._root


# -- the SQLite fast path: only on the MLflow internals it was written for -----------------------------
# every column of each table it inserts into: a column added or renamed by another MLflow turns it off
_COLUMNS = {
    "SqlRun": {"run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id", "status",
               "start_time", "end_time", "deleted_time", "source_version", "lifecycle_stage", "artifact_uri",
               "experiment_id"},
    "SqlTag": {"key", "value", "run_uuid"},
    "SqlParam": {"key", "value", "run_uuid"},
    "SqlMetric": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "SqlLatestMetric": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
}


def _fast_sql_store(client: Any) -> Any:
    """MLflow's SQLAlchemy store when the tracking store is a local SQLite file whose ORM tables are
    exactly what ``_write_sql`` writes; else None (with a one-line note when only the check failed)."""
    if os.environ.get(MODE_ENV, "auto") == "api" or not tracking.tracking_uri().startswith("sqlite:"):
        return None
    try:
        from mlflow.store.tracking import dbmodels
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore) or not callable(getattr(store, "ManagedSessionMaker", None)):
            raise TypeError(f"store {type(store).__name__}")
        for name, columns in _COLUMNS.items():
            found = {c.name for c in getattr(dbmodels.models, name).__table__.columns}
            if found != columns:
                raise TypeError(f"{name} columns {sorted(found ^ columns)} differ")
        return store
    except Exception as exc:  # noqa: BLE001 - another MLflow: the public API is always right
        import mlflow

        print(f"MLflow {mlflow.__version__}: child runs through the public API (slower on SQLite): its tables are "
              f"not the ones the fast path was written for ({exc})", file=sys.stderr, flush=True)
        return None


__all__ = ["ChildRecord", "ChildRunWriter", "API_THREADS", "MODE_ENV"]


def model_durations(store: str | Path) -> tuple[dict[int, float], int]:
    """Seconds each model of ``store`` ran in its slot (the ``duration`` metric of the FINISHED child
    runs of every train run whose ``store`` param names it, relative paths taken from the working
    directory; a later run wins) and the most GPUs those runs used (0: CPU slots). ``({}, 0)`` when
    this tracking store holds no such run."""
    client, target = tracking.MlflowClient(tracking.prepare()), Path(store).resolve()

    def search(exps: list[str], query: str) -> Iterator[Any]:
        token = None
        while True:
            page = tracking._retry(lambda: client.search_runs(exps, query, max_results=5000, page_token=token,
                                                     order_by=["attributes.start_time ASC"]))
            yield from page
            if not (token := page.token):
                return

    exps = [e.experiment_id for e in tracking._retry(client.search_experiments)]
    durations: dict[int, float] = {}
    gpus = 0
    for parent in search(exps, "params.store LIKE '%'"):
        p = parent.data.params
        if "main" not in p or "n" not in p or Path(p["store"]).resolve() != target:
            continue  # not a train run on this store
        gpus = max(gpus, int(p.get("gpus") or 0))
        query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' AND attributes.status = 'FINISHED'"
        for child in search([parent.info.experiment_id], query):
            if "index" in child.data.params and "duration" in child.data.metrics:
                durations[int(child.data.params["index"])] = float(child.data.metrics["duration"])
    return durations, gpus

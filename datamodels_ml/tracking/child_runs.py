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
  batch of runs in one transaction through MLflow's ORM tables (~0.3 ms per run;
  ``tracking.child_runs_sql``). It is used only after checking that those tables have exactly the
  columns it writes; any other MLflow falls back to the public API with a one-line note, as does an
  error on the fast path.
  ``DATAMODELS_CHILD_RUNS=api`` forces the public API.

The train run's progress metrics go through the same queue (``add_metrics``): nothing that talks to
MLflow runs on the driver's main thread between a row's data and its flag.

A tracking failure never loses training results: the store is written first. A tracking server that
goes away is one warning line; what could not be written stays queued, and the thread asks the
server every ``RETRY_EVERY`` seconds whether it is back, then writes the backlog. ``close`` waits for
an absent server at most ``DATAMODELS_TRACKING_WAIT`` seconds (default 30); runs that could not be
written are counted and reported in one line.

A ``create_run`` that the server committed but whose answer was lost (a server killed mid-request,
or urllib3 retrying the POST) leaves a run with no params that is never terminated; its record is
written again. Once everything is written, the children of this train still RUNNING are exactly those
leftovers, and the thread deletes them (``_remove_leftovers``): each model has one run.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from datamodels_ml.tracking import backend as tracking_store
from datamodels_ml.tracking import runs as tracking
from datamodels_ml.tracking.child_runs_sql import fast_sql_store, insert_runs

API_THREADS = 8  # child runs written at once through the public API to a tracking server
MODE_ENV = "DATAMODELS_CHILD_RUNS"  # "api": always the public API; default "auto"
WAIT_ENV = "DATAMODELS_TRACKING_WAIT"  # seconds close waits for an absent tracking server (default 30)
RETRY_EVERY = 2.0  # seconds between two questions to an absent server
_TRANSIENT = ("locked", "too many requests", "429")  # retried here; MLflow's HTTP client retries the rest
_DOWN = ("connection", "max retries", "timed out", "timeout", "unavailable", "temporarily", "503", "502", "504")


@dataclass
class ChildRecord:
    """One finished model for the MLflow record: a child run of the train run."""

    index: int
    status: str  # "FINISHED" or "FAILED" (MLflow run status)
    start_ms: int
    end_ms: int
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str = ""  # set once the run exists: a write that the server cut short resumes from there
    steps_done: int = 0  # of create, log, terminate


@dataclass
class ParentMetrics:
    """Metrics of the train run itself (its progress) at one step."""

    metrics: dict[str, float]
    step: int
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class _Down(Exception):
    """The tracking server did not answer: the record stays queued."""


def _one_line(exc: BaseException) -> str:
    """``Type: the first line of the message`` (SQLAlchemy's run on for several lines)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:500]


def _is_down(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _DOWN)


def _transient(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT)


def _retry(fn: Callable[[], Any]) -> Any:
    """``tracking.backend.retry`` on transient errors (a lock, a server that hiccups): 0.1 s doubling to 5 s."""
    return tracking_store.retry(fn, 6, transient=_transient, delay=0.1, max_delay=5.0)


class ChildRunWriter:
    """Writes child runs of ``parent_run_id`` (and its progress metrics) from a background thread, in batches."""

    def __init__(self, parent_run_id: str, *, flush_every: float = 0.5, max_batch: int = 500):
        tracking_store.prepare()
        self.parent_run_id = parent_run_id
        self.client = MlflowClient()
        parent = _retry(lambda: self.client.get_run(parent_run_id))
        self.experiment_id = parent.info.experiment_id
        self.user = parent.info.user_id or tracking._user()
        self.flush_every = flush_every
        self.max_batch = max_batch
        self.written = 0
        self.failed = 0
        self.lost = 0  # runs not written (failed or abandoned), known after close
        self.errors: list[str] = []
        self.down_since: float | None = None  # monotonic time the server stopped answering; None: it answers
        self.outages = 0
        self._last_ask = 0.0
        self._backlog: list[ChildRecord | ParentMetrics] = []  # taken from the queue, not written yet
        self._api_used = False  # a child run was written through the public API (leftovers are possible)
        fast = tracking_store.tracking_uri().startswith("sqlite:") and os.environ.get(MODE_ENV, "auto") != "api"
        self._sql = fast_sql_store(self.client) if fast else None
        self.mode = "sql" if self._sql is not None else "api"
        server = not tracking_store.tracking_uri().startswith("sqlite:")
        self._pool = ThreadPoolExecutor(API_THREADS if server else 1, thread_name_prefix="mlflow-child")
        self._queue: queue.Queue[ChildRecord | ParentMetrics | None] = queue.Queue()
        self._abandon = threading.Event()
        self._finished = threading.Event()  # set by the thread when its counts are final
        self._thread = threading.Thread(target=self._run, name="mlflow-child-runs", daemon=True)
        self._thread.start()

    def add(self, record: ChildRecord) -> None:
        """Queue one model's run; returns at once."""
        self._queue.put(record)

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics of the parent run (train's progress); returns at once."""
        self._queue.put(ParentMetrics({k: float(v) for k, v in metrics.items()}, step))

    def close(self) -> None:
        """Write everything queued, then stop. An absent server is waited for at most
        ``DATAMODELS_TRACKING_WAIT`` seconds; a Ctrl-C while waiting gives up on the rest (counted)."""
        self._queue.put(None)
        pending = self._queue.qsize() - 1 + len(self._backlog)
        if pending > 200 and self.mode == "api":
            print(f"MLflow: writing {pending} queued child runs ...", file=sys.stderr, flush=True)
        wait = float(os.environ.get(WAIT_ENV) or 30)
        since = time.monotonic()
        told = False
        # an Event, not Thread.join: a KeyboardInterrupt inside join can leave the thread reported
        # as ended while it still runs (and still counts)
        try:
            while not self._finished.wait(0.5):
                if self.down_since is None:
                    continue
                if not told:
                    told = True
                    print(f"MLflow: waiting up to {wait:.0f} s for the tracking server to return "
                          f"({WAIT_ENV} sets how long; Ctrl-C gives up now)", file=sys.stderr, flush=True)
                if time.monotonic() - max(since, self.down_since) > wait:
                    self._abandon.set()
                    self._finished.wait(30)
                    break
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
        left = sum(isinstance(r, ChildRecord) for r in self._backlog)
        while True:
            try:
                left += isinstance(self._queue.get_nowait(), ChildRecord)
            except queue.Empty:
                break
        self.lost = lost = self.failed + left
        if lost:
            first = f" (first error: {self.errors[0]})" if self.errors else ""
            why = " (the tracking server did not return)" if self.down_since is not None else first
            print(f"warning: {lost} MLflow child runs of {self.parent_run_id} were not written{why}; "
                  "the store is unaffected", file=sys.stderr, flush=True)

    def _run(self) -> None:
        try:
            self._loop()
            if self._api_used and not self._abandon.is_set() and not self._backlog:
                self._remove_leftovers()
        finally:
            self._finished.set()

    def _remove_leftovers(self) -> None:
        """Delete the child runs of this train still RUNNING once every record is written: runs whose
        create the server committed without the answer reaching this writer (see the module doc)."""
        query = f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'RUNNING'"
        try:
            leftovers, token = [], None
            while True:
                page = _retry(lambda: self.client.search_runs([self.experiment_id], query, max_results=1000,
                                                              page_token=token))
                leftovers += [r.info.run_id for r in page]
                token = page.token
                if not token:
                    break
            for run_id in leftovers:
                _retry(lambda: self.client.delete_run(run_id))
        except Exception as exc:  # noqa: BLE001 - the record is complete; a leftover only clutters the UI
            print(f"MLflow: could not look for unfinished duplicate child runs ({_one_line(exc)})", file=sys.stderr,
                  flush=True)
            return
        if leftovers:
            print(f"MLflow: deleted {len(leftovers)} unfinished duplicate child runs (created by the server while "
                  "its answer was lost; each model's run was written again)", file=sys.stderr, flush=True)

    def _loop(self) -> None:
        done = False
        while not self._abandon.is_set():
            if not done:
                deadline = time.monotonic() + self.flush_every
                while len(self._backlog) < self.max_batch:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        done = True
                        break
                    self._backlog.append(item)
            if not self._backlog:
                if done:
                    return
                continue
            if self.down_since is not None and not self._server_back():
                if done:
                    self._abandon.wait(RETRY_EVERY)
                continue
            self._backlog = self._write(self._backlog)

    def _server_back(self) -> bool:
        """Ask an absent server again, at most every ``RETRY_EVERY`` seconds."""
        if time.monotonic() - self._last_ask < RETRY_EVERY:
            return False
        self._last_ask = time.monotonic()
        if not tracking_store.answers(tracking_store.tracking_uri()):
            return False
        print(f"MLflow: the tracking server is back; writing the {len(self._backlog)}+ queued records",
              file=sys.stderr, flush=True)
        self.down_since = None
        return True

    def _went_down(self) -> None:
        if self.down_since is None:
            self.down_since = self._last_ask = time.monotonic()
            self.outages += 1
            print(f"warning: the MLflow tracking server at {tracking_store.tracking_uri()} does not answer; training "
                  "goes on, the store is unaffected, and its runs are written when it returns", file=sys.stderr,
                  flush=True)

    def _write(self, items: list[ChildRecord | ParentMetrics]) -> list[ChildRecord | ParentMetrics]:
        """Write ``items``; return those left for later because the server does not answer."""
        records = [r for r in items if isinstance(r, ChildRecord)]
        later: list[ChildRecord | ParentMetrics] = []
        for m in (r for r in items if isinstance(r, ParentMetrics)):
            if not self._write_safely(self._write_metrics, m):
                later.append(m)
        if self._sql is not None and records:
            try:
                _retry(lambda: self._write_sql(records))
                self.written += len(records)
                return later
            except Exception as exc:  # noqa: BLE001 - this batch and the next ones through the public API
                self._sql, self.mode = None, "api"
                print(f"MLflow: the fast path for child runs failed ({_one_line(exc)}); "
                      "writing them through MLflow's public API", file=sys.stderr, flush=True)
        try:
            for rec, ok in zip(records, self._pool.map(lambda r: self._write_safely(self._write_api, r), records)):
                if ok is None:
                    later.append(rec)
                elif ok:
                    self.written += 1
                else:
                    self.failed += 1
        except RuntimeError:  # the pool was shut down: close gave up waiting for this thread
            later = records
        return later

    def _write_safely(self, write: Callable[[Any], None], item: Any) -> bool | None:
        """True: written; False: failed for good (counted); None: the server does not answer (kept)."""
        if self._abandon.is_set() or self.down_since is not None:
            return None
        try:
            write(item)
            return True
        except Exception as exc:  # noqa: BLE001
            if _is_down(exc):
                self._went_down()
                return None
            if len(self.errors) < 5:
                self.errors.append(_one_line(exc))
            return False

    def _write_metrics(self, m: ParentMetrics) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, m.time_ms, m.step) for k, v in m.metrics.items()]
        _retry(lambda: self.client.log_batch(self.parent_run_id, metrics=metrics))

    def _write_api(self, rec: ChildRecord) -> None:
        """create_run, log_batch, set_terminated; a record cut short by the server resumes where it stopped."""
        from mlflow.entities import Metric, Param, RunTag

        self._api_used = True
        tags = self._tags(rec)
        first = {k: tags.pop(k) for k in ("mlflow.parentRunId", "mlflow.runName", "mlflow.user")}
        if rec.steps_done < 1:
            rec.run_id = _retry(lambda: self.client.create_run(self.experiment_id, start_time=rec.start_ms, tags=first,
                                                               run_name=first["mlflow.runName"])).info.run_id
            rec.steps_done = 1
        if rec.steps_done < 2:
            metrics = [Metric(k, float(v), rec.end_ms, 0) for k, v in rec.metrics.items()]
            _retry(lambda: self.client.log_batch(rec.run_id, metrics=metrics, params=[Param("index", str(rec.index))],
                                                 tags=[RunTag(k, v) for k, v in tags.items()]))
            rec.steps_done = 2
        _retry(lambda: self.client.set_terminated(rec.run_id, rec.status, end_time=rec.end_ms))
        rec.steps_done = 3

    def _tags(self, rec: ChildRecord) -> dict[str, str]:
        """Tags of a child run: who and where (create_run) first, then what happened (log_batch)."""
        return {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": f"model-{rec.index}",
            "mlflow.user": self.user,
            "status": "completed" if rec.status == "FINISHED" else "failed",
            **{k: str(v)[:7900] for k, v in rec.tags.items()},
        }

    def _write_sql(self, records: list[ChildRecord]) -> None:
        insert_runs(self._sql, [(rec, self._tags(rec)) for rec in records], user=self.user,
                    experiment_id=self.experiment_id, artifact_root=self._artifact_root())

    def _artifact_root(self) -> str:
        if not hasattr(self, "_root"):
            self._root = self._sql.get_experiment(self.experiment_id).artifact_location
        return self._root


__all__ = ["ChildRecord", "ChildRunWriter", "ParentMetrics", "API_THREADS", "MODE_ENV", "WAIT_ENV"]

"""Where tracking goes and making it ready: the tracking URI, its check, SQLite's set-up and retries.

Tracking goes to ``MLFLOW_TRACKING_URI`` when set, else to MLflow's default local SQLite store
(``mlflow.db`` in the working directory). A URI that cannot work (a scheme MLflow does not know, a
server that does not answer) is one line within seconds (``prepare``), not minutes of HTTP retries
and a traceback. For SQLite, many processes share one file, so this module

* creates the database under a file lock (MLflow's schema migration is not safe to run twice at once),
* puts it in WAL mode with a long busy timeout, so concurrent writers wait instead of failing on
  "database is locked", and retries the rare call that still hits a lock (``retry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# a tracking server: no "View run ... at" lines per run, each costing a get_run round trip (set_terminated)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# a tracking server that went away: MLflow's default retries take ~4 minutes per call (7 retries, backoff
# 2 s doubling, 120 s timeouts); ours (child_runs) wait for its return themselves. The user's settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from datamodels_ml.errors import UserError  # noqa: E402

_PREPARED: set[str] = set()
_LOCK = threading.Lock()


class _NoSqlTracebacks(logging.Filter):
    """MLflow's SQL store logs every failed commit at ERROR with its traceback (a full mlflow.db:
    thousands of them); the project's callers report tracking failures themselves, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


logging.getLogger("mlflow.store.db.utils").addFilter(_NoSqlTracebacks())


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def _install_sqlite_pragmas() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_install_sqlite_pragmas, "done", False):
        return

    @event.listens_for(Engine, "connect")
    def _on_connect(dbapi_con, _record):  # pragma: no cover - exercised through MLflow
        if type(dbapi_con).__module__.startswith("sqlite3"):
            cur = dbapi_con.cursor()
            cur.execute("PRAGMA busy_timeout=120000")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    _install_sqlite_pragmas.done = True  # type: ignore[attr-defined]


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether the tracking server at ``uri`` (http/https) answers at all, in one try of ``timeout`` s.

    Any HTTP response counts (a server behind a proxy or with authentication may refuse ``/health``);
    only a refused connection or a timeout does not."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        return True
    except requests.RequestException:
        return False


def _check_uri(uri: str) -> None:
    """One line within seconds, not minutes of retries then a traceback, for a URI that cannot work."""
    from mlflow.exceptions import MlflowException

    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    try:
        MlflowClient(uri)
    except MlflowException:
        raise UserError(f"MLFLOW_TRACKING_URI={uri}: MLflow has no tracking store for '{scheme}://' URIs; use "
                        "http(s)://HOST:PORT (a tracking server), sqlite:///FILE.db or a folder") from None
    if scheme in ("http", "https") and not answers(uri):
        raise UserError(f"the MLflow tracking server at {uri} does not answer: start it (make server) or set "
                        "MLFLOW_TRACKING_URI to a reachable server (unset, runs go to ./mlflow.db)")


def prepare() -> str:
    """Make the tracking store ready in this process (idempotent); return its URI."""
    uri = tracking_uri()
    with _LOCK:
        if uri in _PREPARED:
            return uri
        _check_uri(uri)
        db = _sqlite_path(uri)
        if db is not None:
            _install_sqlite_pragmas()
            db.parent.mkdir(parents=True, exist_ok=True)
            with db_lock(uri):
                retry(lambda: MlflowClient(uri).search_experiments(max_results=1))
        _PREPARED.add(uri)
    return uri


@contextlib.contextmanager
def db_lock(uri: str) -> Iterator[None]:
    """Across processes, one at a time on a SQLite store (its schema migration, creating an
    experiment: a read then a write, which SQLite refuses at once to a second such writer)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _locked(exc: BaseException) -> bool:
    return "locked" in str(exc).lower()


def retry(fn: Callable[[], Any], attempts: int = 8, *, transient: Callable[[BaseException], bool] = _locked,
          delay: float = 0.05, max_delay: float = 2.0) -> Any:
    """Call ``fn``, retrying with backoff (``delay`` doubling to ``max_delay``) while its error is
    ``transient``: by default, SQLite reporting a lock."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps sqlite and HTTP errors in several types
            if attempt == attempts - 1 or not transient(exc):
                raise
            time.sleep(delay)
            delay = min(delay * 2, max_delay)

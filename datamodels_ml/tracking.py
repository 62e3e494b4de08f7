"""Every MLflow call of the project lives here (and, for the child runs of ``train``, in ``child_runs``):
experiments, runs, parameters, metrics, artifacts, models.

Tracking goes to ``MLFLOW_TRACKING_URI`` when set, else to MLflow's default local SQLite store
(``mlflow.db`` in the working directory). For SQLite, many processes share one file, so this module

* creates the database under a file lock (MLflow's schema migration is not safe to run twice at once),
* puts it in WAL mode with a long busy timeout, so concurrent writers wait instead of failing on
  "database is locked", and retries the rare call that still hits a lock.

Runs go to two named experiments of MLflow's model-training kind (``_experiment_for``): one for
regressions, evaluations and pipelines, one for training, whose thousands of model runs would
crowd the rest. A tracking failure never loses training results: callers write the store first and
treat tracking errors as warnings (``safe``).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# a tracking server: no "View run ... at" lines per run, each costing a get_run round trip (set_terminated)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.entities import RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from datamodels_ml.errors import UserError  # noqa: E402

_PREPARED: set[str] = set()
_LOCK = threading.Lock()
MAX_PARAM_LEN = 6000
STAGE_TAG = "datamodels.stage"  # the command that made a run (train, regress, ...), whatever its name


# -- set-up ------------------------------------------------------------------------------------
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


def prepare() -> str:
    """Make the tracking store ready in this process (idempotent); return its URI."""
    uri = tracking_uri()
    with _LOCK:
        if uri in _PREPARED:
            return uri
        db = _sqlite_path(uri)
        if db is not None:
            _install_sqlite_pragmas()
            db.parent.mkdir(parents=True, exist_ok=True)
            with _db_lock(uri):
                _retry(lambda: MlflowClient(uri).search_experiments(max_results=1))
        _PREPARED.add(uri)
    return uri


@contextlib.contextmanager
def _db_lock(uri: str) -> Iterator[None]:
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


def _retry(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Call ``fn``, retrying with backoff when SQLite reports a lock."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps sqlite errors in several types
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def safe(fn: Callable[[], Any], what: str) -> Any:
    """Run a tracking call; on failure warn (the data is already on disk) and return None."""
    try:
        return _retry(fn)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"MLflow tracking failed ({what}): {exc}; results on disk are unaffected", stacklevel=2)
        return None


def _as_param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


# -- experiments -------------------------------------------------------------------------------
EXPERIMENT = "datamodels"  # regressions, evaluations, budgets, the demo pipeline, init, write_dataset
TRAIN_SUFFIX = "-train"  # "datamodels-train": train runs with their model-N child runs, worker runs
TRAINING_STAGES = frozenset({"train", "worker"})
KIND_TAG = "mlflow.experimentKind"  # MLflow 3's experiment type; without it the UI may open on GenAI pages
KIND = "custom_model_development"  # "machine learning": the UI opens on the runs table
DEFAULT_EXPERIMENT_ID = "0"
_EXPERIMENTS: dict[tuple[str, str], str] = {}  # (tracking URI, name) -> experiment id, checked once per process


def experiment_name(*, training: bool = False) -> str:
    """The experiment our runs go to: ``MLFLOW_EXPERIMENT_NAME`` or ``datamodels``; training: that + ``-train``."""
    main = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    return _training_name(main) if training else main


def _training_name(main: str) -> str:
    return main if main.endswith(TRAIN_SUFFIX) else main + TRAIN_SUFFIX


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created of the model-training kind if missing."""
    from mlflow.exceptions import MlflowException

    key = (tracking_uri(), name)
    if key in _EXPERIMENTS:
        return _EXPERIMENTS[key]
    client = MlflowClient()
    exp = _retry(lambda: client.get_experiment_by_name(name))
    if exp is None:
        with _db_lock(key[0]):
            exp = _retry(lambda: client.get_experiment_by_name(name))  # made meanwhile by another process?
            if exp is None:
                try:
                    exp = client.get_experiment(_retry(lambda: client.create_experiment(name, tags={KIND_TAG: KIND})))
                except MlflowException:  # made meanwhile through a tracking server
                    exp = _retry(lambda: client.get_experiment_by_name(name))
                    if exp is None:
                        raise
    exp_id = _check_experiment(exp)
    _EXPERIMENTS[key] = exp_id
    return exp_id


def _check_experiment(exp: Any) -> str:
    """Refuse a deleted experiment; mark one that holds our runs (not Default) as model training."""
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"the MLflow experiment '{exp.name}' (id {exp.experiment_id}) is deleted: restore it "
                        f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or set "
                        "MLFLOW_EXPERIMENT_NAME to another name")
    if exp.experiment_id != DEFAULT_EXPERIMENT_ID and KIND_TAG not in (exp.tags or {}):
        safe(lambda: MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND), "set experiment kind")
    return exp.experiment_id


def _experiment_for(stage: str, parent: Any) -> str:
    """Where a new run of ``stage`` goes: next to its parent, else the named experiment; training apart."""
    training = stage in TRAINING_STAGES
    if parent is not None:
        main_id = parent.info.experiment_id
    elif os.environ.get("MLFLOW_EXPERIMENT_NAME") or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return ensure_experiment(experiment_name(training=training))
    else:  # an experiment chosen by id (MLflow's MLFLOW_EXPERIMENT_ID)
        main_id = os.environ["MLFLOW_EXPERIMENT_ID"]
    if not training:
        return main_id
    if main_id == DEFAULT_EXPERIMENT_ID:
        return ensure_experiment(experiment_name(training=True))
    main = _retry(lambda: MlflowClient().get_experiment(main_id))
    return main_id if main.name.endswith(TRAIN_SUFFIX) else ensure_experiment(_training_name(main.name))


def experiments_of(active: Any) -> tuple[str, str]:
    """Names of the experiment holding ``active`` and of the training experiment that goes with it."""
    exp_id = active.info.experiment_id
    main = safe(lambda: MlflowClient().get_experiment(exp_id).name, "get experiment") or exp_id
    if exp_id == DEFAULT_EXPERIMENT_ID:
        return main, experiment_name(training=True)
    return main, _training_name(main)


# -- runs --------------------------------------------------------------------------------------
@contextlib.contextmanager
def run(stage: str, *, name: str | None = None, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run of ``stage`` (a command) named ``name`` (e.g. ``regress-fista-k50``), ``tags`` its key settings.

    It attaches to the run ``mlflow run`` created, if any, and renames it. Otherwise it goes to the
    experiment ``_experiment_for`` picks: a run of ``train``/``worker`` to the training experiment,
    a nested run next to its parent unless that is in another experiment (then linked by tags:
    ``pipeline.parent_run_id`` on it, ``pipeline.<stage>_run_id`` on the parent).
    The run ends FINISHED (also on exit code 0), KILLED on Ctrl-C or SIGTERM, FAILED on any other exception.
    """
    prepare()
    name = name or stage
    run_tags = {STAGE_TAG: stage, **{k: str(v) for k, v in (tags or {}).items()}}
    parent = mlflow.active_run()
    if parent is None and os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run, renamed
        active = _retry(lambda: mlflow.start_run(run_name=name, tags=run_tags))
        _check_experiment(_retry(lambda: MlflowClient().get_experiment(active.info.experiment_id)))
    else:
        exp_id = _experiment_for(stage, parent)
        if parent is not None and exp_id != parent.info.experiment_id:
            active = _start_linked(exp_id, name, run_tags, parent, stage)
        else:
            active = _retry(lambda: mlflow.start_run(experiment_id=exp_id, run_name=name, tags=run_tags,
                                                     nested=parent is not None))
    status = "FINISHED"
    try:
        if params:
            log_params(params)
        yield active
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as interrupts.Terminated
        status = "KILLED"
        raise
    except SystemExit as exc:
        status = "FINISHED" if exc.code in (0, None) else "FAILED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        safe(lambda: mlflow.end_run(status=status), "end run")


def _start_linked(exp_id: str, name: str, tags: dict[str, str], parent: Any, stage: str) -> mlflow.ActiveRun:
    """A run nested under ``parent`` by tags only: MLflow's parent tag across experiments would hide it."""
    from mlflow.tracking.context import registry

    tags = {**tags, "pipeline.parent_run_id": parent.info.run_id}
    with contextlib.suppress(Exception):  # source, user, git commit, as mlflow.start_run records them
        tags = registry.resolve_tags(tags)
    client = MlflowClient()
    created = _retry(lambda: client.create_run(exp_id, tags=tags, run_name=name))
    safe(lambda: client.set_tag(parent.info.run_id, f"pipeline.{stage}_run_id", created.info.run_id), "link run")
    return _retry(lambda: mlflow.start_run(run_id=created.info.run_id, nested=True))


def finish_attached(run_id: str, stage: str, exit_code: int) -> None:
    """After a command run by ``mlflow run``: name its run after the command if no ``run`` did, and
    end it FAILED (KILLED on Ctrl-C/SIGTERM) if the command failed and left it RUNNING, so the
    record is right even when ``mlflow run`` is gone or never hears of it."""
    client = MlflowClient()
    found = safe(lambda: client.get_run(run_id), "get run")
    if found is None:
        return
    safe(lambda: _check_experiment(client.get_experiment(found.info.experiment_id)), "experiment kind")
    if STAGE_TAG not in found.data.tags:
        safe(lambda: client.log_batch(run_id, tags=[RunTag("mlflow.runName", stage), RunTag(STAGE_TAG, stage)]),
             "name run")
    if exit_code != 0 and found.info.status == "RUNNING":
        status = "KILLED" if exit_code in (130, 143) else "FAILED"
        safe(lambda: client.set_terminated(run_id, status), "end run")


def log_params(params: Mapping[str, Any]) -> None:
    """Log parameters, skipping keys the active run already has.

    Under ``mlflow run`` the run was created with its ``-P`` parameters already logged under the same
    names; they are kept as they are, never logged twice.
    """
    active = mlflow.active_run()
    if active is None:
        return
    existing = _retry(lambda: MlflowClient().get_run(active.info.run_id)).data.params
    fresh = {k: _as_param(v) for k, v in params.items() if k not in existing}
    if fresh:
        safe(lambda: mlflow.log_params(fresh), "log params")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    if clean:
        safe(lambda: mlflow.log_metrics(clean, step=step), "log metrics")


def log_metric_steps(rows: list[tuple[int, Mapping[str, float]]]) -> None:
    """Metrics at many steps (``(step, {key: value})`` rows) in one write (``log_batch``, in chunks
    of MLflow's 1000 metrics per call) instead of one transaction per step."""
    active = mlflow.active_run()
    if active is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(step)) for step, row in rows for k, v in row.items() if v is not None]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        chunk = metrics[i : i + 1000]
        safe(lambda: client.log_batch(active.info.run_id, metrics=chunk), "log metrics")


def set_tags(tags: Mapping[str, Any]) -> None:
    safe(lambda: mlflow.set_tags({k: str(v) for k, v in tags.items()}), "set tags")


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    safe(lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path), f"log artifact {path}")


def log_text(text: str, name: str) -> None:
    safe(lambda: mlflow.log_text(text, name), f"log {name}")


def log_dict(obj: Any, name: str) -> None:
    safe(lambda: mlflow.log_dict(obj, name), f"log {name}")


def log_table(columns: Mapping[str, list], name: str) -> None:
    """A table artifact the MLflow UI can chart (``mlflow.log_table``), columns of equal length."""
    safe(lambda: mlflow.log_table(data=dict(columns), artifact_file=name), f"log {name}")


def log_figure(fig: Any, name: str) -> None:
    safe(lambda: mlflow.log_figure(fig, name), f"log {name}")


def active_run_id() -> str | None:
    active = mlflow.active_run()
    return active.info.run_id if active else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def __getattr__(name: str) -> Any:
    """``tracking.ChildRunWriter``/``ChildRecord``: the child-run writer is a concept of its own (``child_runs``)."""
    if name in ("ChildRunWriter", "ChildRecord"):
        from datamodels_ml import child_runs

        return getattr(child_runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- models ------------------------------------------------------------------------------------
def log_pyfunc_model(python_model: Any, *, name: str, artifacts: Mapping[str, str] | None = None,
                     signature: Any = None, input_example: Any = None,
                     pip_requirements: list[str] | None = None) -> str | None:
    """Log an ``mlflow.pyfunc.PythonModel`` to the active run; return its model URI (None on failure)."""
    def _log():
        info = mlflow.pyfunc.log_model(name=name, python_model=python_model, artifacts=dict(artifacts or {}),
                                       signature=signature, input_example=input_example,
                                       pip_requirements=pip_requirements)
        return info.model_uri
    return safe(_log, f"log model {name}")


def infer_signature(model_input: Any, model_output: Any) -> Any:
    from mlflow.models import infer_signature as _infer

    return _infer(model_input, model_output)

"""Every MLflow call of the project lives here (and, for the child runs of ``train``, in ``tracking.child_runs``):
experiments, runs, parameters, metrics, artifacts, models.

Where tracking goes and how its store is made ready (the URI's check, SQLite's set-up, retries) is
``tracking.backend``'s.

Runs go to two named experiments of MLflow's model-training kind (``_experiment_for``): one for
regressions, evaluations and pipelines, one for training, whose thousands of model runs would
crowd the rest. A tracking failure never loses training results: callers write the store first and
treat tracking errors as warnings (``safe``).
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

# first: its environment defaults (progress bars, HTTP retries) are set before MLflow is imported
from datamodels_ml.tracking.backend import db_lock, prepare, retry, tracking_uri  # isort: skip

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from datamodels_ml.errors import UserError

MAX_PARAM_LEN = 6000
STAGE_TAG = "datamodels.stage"  # the command that made a run (train, regress, ...), whatever its name


_FAILURES = [0]  # tracking calls that failed in this process: the first is told, the others counted


def safe(fn: Callable[[], Any], what: str) -> Any:
    """Run a tracking call; on failure warn in one line (the data is already on disk) and return None.

    Only the first failure of a process is printed; the count of the others comes in one line at exit
    (a full database or an absent server fails every call alike)."""
    try:
        return retry(fn)
    except Exception as exc:  # noqa: BLE001
        _FAILURES[0] += 1
        if _FAILURES[0] == 1:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"warning: MLflow tracking failed ({what}): {first}; results on disk are unaffected",
                  file=sys.stderr, flush=True)
            atexit.register(_report_failures)
        return None


def _report_failures() -> None:
    if _FAILURES[0] > 1:
        print(f"warning: {_FAILURES[0] - 1} more MLflow tracking calls failed; results on disk are unaffected",
              file=sys.stderr, flush=True)


def _as_param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


# -- experiments -------------------------------------------------------------------------------
EXPERIMENT = "datamodels"  # regressions, evaluations, budgets, the demo pipeline, init, write_dataset
TRAIN_SUFFIX = "-train"  # "datamodels-train": train runs with their model-N child runs, worker runs
TRAINING_STAGES = frozenset({"train", "worker"})
KIND_TAG = "mlflow.experimentKind"  # MLflow 3's experiment type (3.17's UI reads workflowType instead: see ui)
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
    exp = retry(lambda: client.get_experiment_by_name(name))
    if exp is None:
        with db_lock(key[0]):
            exp = retry(lambda: client.get_experiment_by_name(name))  # made meanwhile by another process?
            if exp is None:
                try:
                    exp = client.get_experiment(retry(lambda: client.create_experiment(name, tags={KIND_TAG: KIND})))
                except MlflowException:  # made meanwhile through a tracking server
                    exp = retry(lambda: client.get_experiment_by_name(name))
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
    main = retry(lambda: MlflowClient().get_experiment(main_id))
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
        active = retry(lambda: mlflow.start_run(run_name=name, tags=run_tags))
        _check_experiment(retry(lambda: MlflowClient().get_experiment(active.info.experiment_id)))
    else:
        exp_id = _experiment_for(stage, parent)
        if parent is not None and exp_id != parent.info.experiment_id:
            active = _start_linked(exp_id, name, run_tags, parent, stage)
        else:
            active = retry(lambda: mlflow.start_run(experiment_id=exp_id, run_name=name, tags=run_tags,
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
        if parent is None:  # the command prints its UI link at the end (links.print_links)
            from datamodels_ml.tracking import links

            links.remember(active.info.experiment_id, active.info.run_id, name)


def _start_linked(exp_id: str, name: str, tags: dict[str, str], parent: Any, stage: str) -> mlflow.ActiveRun:
    """A run nested under ``parent`` by tags only: MLflow's parent tag across experiments would hide it."""
    from mlflow.tracking.context import registry

    tags = {**tags, "pipeline.parent_run_id": parent.info.run_id}
    with contextlib.suppress(Exception):  # source, user, git commit, as mlflow.start_run records them
        tags = registry.resolve_tags(tags)
    client = MlflowClient()
    created = retry(lambda: client.create_run(exp_id, tags=tags, run_name=name))
    safe(lambda: client.set_tag(parent.info.run_id, f"pipeline.{stage}_run_id", created.info.run_id), "link run")
    return retry(lambda: mlflow.start_run(run_id=created.info.run_id, nested=True))


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
    existing = retry(lambda: MlflowClient().get_run(active.info.run_id)).data.params
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

"""Addresses of the MLflow UI: the runs table of an experiment and the page of a run, and the run
links a command prints at its end.

MLflow 3.17's UI opens an experiment on its GenAI pages (``overview``/``traces``, a "Detect Issues"
pop-up, an Assistant panel) unless told otherwise, and what tells it is not the experiment tag
``mlflow.experimentKind`` (the UI's feature flag that derives the experiment kind from the
*workflow type* is on, so the tag is not read) but the workflow type: the ``workflowType`` URL
parameter (``genai`` or ``machine_learning``), else the browser's saved choice (local storage key
``mlflow.workflowType``), else ``genai``. No server setting changes it. So every address we print
carries ``workflowType=machine_learning`` (``ML_QUERY``): the experiment page then lands on its
runs table, whatever the browser saved. The experiment's address also sorts the runs by
``best_val_mse`` (``orderByKey``/``orderByAsc``, URL parameters of the runs page): the comparison
a user sees first. tests/tracking/test_ui.py checks these names against the installed MLflow's bundle.

A command run from the directory where ``make ui`` runs (its ``mlflow-ui.json``) on that store, or
against a tracking server (``MLFLOW_TRACKING_URI=http...``), ends by printing the address of each
run it made (``print_links``; ``runs.run`` calls ``remember``).
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

UI_FILE = "mlflow-ui.json"  # {url, backend_store_uri, pid}: written by `make ui` while it runs
ML_QUERY = "workflowType=machine_learning"
SORT_QUERY = "orderByKey=" + urllib.parse.quote("metrics.`best_val_mse`") + "&orderByAsc=true"
_RUNS: list[tuple[str, str, str]] = []  # (experiment id, run id, run name) of this process's top-level runs


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, best ``best_val_mse`` first."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{ML_QUERY}&{SORT_QUERY}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in the model-training workflow."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_QUERY}"


def _same_store(a: str, b: str) -> bool:
    def norm(uri: str) -> str:
        if uri.startswith("sqlite:///"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        if "://" not in uri:
            return str(Path(uri).resolve())
        return uri.rstrip("/")

    return norm(a) == norm(b)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def ui_base(tracking_uri: str, cwd: str | Path | None = None) -> str | None:
    """Where the UI of ``tracking_uri`` is: the tracking server itself, or the ``make ui`` started
    from ``cwd`` on the same store (its ``mlflow-ui.json``, while its process lives); else None."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    try:
        state = json.loads((Path(cwd or os.getcwd()) / UI_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _alive(state.get("pid")):
        return None
    if not _same_store(str(state.get("backend_store_uri", "")), tracking_uri):
        return None
    return str(state.get("url") or "") or None


def remember(experiment_id: str, run_id: str, name: str) -> None:
    """Note a top-level run that just ended (``tracking.run``), for ``print_links``."""
    _RUNS.append((experiment_id, run_id, name))


def print_links() -> None:
    """After a command: the UI address of each run it made, when a UI is there to open it."""
    if not _RUNS:
        return
    try:
        import mlflow

        base = ui_base(mlflow.get_tracking_uri())
    except Exception:  # noqa: BLE001 - a link is a courtesy; never fail a finished command over it
        base = None
    if base:
        for exp_id, run_id, name in _RUNS:
            print(f"MLflow run {name}: {run_url(base, exp_id, run_id)}", flush=True)
    _RUNS.clear()


# -- make ui ---------------------------------------------------------------------------------------

"""The MLflow UI: the address that opens on the runs table, ``make ui``, and the run links printed
at the end of a command.

MLflow 3.17's UI opens an experiment on its GenAI pages (``overview``/``traces``, a "Detect Issues"
pop-up, an Assistant panel) unless told otherwise, and what tells it is not the experiment tag
``mlflow.experimentKind`` (the UI's feature flag that derives the experiment kind from the
*workflow type* is on, so the tag is not read) but the workflow type: the ``workflowType`` URL
parameter (``genai`` or ``machine_learning``), else the browser's saved choice (local storage key
``mlflow.workflowType``), else ``genai``. No server setting changes it. So every address we print
carries ``workflowType=machine_learning`` (``ML_QUERY``): the experiment page then lands on its
runs table, whatever the browser saved. The experiment's address also sorts the runs by
``best_val_mse`` (``orderByKey``/``orderByAsc``, URL parameters of the runs page): the comparison
a user sees first. tests/test_ui.py checks these names against the installed MLflow's bundle.

``python -m datamodels_ml.ui`` (``make ui``) starts ``mlflow ui`` on a backend store, creates the
``datamodels`` experiment if needed, prints its runs-table address (and opens it where a browser
exists), and records the address in ``mlflow-ui.json`` in the working directory while it runs.
A command run from that directory on that store, or against a tracking server
(``MLFLOW_TRACKING_URI=http...``), ends by printing the address of each run it made (``print_links``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
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
def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _can_open_browser() -> bool:
    return bool(sys.platform == "darwin" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("BROWSER"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datamodels_ml.ui",
                                 description="mlflow ui on a backend store, opened on the runs table")
    ap.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--no-browser", action="store_true", help="print the address only")
    args = ap.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.backend_store_uri
    from datamodels_ml import tracking
    from datamodels_ml.errors import UserError

    try:
        tracking.prepare()
        exp_id = tracking.ensure_experiment(tracking.experiment_name())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
                             "--host", args.host, "--port", str(args.port)])
    state = Path(UI_FILE)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # kill PID stops mlflow ui too and removes mlflow-ui.json
    try:
        if not _wait_until_up(base, proc):
            print(f"error: mlflow ui did not start on {base} (is the port taken? make ui UI_PORT=...)",
                  file=sys.stderr)
            return 2
        url = experiment_url(base, exp_id)
        state.write_text(json.dumps({"url": base, "backend_store_uri": args.backend_store_uri,
                                     "pid": os.getpid()}) + "\n")
        print(f"\nMLflow UI, experiment '{tracking.experiment_name()}' (runs table, best best_val_mse first):\n"
              f"  {url}\n(Ctrl-C stops it)", flush=True)
        if not args.no_browser and _can_open_browser():
            import webbrowser

            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())

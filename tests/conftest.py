"""Shared test helpers: run the real CLI in a subprocess, with its own MLflow store in tmp_path."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
MAINS = ROOT / "tests" / "mains"  # training scripts the tests run (written for this tool or the original)
FIXTURES = ROOT / "tests" / "fixtures"

# the measured kernel rates of this session's tests (and of the CLI processes they start) in a
# folder of their own, not in the user's cache; removed when the session ends, with the MLflow
# template below (a test run leaves no folders in the system's temporary directory)
_SESSION_DIRS: list[Path] = []
if "DATAMODELS_CACHE_DIR" not in os.environ:
    os.environ["DATAMODELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="datamodels-cache-")
    _SESSION_DIRS.append(Path(os.environ["DATAMODELS_CACHE_DIR"]))


@atexit.register
def _remove_session_dirs() -> None:
    for folder in _SESSION_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


_TEMPLATE_DB: Path | None = None


def _template_db() -> Path:
    """An MLflow SQLite store migrated once per session; each test starts from a copy.

    Creating the schema costs seconds per database; copying a migrated file costs nothing. Artifacts
    of every copy land under the template's folder (the Default experiment's location), which
    tests reach through each run's artifact_uri like any other.
    """
    global _TEMPLATE_DB
    if _TEMPLATE_DB is None:
        from mlflow.tracking import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="datamodels-mlflow-template-"))
        _SESSION_DIRS.append(folder)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        # an engine in WAL mode may hold the last migration in mlflow.db-wal: fold it into the file
        import sqlite3

        con = sqlite3.connect(folder / "mlflow.db")
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
        _TEMPLATE_DB = folder / "mlflow.db"
    return _TEMPLATE_DB


def cli_env(cwd: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a CLI subprocess: the package importable, MLflow tracking in ``cwd/mlflow.db``."""
    db = Path(cwd) / "mlflow.db"
    if not db.exists():
        shutil.copyfile(_template_db(), db)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(cwd) / 'mlflow.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    env.setdefault("PYTHONWARNINGS", "ignore")
    if extra:
        env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
            check: bool | None = None) -> subprocess.CompletedProcess:
    """``python -m datamodels_ml ARGS`` in ``cwd``; ``check=True/False`` asserts success/failure."""
    proc = subprocess.run([sys.executable, "-m", "datamodels_ml", *args], cwd=cwd, env=cli_env(cwd, env),
                          capture_output=True, text=True, timeout=timeout)
    if check is True:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    elif check is False:
        assert proc.returncode != 0, f"expected failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def tracking_client(cwd: Path):
    """An MlflowClient on the test's own SQLite store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{Path(cwd) / 'mlflow.db'}")


EXPERIMENT, TRAIN_EXPERIMENT = "datamodels", "datamodels-train"  # where runs go by default


def search_runs(cwd: Path, filter_string: str = "", *, training: bool | None = None, **kw):
    """Runs of the test's store in the experiment of regressions, evaluations and pipelines
    (``training=False``), of training (``True``: train, worker and model-N runs), or both (None)."""
    client = tracking_client(cwd)
    names = {None: (EXPERIMENT, TRAIN_EXPERIMENT), False: (EXPERIMENT,), True: (TRAIN_EXPERIMENT,)}[training]
    ids = [e.experiment_id for e in map(client.get_experiment_by_name, names) if e is not None]
    kw.setdefault("max_results", 5000)
    return client.search_runs(ids, filter_string, **kw) if ids else []


def make_store(path, *, n=160, p=30, t=6, seed=0, noise=0.3, complete=None):
    """masks ~ Bernoulli(0.5); outputs = masks @ W + b + noise with W sparse; returns (store, W, b)."""
    import numpy as np

    from datamodels_ml.store.spec import parse_spec
    from datamodels_ml.store.store import create_store

    rng = np.random.default_rng(seed)
    spec = parse_spec({"num_models": n, "schema": {"masks": {"shape": [p], "dtype": "bool_"},
                                                   "margins": {"shape": [t], "dtype": "float32"}}})
    store = create_store(path, spec)
    w = np.zeros((p, t))
    for j in range(t):
        w[rng.choice(p, 4, replace=False), j] = rng.normal(scale=2.0, size=4)
    b = rng.normal(size=t)
    x = rng.random((n, p)) < 0.5
    y = x @ w + b + noise * rng.normal(size=(n, t))
    for i in range(n) if complete is None else complete:
        store.write_row(i, {"masks": x[i], "margins": y[i].astype(np.float32)})
    return store, w, b


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1:``port`` with its SQLite store in ``folder``; ``kill``
    stops it at once (its whole process group: the web server runs in a child process), ``start``
    brings it back on the same port and store."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.port = Path(folder), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        import time

        from mlflow.tracking import MlflowClient

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--default-artifact-root", str(self.folder / "server-artifacts"), "--workers", "1"],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client, deadline = MlflowClient(tracking_uri=self.uri), time.time() + timeout
        while True:
            try:
                client.search_experiments()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise
                time.sleep(0.5)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def kill(self) -> None:
        import signal

        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` mounted in tmp_path (root only), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a small tmpfs")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def cli(tmp_path):
    """``cli(*args, check=...)`` runs the CLI with cwd=tmp_path."""
    def _run(*args, **kw):
        return run_cli(*args, cwd=tmp_path, **kw)
    return _run


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny solver problems: one torch thread avoids OpenMP overhead on busy CI machines
    (modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

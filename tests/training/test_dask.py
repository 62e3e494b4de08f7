"""``train`` on Dask distributed, with a real engine: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1 (ephemeral ports, one thread each, no dashboard), the CLI as a subprocess.
Faults: a worker killed with kill -9 mid-run (its model runs again elsewhere, no row lost or
written twice) and the driver killed then rerun (only the missing indices run). SLURM: the job
script dask-jobqueue generates from configs/cluster/slurm.yaml (no SLURM here), with the cluster's
TLS credentials. ``scheduler=tls://`` with the user's certificates (a TLS scheduler and worker)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

from conftest import CONFIGS, MAINS, ROOT, cli_env, run_cli, search_runs  # noqa: E402
from datamodels_ml.errors import UserError  # noqa: E402

FAULTS = str(MAINS / "faults.py")
SPEC = {"num_models": 64, "schema": {"values": {"shape": [10], "dtype": "uint8"},
                                     "index": {"shape": [], "dtype": "int64"},
                                     "loss": {"shape": [], "dtype": "float32"}}}


def wait_for(predicate, what, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class LocalDask:
    """A scheduler and named single-threaded workers (no nanny: kill -9 of a worker loses it)."""

    def __init__(self, folder: Path, tls: tuple[str, ...] = ()):
        self.folder = folder
        self.file = folder / "scheduler.json"
        self.tls = tls  # --tls-ca-file CA --tls-cert CERT --tls-key KEY: the scheduler and its workers speak TLS
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        self.scheduler = self._spawn("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                     "--no-dashboard", "--scheduler-file", str(self.file),
                                     *(("--protocol", "tls", *tls) if tls else ()))
        wait_for(lambda: self.file.exists() and "address" in self.file.read_text(), "the scheduler")
        self.address = json.loads(self.file.read_text())["address"]
        self.workers: dict[str, subprocess.Popen] = {}

    def _spawn(self, name, module, *args):
        log = open(self.folder / f"{name}.log", "w")
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=self.folder, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)

    def ensure_workers(self, names=("w0", "w1")):
        for name in names:
            if name not in self.workers or self.workers[name].poll() is not None:
                (self.folder / f"{name}.log").unlink(missing_ok=True)
                self.workers[name] = self._spawn(name, "distributed.cli.dask_worker", self.address, "--name", name,
                                                 "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                                 *self.tls)
        for name in names:
            wait_for(lambda: "Registered to" in (self.folder / f"{name}.log").read_text(), f"worker {name}")

    def close(self):
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local_dask(tmp_path_factory):
    cluster = LocalDask(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def dask_cluster(local_dask):
    local_dask.ensure_workers()
    return local_dask


@pytest.fixture
def store(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    run_cli("init", "spec=spec.json", "store=st", cwd=tmp_path, check=True)
    return tmp_path / "st"


def train_args(n, address, *args):
    return ["train", "store=st", f"main={FAULTS}", f"n={n}", f"scheduler={address}", "progress=false", *args]


def calls(store):
    log = store / "calls.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def check_rows(store, n):
    done = np.load(store / "_completed.npy")
    assert done[:n].all() and not done[n:].any()
    assert (np.load(store / "values.npy")[:n] == np.arange(n)[:, None]).all()
    assert (np.load(store / "index.npy")[:n] == np.arange(n)).all()


def child_runs(tmp_path):
    runs = search_runs(tmp_path, training=True)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_train_on_a_dask_cluster_writes_every_row_once_from_the_driver(dask_cluster, store, tmp_path):
    proc = run_cli(*train_args(12, dask_cluster.address), cwd=tmp_path, check=True)
    assert "on the Dask cluster at tcp://127.0.0.1:" in proc.stdout and "2 workers, 2 threads" in proc.stdout
    assert "train: 12 completed, 0 failed, 0 not run (12/12 complete" in proc.stdout
    check_rows(store, 12)
    assert sorted(calls(store)) == list(range(12))  # each model ran once
    children = child_runs(tmp_path)
    assert sorted(int(r.data.params["index"]) for r in children) == list(range(12))
    assert {r.info.status for r in children} == {"FINISHED"}
    # a scheduler JSON file works as the address too; nothing left to do
    again = run_cli(*train_args(12, dask_cluster.file), cwd=tmp_path, check=True)
    assert "all 12 models are already complete" in again.stdout


def test_worker_killed_mid_run_its_model_runs_elsewhere_and_no_row_is_lost_or_doubled(dask_cluster, store, tmp_path):
    n = 24
    driver = subprocess.Popen([sys.executable, "-m", "datamodels_ml", *train_args(n, dask_cluster.address, "args.sleep=0.25")],
                              cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(calls(store)) >= 4, "the first models")
    os.kill(dask_cluster.workers["w0"].pid, signal.SIGKILL)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, out + err
    assert f"train: {n} completed, 0 failed" in out
    check_rows(store, n)
    ran = Counter(calls(store))
    assert set(ran) == set(range(n))
    # main ran again only for what the lost worker held: the model it was running, and results it had
    # finished but the driver had not fetched yet (Dask keeps results on the worker until gathered)
    assert max(ran.values()) <= 2 and sum(c - 1 for c in ran.values()) <= 3
    children = child_runs(tmp_path)
    assert sorted(int(r.data.params["index"]) for r in children) == list(range(n))  # one child run per model


def test_driver_killed_mid_run_then_rerun_trains_the_missing_indices_only(dask_cluster, store, tmp_path):
    n = 24
    driver = subprocess.Popen([sys.executable, "-m", "datamodels_ml", *train_args(n, dask_cluster.address, "args.sleep=0.2")],
                              cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: np.load(store / "_completed.npy").sum() >= 4, "committed models")
    driver.kill()
    driver.wait()
    done = set(np.flatnonzero(np.load(store / "_completed.npy")).tolist())
    assert 4 <= len(done) < n
    time.sleep(1.0)  # what the workers were running when the driver died finishes (its result is dropped)
    before = len(calls(store))
    proc = run_cli(*train_args(n, dask_cluster.address, "args.sleep=0.2"), cwd=tmp_path, check=True)
    assert f"training {n - len(done)} models ({len(done)} of {n} already complete)" in proc.stdout
    check_rows(store, n)
    assert not set(calls(store)[before:]) & done  # no completed model trained again


def test_user_errors_of_the_dask_back_end(dask_cluster, store, tmp_path):
    bad = run_cli("train", "store=st", f"main={FAULTS}", "n=4", "scheduler=nowhere", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert ("scheduler='nowhere': expected an address such as tcp://HOST:8786 (tls://HOST:8786) or a scheduler "
            "JSON file") in bad.stderr
    both = run_cli(*train_args(4, dask_cluster.address, "cluster=x.yaml"), cwd=tmp_path, check=False)
    assert "give scheduler=ADDRESS (a running Dask cluster) or cluster=CONFIG.yaml (start one), not both" in both.stderr
    gpu = run_cli(*train_args(4, dask_cluster.address, "gpus=1"), cwd=tmp_path, check=False)
    assert gpu.returncode == 2 and "but no worker of the Dask cluster" in gpu.stderr and "--resources GPU=1" in gpu.stderr
    missing = run_cli("train", "store=st", "main=no_such_module_xyz", "n=4", f"scheduler={dask_cluster.address}",
                      "progress=false", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "cannot import main module 'no_such_module_xyz'" in missing.stderr
    assert not np.load(store / "_completed.npy").any()


# -- SLURM through dask-jobqueue (the job script only: no SLURM here) ----------------------------------
def test_slurm_job_script_from_the_yaml(tmp_path, monkeypatch):
    from distributed.comm import get_tcp_server_addresses

    from datamodels_ml.training.dask_cluster import close_cluster, make_cluster

    monkeypatch.chdir(tmp_path)  # the jobs' log directory is created here, and the TLS credentials
    cluster, cfg = make_cluster(CONFIGS / "cluster" / "slurm.yaml")  # builds the scheduler; submits nothing
    try:
        script = cluster.job_script()
        address = cluster.scheduler.address
        http = {host for host, _ in get_tcp_server_addresses(cluster.scheduler.http_server)}
        worker = script.strip().splitlines()[-1].split()
        # the workers reach the scheduler over TLS with the files of a folder of the shared directory
        paths = {flag: Path(worker[worker.index(flag) + 1]) for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")}
        folder = paths["--tls-key"].parent
        assert folder.parent == tmp_path and folder.name.startswith(".datamodels-dask-tls-")
        assert folder.stat().st_mode & 0o777 == 0o700
        assert all(path.is_file() and path.stat().st_mode & 0o777 == 0o600 for path in paths.values())
        assert "PRIVATE KEY" in paths["--tls-key"].read_text()
    finally:
        close_cluster(cluster)
    assert not folder.exists()  # removed with the cluster
    assert address.startswith("tls://") and worker[worker.index("--protocol") + 1] == "tls://"
    assert http == {"127.0.0.1"}  # the scheduler's HTTP routes: no dashboard, on loopback only
    assert "--no-dashboard" in worker and worker[worker.index("--dashboard-address") + 1] == "127.0.0.1:0"
    for line in ["#SBATCH -p gpu", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=32",
                 "module load cuda/12.4", "source $HOME/datamodels_ml/.venv/bin/activate"]:
        assert line in script.splitlines(), line
    worker = " ".join(worker)
    assert "distributed.cli.dask_worker" in worker and "--nworkers 4" in worker and "--resources GPU=1" in worker
    assert "--nthreads 8" in worker  # 32 cores shared by 4 worker processes
    assert cfg["jobs"] == 8


@pytest.mark.parametrize("yaml, scheduler, workers", [
    ("type: local\n", {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"},
     ["--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--host", "127.0.0.1"]),
    ("type: pbs\ndashboard: true\n", {"dashboard": True, "dashboard_address": "127.0.0.1:8787"},
     ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]),
    ("type: slurm\ndashboard: ':8787'\n"
     "options: {scheduler_options: {port: 8786}, worker_extra_args: [--lifetime, 1h]}\n",
     {"dashboard": True, "dashboard_address": ":8787", "port": 8786},
     ["--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--lifetime", "1h"]),
])
def test_loopback_and_the_dashboard_only_when_asked(tmp_path, yaml, scheduler, workers):
    from datamodels_ml.training.dask_cluster import cluster_kwargs, load_cluster_config

    (tmp_path / "c.yaml").write_text(yaml)
    kwargs = cluster_kwargs(load_cluster_config(tmp_path / "c.yaml"))
    assert kwargs["scheduler_options"] == scheduler
    assert kwargs["worker_extra_args"] == workers
    assert "security" not in kwargs  # make_cluster adds the cluster's own credentials


def test_shared_directory_holds_the_credentials(tmp_path, monkeypatch):
    from datamodels_ml.training.dask_cluster import close_cluster, make_cluster

    monkeypatch.setenv("SHARED", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "c.yaml").write_text("type: slurm\nshared_directory: $SHARED\n")
    cluster, _ = make_cluster(tmp_path / "c.yaml")
    try:
        assert list((tmp_path / "scratch").glob(".datamodels-dask-tls-*/key.pem"))
        assert f"--tls-key {tmp_path / 'scratch'}/.datamodels-dask-tls-" in cluster.job_script()
    finally:
        close_cluster(cluster)
    assert list((tmp_path / "scratch").iterdir()) == []
    (tmp_path / "c.yaml").write_text(f"type: slurm\nshared_directory: {tmp_path / 'nowhere'}\n")
    with pytest.raises(UserError, match=f"cannot write the cluster's TLS credentials in {tmp_path / 'nowhere'}: "
                                        "No such file or directory"):
        make_cluster(tmp_path / "c.yaml")


@pytest.mark.parametrize("text, message", [
    ("queue: gpu\nwaltime: 1:00:00\n", "unknown key 'waltime'"),
    ("type: kubernetes\n", "type 'kubernetes' is not one of slurm, pbs"),
    ("jobs: 0\n", "jobs must be an integer >= 1, got 0"),
    ("setup: module load cuda\n", "setup must be a list of strings"),
    ("type: local\nsetup: [module load cuda]\n", "setup lines run in batch job scripts only"),
    ("type: local\ninterface: eth0\n", "type: local listens on 127.0.0.1 only; interface: is for batch clusters"),
    ("options: {security: false}\n", "options: security is set by datamodels_ml \\(every cluster it starts uses TLS"),
    ("options: {protocol: tcp://}\n", "options: protocol is set by datamodels_ml"),
    ("dashboard: 8787\n", "dashboard must be true, false or an address such as 127.0.0.1:8787, got 8787"),
    ("shared_directory: /my scratch\n", "shared_directory must be a directory path without spaces"),
])
def test_cluster_yaml_errors_name_the_key(tmp_path, text, message):
    from datamodels_ml.training.dask_cluster import load_cluster_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_cluster_config(tmp_path / "c.yaml")


def test_empty_scheduler_and_cluster_mean_the_local_slots(tmp_path, store):
    # what the MLproject's train entry point passes by default: scheduler= cluster=
    proc = run_cli("train", "store=st", f"main={FAULTS}", "n=2", "jobs=1", "scheduler=", "cluster=", "progress=false",
                   cwd=tmp_path, check=True)
    assert "on 1 CPU slot" in proc.stdout and "2 completed" in proc.stdout


@pytest.mark.parametrize("name, visible, expected", [
    ("SLURMCluster-3-2", "4,5,6,7", "6"),  # worker 2 of a 4-GPU job keeps the job's third GPU
    ("SLURMCluster-3-0", "4,5,6,7", "4"),
    ("SLURMCluster-3", "1", "1"),  # one GPU per job: nothing to choose
    ("tcp://10.0.0.1:4242", "0,1", "0,1"),  # an unnamed worker: left as it is
])
def test_each_worker_process_of_a_gpu_job_keeps_one_gpu(monkeypatch, name, visible, expected):
    from types import SimpleNamespace

    from distributed import WorkerPlugin

    from datamodels_ml.training.dask_backend import PinGPU

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    plugin = PinGPU()
    assert isinstance(plugin, WorkerPlugin)  # what Client.register_plugin accepts
    plugin.setup(SimpleNamespace(name=name))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_train_with_a_cluster_yaml_starts_scales_and_closes_the_cluster(store, tmp_path):
    # type: local runs dask-jobqueue's job scripts as local processes: the same path as SLURM, minus sbatch
    (tmp_path / "cluster.yaml").write_text(
        "type: local\njobs: 4\ncores_per_job: 1\nmemory_per_job: 1GB\nwalltime: '00:10:00'\n")
    proc = run_cli("train", "store=st", f"main={FAULTS}", "n=3", "cluster=cluster.yaml", "progress=false",
                   cwd=tmp_path, check=True, timeout=180)
    assert "(LocalCluster from cluster.yaml; " in proc.stdout
    assert "train: 3 completed, 0 failed, 0 not run (3/3 complete" in proc.stdout
    check_rows(store, 3)


def test_a_model_past_its_timeout_gets_its_worker_restarted_by_the_nanny(store, tmp_path):
    # a thread cannot be killed: the driver restarts the worker process that runs the hung main
    (tmp_path / "nanny").mkdir()
    cluster = LocalDask(tmp_path / "nanny")
    try:
        log = open(cluster.folder / "n0.log", "w")
        cluster.workers["n0"] = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.address, "--name", "n0", "--nworkers", "1",
             "--nthreads", "1", "--no-dashboard"], cwd=cluster.folder, env=cluster.env, stdout=log,
            stderr=subprocess.STDOUT)
        wait_for(lambda: "Registered to" in (cluster.folder / "n0.log").read_text(), "worker n0")
        proc = run_cli(*train_args(4, cluster.address, "args.hang=2", "timeout=5"), cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "train: 3 completed, 1 failed" in proc.stdout
        failures = (store / "_failures.json").read_text()
        assert "timed out after 5 s; its Dask worker tcp://127.0.0.1:" in failures
        assert "was restarted to stop the hung main" in failures
        pid = int((store / "hang.pid").read_text().split()[0])
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
                 "the hung worker process to end", timeout=60)
        assert calls(store).count(2) == 1  # released before the restart: not computed again
        done = np.load(store / "_completed.npy")
        assert done[[0, 1, 3]].all() and not done[2]
    finally:
        cluster.close()


# -- scheduler=tls:// with the user's certificates (Dask's config) --------------------------------------
def write_certificates(folder: Path) -> dict[str, str]:
    """A CA-signed (self-signed) certificate and its key, as a user's TLS set-up has them; the Dask
    config, as environment variables, that names them for the client."""
    from distributed.security import Security

    temporary = Security.temporary()
    (folder / "cert.pem").write_text(temporary.tls_ca_file)
    (folder / "key.pem").write_text(temporary.tls_client_key)
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(folder / "cert.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(folder / "cert.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(folder / "key.pem")}


def test_train_on_a_tls_scheduler_with_the_users_certificates(store, tmp_path):
    (tmp_path / "tls").mkdir()
    config = write_certificates(tmp_path / "tls")
    tls = ("--tls-ca-file", config["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"],
           "--tls-cert", config["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"],
           "--tls-key", config["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"])
    cluster = LocalDask(tmp_path / "tls", tls=tls)
    try:
        assert cluster.address.startswith("tls://127.0.0.1:")
        cluster.ensure_workers(("w0",))
        without = run_cli(*train_args(4, cluster.address), cwd=tmp_path, check=False)
        assert without.returncode == 2 and without.stderr.strip().splitlines() == [
            f"error: scheduler={cluster.address} needs your TLS certificates: set distributed.comm.tls.ca-file and "
            "distributed.comm.tls.client.cert in the Dask config (or DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT; a key file apart from the certificate: "
            "distributed.comm.tls.client.key)"]
        proc = run_cli(*train_args(4, cluster.address), cwd=tmp_path, env=config, check=True)
        assert f"on the Dask cluster at {cluster.address} (1 workers, 1 threads)" in proc.stdout
        check_rows(store, 4)
    finally:
        cluster.close()


def test_tls_certificates_that_cannot_be_used_are_named(tmp_path):
    import dask

    from datamodels_ml.training.dask_tls import client_security

    assert client_security("tcp://127.0.0.1:8786") is None  # plain TCP: Dask's defaults, as before
    config = write_certificates(tmp_path)
    keys = {"ca_file": "distributed.comm.tls.ca-file", "cert": "distributed.comm.tls.client.cert",
            "key": "distributed.comm.tls.client.key"}
    files = {"ca_file": config["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"],
             "cert": config["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"],
             "key": config["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"]}
    with dask.config.set({keys[k]: v for k, v in files.items()}):
        assert client_security("tls://10.0.0.1:8786").tls_client_key == files["key"]
    with dask.config.set({keys["ca_file"]: files["ca_file"], keys["cert"]: str(tmp_path / "no.pem")}):
        with pytest.raises(UserError, match=f"^scheduler=tls://h:1: {tmp_path / 'no.pem'} "
                                            r"\(distributed.comm.tls.client.cert\) is not a file$"):
            client_security("tls://h:1")
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    with dask.config.set({keys["ca_file"]: files["ca_file"], keys["cert"]: str(tmp_path / "bad.pem")}):
        with pytest.raises(UserError, match="^scheduler=tls://h:1: cannot use the TLS certificates of the Dask "
                                            f"config \\({files['ca_file']}, {tmp_path / 'bad.pem'}\\): "):
            client_security("tls://h:1")

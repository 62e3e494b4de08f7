"""Fault suite, Dask side: the cluster that ``train ... cluster=`` starts, attacked from outside while
it trains. Another process on the same machine connects to its scheduler with ``tcp://``, with
``tls://`` and no credentials, and with ``tls://`` and credentials of its own: each connection fails,
the function sent to ``run_on_scheduler`` never runs, every listener of the driver and of its
workers is on 127.0.0.1, and the train still completes every row once (real processes: the CLI,
dask-jobqueue's job scripts run as local processes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")
psutil = pytest.importorskip("psutil")

from conftest import MAINS, cli_env, run_cli  # noqa: E402

FAULTS = str(MAINS / "faults.py")
SPEC = {"num_models": 16, "schema": {"values": {"shape": [10], "dtype": "uint8"},
                                     "index": {"shape": [], "dtype": "int64"},
                                     "loss": {"shape": [], "dtype": "float32"}}}
LOCAL = "type: local\njobs: 2\ncores_per_job: 1\nmemory_per_job: 1GB\nwalltime: '00:10:00'\n"

# run in another process: reach the scheduler three ways and try to run code in the train driver
ATTACK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from distributed import Client
    from distributed.security import Security

    port, marker = sys.argv[1:]
    for address, security in [(f"tcp://127.0.0.1:{port}", None), (f"tls://127.0.0.1:{port}", None),
                              (f"tls://127.0.0.1:{port}", Security.temporary())]:  # a certificate of its own
        try:
            client = Client(address, timeout=3, security=security)
            client.run_on_scheduler(lambda: Path(marker).write_text("ran in the driver"))
            print("CONNECTED", address)
        except Exception as exc:
            print("REFUSED", address, type(exc).__name__)
""")


def listeners(pid: int) -> list[tuple[str, int]]:
    """(IP, port) of every listening socket of the process and of its descendants."""
    found = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_the_cluster_scheduler_refuses_outsiders_and_listens_on_loopback(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    run_cli("init", "spec=spec.json", "store=st", cwd=tmp_path, check=True)
    (tmp_path / "cluster.yaml").write_text(LOCAL)
    n = 16
    tmp = tmp_path / "tmp"  # the driver's temporary directory: type: local writes its TLS credentials there
    tmp.mkdir()
    driver = subprocess.Popen([sys.executable, "-m", "datamodels_ml", "train", "store=st", f"main={FAULTS}", f"n={n}",
                               "cluster=cluster.yaml", "progress=false", "args.sleep=0.4"],
                              cwd=tmp_path, env=cli_env(tmp_path, {"TMPDIR": str(tmp)}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = driver.stdout.readline()  # "training 16 models ... on the Dask cluster at ADDRESS (...)"
        found = re.search(r"on the Dask cluster at (\w+)://([\d.]+):(\d+)", line)
        assert found, line + driver.stderr.read()
        scheme, host, port = found.groups()
        assert (scheme, host) == ("tls", "127.0.0.1"), line
        deadline = time.time() + 60
        while not (tmp_path / "st" / "calls.log").exists():  # the workers run models
            assert time.time() < deadline and driver.poll() is None, "no model started"
            time.sleep(0.1)
        assert len(list(tmp.glob(".datamodels-dask-tls-*/key.pem"))) == 1
        ports = listeners(driver.pid)
        assert int(port) in {p for _, p in ports}
        assert len(ports) >= 5  # the scheduler, its HTTP endpoints, nannies and workers: all counted
        assert all(ip == "127.0.0.1" for ip, _ in ports), ports
        assert 8787 not in {p for _, p in ports}  # no dashboard unless the YAML asks for one

        marker = tmp_path / "pwned"
        attack = subprocess.run([sys.executable, "-c", ATTACK, port, str(marker)], capture_output=True, text=True,
                                timeout=120)
        assert attack.stdout.count("REFUSED") == 3 and "CONNECTED" not in attack.stdout, attack
        assert not marker.exists()
        assert driver.poll() is None  # the attacks ended while the train still ran
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, out + err
    assert f"train: {n} completed, 0 failed, 0 not run ({n}/{n} complete" in out
    done = np.load(tmp_path / "st" / "_completed.npy")
    assert done[:n].all()
    assert (np.load(tmp_path / "st" / "values.npy")[:n] == np.arange(n)[:, None]).all()
    calls = [int(x) for x in (tmp_path / "st" / "calls.log").read_text().split()]
    assert sorted(calls) == list(range(n))  # each model trained once
    assert not list(tmp.glob(".datamodels-dask-tls-*"))  # the credentials left with the cluster

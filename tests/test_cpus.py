"""Thread counts that follow the CPU allotment (datamodels_ml.cpus) and every command's threads=."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from datamodels_ml import cpus
from conftest import ROOT, run_cli

needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 CPUs in the affinity mask")


def _python(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@needs_two
def test_thread_counts_follow_an_affinity_mask():
    # one CPU in the mask of a machine with more: torch's and OpenBLAS's pools hold one thread
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "import datamodels_ml, torch, numpy; from threadpoolctl import threadpool_info; "
            "from datamodels_ml.cpus import allotment; "
            "print(allotment(), torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], "
            "max(i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'))")
    assert _python(code).split() == ["1", "1", "1", "1"]
    # the user's own setting is left alone
    assert _python(code, {"OMP_NUM_THREADS": "2"}).split()[2] == "2"


def test_a_cgroup_quota_caps_the_allotment(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert cpus.cgroup_quota(str(tmp_path)) == 1.5
    assert cpus.allotment(str(tmp_path)) == min(2, cpus.affinity())  # rounded up
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpus.allotment(str(tmp_path)) == 1  # never below one
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_quota(str(tmp_path)) is None
    assert cpus.allotment(str(tmp_path)) == cpus.affinity()
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_quota(str(v1)) == 1.0 and cpus.allotment(str(v1)) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cpus.cgroup_quota(str(v1)) is None
    assert cpus.cgroup_quota(str(tmp_path / "none")) is None


def test_set_threads_sizes_torch_and_blas_and_refuses_a_negative_count(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored afterwards
    try:
        assert cpus.set_threads(1) == 1
        assert torch.get_num_threads() == 1 and os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
        assert cpus.set_threads(0) == cpus.allotment()
    finally:
        cpus.set_threads(before)
    with pytest.raises(ValueError, match=r"^threads must be >= 0 \(0: every CPU allotted\), got -1$"):
        cpus.set_threads(-1)


def test_every_command_takes_threads(tmp_path):
    for command in ("init", "status", "train", "worker", "write_dataset", "regress", "evaluate", "budget", "demo"):
        out = run_cli(command, "--help", cwd=tmp_path)
        assert "threads" in out.stdout, command
    bad = run_cli("status", f"store={tmp_path / 's'}", "threads=two", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: threads must be a whole number >= 0 (0: every CPU allotted), got 'two'"
    # the setting reaches the command (and its children): a store's status with one thread
    ok = run_cli("status", f"store={tmp_path / 's'}", "--threads", "1", cwd=tmp_path, check=False)
    assert "threads" not in ok.stderr  # taken by the CLI, not refused as an unknown key


def test_the_path_takes_fewer_threads_while_other_processes_are_busy(tmp_path, monkeypatch):
    # procs_running counts every runnable thread; ours are taken out
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    own = cpus._own_running()
    assert cpus.running_elsewhere(samples=3, interval=0, stat=str(stat)) == max(0, 3 - own)
    monkeypatch.setattr(cpus, "allotment", lambda: 4)
    monkeypatch.setattr(cpus, "_USER", [0])
    assert cpus.threads_now(others=0) == 4
    assert cpus.threads_now(others=3) == 1
    assert cpus.threads_now(others=9) == 1  # never below one
    assert cpus.threads_now(2, others=3) == 2  # the user's threads= wins
    monkeypatch.setattr(cpus, "_USER", [3])
    assert cpus.threads_now(others=3) == 3


def test_threads_during_restores_the_pools():
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    blas_before = blas()
    with cpus.threads_during(1):
        assert torch.get_num_threads() == 1 and all(n == 1 for n in blas())
    assert torch.get_num_threads() == before and blas() == blas_before

"""The CPUs this process may use, and the thread counts that follow from them.

A SLURM job, a container or ``taskset`` gives a process fewer CPUs than the machine has: as an
affinity mask (``os.sched_getaffinity``) or as a cgroup CPU quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1). OpenMP and OpenBLAS size their pools from the
mask at best, never from the quota, and a pool larger than the allotment makes every parallel
operation wait for threads that the kernel is not running. :func:`allotment` is the smaller of the
two (a quota rounded up, as Go's runtime does); :func:`set_threads` sizes torch's and the BLAS
pools to it or to the user's ``threads=``.

Imports only the standard library: ``import datamodels_ml`` calls :func:`environment_defaults`
before numpy and torch load their thread pools.
"""

from __future__ import annotations

import math
import os
import sys

__all__ = ["affinity", "cgroup_quota", "allotment", "set_threads", "environment_defaults", "running_elsewhere",
           "threads_now", "threads_during"]

_POOLS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def affinity() -> int:
    """CPUs in this process's affinity mask (the machine's count where there is no such call)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_dirs(root: str) -> list[str]:
    """This process's cgroup directories under ``root`` (v2's single path, v1's cpu controller)."""
    out = []
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and (parts[0] == "0" or "cpu" in parts[1].split(",")):
                    rel = parts[2].lstrip("/")
                    sub = "" if parts[0] == "0" else next(
                        (d for d in ("cpu,cpuacct", "cpu", "cpuacct,cpu") if os.path.isdir(os.path.join(root, d))), "")
                    out.append(os.path.join(root, sub, rel))
                    out.append(os.path.join(root, sub))
    except OSError:
        pass
    out.append(root)
    return out


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited."""
    for d in _cgroup_dirs(root):
        try:
            with open(os.path.join(d, "cpu.max")) as fh:  # v2: "max 100000" or "150000 100000"
                quota, _, period = fh.read().strip().partition(" ")
            if quota != "max" and float(period or 100000) > 0:
                return float(quota) / float(period or 100000)
            return None
        except (OSError, ValueError):
            pass
        try:  # v1
            with open(os.path.join(d, "cpu.cfs_quota_us")) as fh:
                quota_us = float(fh.read().strip())
            with open(os.path.join(d, "cpu.cfs_period_us")) as fh:
                period_us = float(fh.read().strip())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            pass
    return None


def allotment(root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup quota (rounded up)."""
    n = affinity()
    quota = cgroup_quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def environment_defaults() -> None:
    """Before numpy and torch load: size their pools to the allotment where it is below the
    machine's core count and the user has not set them (children inherit it)."""
    n = allotment()
    if n < (os.cpu_count() or n):
        for var in _POOLS:
            os.environ.setdefault(var, str(n))


_USER = [0]  # the threads= the user gave (0: none)


def set_threads(threads: int = 0) -> int:
    """Size torch's and the BLAS libraries' pools to ``threads`` (0: the allotment), now and for
    child processes; returns the count. A negative count is refused."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: every CPU allotted), got {threads}")
    n = threads or allotment()
    _USER[0] = threads
    for var in _POOLS:
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n, user_api="blas")
        except Exception:  # noqa: BLE001 - no threadpoolctl: the environment holds for children
            pass
    return n


def _running(path: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _own_running() -> int:
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as fh:
                    n += fh.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                pass
    except OSError:
        pass
    return n


def running_elsewhere(samples: int = 7, interval: float = 0.003, stat: str = "/proc/stat") -> int:
    """Threads of other processes running or waiting for a CPU now: the median over ``samples`` of
    the kernel's ``procs_running`` less this process's running threads (0 where unknown)."""
    import time

    counts = []
    for i in range(samples):
        counts.append(max(0, _running(stat) - _own_running()))
        if i + 1 < samples:
            time.sleep(interval)
    counts.sort()
    return counts[len(counts) // 2]


def threads_now(threads: int = 0, *, others: int | None = None) -> int:
    """The threads for the next stretch of many short parallel operations (a lasso path): the
    user's ``threads=`` if given, else the allotment less the CPUs that other processes keep busy,
    at least one. On 2 cores shared with 2 busy processes, 2 threads made the digits-shaped path
    4.5x slower than idle (each operation waits for a thread the kernel is not running), 1 thread
    2.3x (``docs/benchmarks.md``)."""
    if threads or _USER[0]:
        return threads or _USER[0]
    busy = running_elsewhere() if others is None else others
    return max(1, allotment() - busy)


class threads_during:
    """Within the block, torch's and the BLAS pools hold ``n`` threads (this thread's OpenMP count,
    MKL's and OpenBLAS's global ones); restored after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> int:
        import torch

        self.before = torch.get_num_threads()
        self.limits = None
        if self.n != self.before:
            try:  # first: it notes every pool's count (OpenMP's too) to restore them
                from threadpoolctl import threadpool_limits

                self.limits = threadpool_limits(self.n, user_api="blas")
            except Exception:  # noqa: BLE001 - no threadpoolctl: torch's pool only
                self.limits = None
            torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc) -> None:
        import torch

        if self.n != self.before:
            if self.limits is not None:
                self.limits.restore_original_limits()
            torch.set_num_threads(self.before)

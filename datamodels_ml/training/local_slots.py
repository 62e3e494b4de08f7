"""The local back end of ``train``: slots on this machine, one long-lived runner process each.

A slot is a thread (joblib's threading backend) that supervises one long-lived runner process
(``datamodels_ml.training.runner_child``) started with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPU (or to
nothing on CPU slots). The runner imports main, torch and friends once and then trains index after
index, so a model costs only its own work plus a pipe round trip, not a Python start-up. If main
hangs past the timeout (the slot kills the runner's process group: ``training.runner_parent``) or kills its
process, the slot records the failure, starts a fresh runner and goes on; a slot whose runner keeps
dying stops the run with one message. Runners write rows into the store themselves (``write_data``);
the driver (``training.train``) commits them. The back-end interface is described in ``training.train.Backend``.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from datamodels_ml.cpus import allotment
from datamodels_ml.errors import UserError
from datamodels_ml.training.runner_parent import RunnerProcess
from datamodels_ml.training.run_model import ModelResult


def slot_environments(gpus: int, jobs: int) -> list[dict[str, str]]:
    """Environment overrides per slot: slot s sees GPU s mod G only, or no GPU on CPU slots."""
    if gpus < 0 or jobs < 0:
        raise UserError("gpus and jobs must be non-negative")
    if gpus == 0:
        n_slots = jobs or allotment()
        return [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(n_slots)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # "" hides every GPU; unset shows them all
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else [str(i) for i in range(gpus)]
    if len(ids) < gpus:
        raise UserError(f"gpus={gpus} but CUDA_VISIBLE_DEVICES lists only {len(ids)} devices ({visible})")
    n_slots = jobs or gpus
    return [{"CUDA_VISIBLE_DEVICES": ids[s % gpus]} for s in range(n_slots)]


def check_gpus_visible(gpus: int) -> None:
    """Refuse ``gpus=G`` when torch in this (the driver's) process sees fewer than G CUDA devices.

    Without the check, G slots would start anyway and train on the CPU, G processes on however
    few cores there are. Called before any store is touched; the Dask back end checks its workers'
    GPUs instead (they are not on this machine).
    """
    if gpus <= 0:
        return
    import torch

    count = torch.cuda.device_count()  # 0 with a CPU-only build, no driver or no device
    if count >= gpus:
        return
    why = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
    raise UserError(f"gpus={gpus} but torch sees {count} CUDA device{'' if count == 1 else 's'}{why}: "
                    "to train on CPU slots, drop gpus= and give jobs=N (make train JOBS=N)")


class LocalSlots:
    """Runs indices on slots; results arrive on ``self.results``.

    A slot whose runner dies ``MAX_DEATHS_IN_ROW`` times in a row without completing a model (a
    full disk under the store's memmaps kills every writer with SIGBUS; a broken GPU kills its slot)
    stops the whole run: ``self.deaths`` then says which indices were burned and how each runner died.
    """

    MAX_DEATHS_IN_ROW = 3

    def __init__(self, job: dict[str, Any], envs: list[dict[str, str]], todo: list[int], timeout: float | None):
        self.job = job
        self.envs = envs
        self.timeout = timeout
        self.todo: queue.Queue[int] = queue.Queue()
        for i in todo:
            self.todo.put(i)
        self.results: queue.Queue[ModelResult | tuple[str, str]] = queue.Queue()
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.deaths: str | None = None
        self._runners: set[RunnerProcess] = set()
        self._lock = threading.Lock()

    def _name(self, slot: int) -> str:
        gpu = self.envs[slot].get("CUDA_VISIBLE_DEVICES")
        return f"slot {slot}" + (f" (GPU {gpu})" if gpu else "")

    def _start(self, slot: int) -> RunnerProcess | None:
        runner = RunnerProcess(self.job, self.envs[slot])
        with self._lock:
            self._runners.add(runner)
        fatal = runner.wait_ready()
        if fatal is not None:
            if not self.stop.is_set():  # not a runner that kill_all stopped while it started
                self.fatal = fatal if not fatal.startswith("the runner process") else f"{self._name(slot)}: {fatal}"
                self.stop.set()
            self._close(runner, kill=True)
            return None
        return runner

    def _close(self, runner: RunnerProcess, kill: bool) -> None:
        with self._lock:
            self._runners.discard(runner)
        runner.stop(kill=kill)

    def slot(self, slot: int) -> None:
        """Pull indices until none are left (one joblib task per slot)."""
        runner = None
        burned: list[tuple[int, str]] = []  # deaths since this slot last completed a model
        while not self.stop.is_set():
            try:
                index = self.todo.get_nowait()
            except queue.Empty:
                break
            if runner is None:
                runner = self._start(slot)
                if runner is None:
                    self.todo.put(index)
                    return
            result, outcome = runner.train(index, self.timeout)
            death = runner.death
            if outcome != RunnerProcess.OK:  # timed out (killed already) or died: a fresh runner next
                self._close(runner, kill=True)
                runner = None
                if self.stop.is_set():  # killed by kill_all: not the model's fault
                    self.todo.put(index)
                    break
            self.results.put(result)
            if result.status == "completed":
                burned.clear()
            elif outcome == RunnerProcess.DEAD:
                burned.append((index, death))
                if len(burned) >= self.MAX_DEATHS_IN_ROW:
                    self._stop_after_deaths(slot, burned)
                    break
        if runner is not None:
            self._close(runner, kill=self.stop.is_set())

    def _stop_after_deaths(self, slot: int, burned: list[tuple[int, str]]) -> None:
        with self._lock:
            if self.deaths is None:
                deaths = "; ".join(f"index {i}: {why}" for i, why in burned)
                self.deaths = (f"train stopped: the runner of {self._name(slot)} died {len(burned)} times in a row "
                               f"without completing a model ({deaths}); those indices stay incomplete, "
                               "rerun the same command to retry them once the cause is fixed")
        self.stop.set()

    def run(self) -> None:
        from joblib import Parallel, delayed

        try:
            Parallel(n_jobs=len(self.envs), backend="threading")(delayed(self.slot)(s) for s in range(len(self.envs)))
        finally:
            self.results.put(("done", ""))

    def kill_all(self) -> None:
        self.stop.set()
        with self._lock:
            runners = list(self._runners)
        for r in runners:
            r.kill()

    def describe(self) -> str:
        gpu = any(env.get("CUDA_VISIBLE_DEVICES") for env in self.envs)
        n = len(self.envs)
        return f"on {n} {'GPU' if gpu else 'CPU'} slot{'s' if n > 1 else ''}"

    def params(self) -> dict[str, Any]:
        return {"jobs": len(self.envs)}

    def close(self) -> None:
        """Nothing to release: every runner is stopped by its slot (or by ``kill_all``)."""

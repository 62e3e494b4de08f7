"""The Dask back end of ``train``: models run as tasks on a Dask distributed cluster.

Data path. Each task (``train_task``, run on a Dask worker) imports the user's main once per worker
process (``_MAINS``), calls it for one index and *returns* its outputs (numpy arrays, a few KB) to
the driver. The driver is the only writer of the store: this back end writes each returned row
with ``Store.write_data`` (which validates it against the spec) from its thread in the driver
process, and the driver commits rows and logs child runs as it does for local slots. Workers need
no shared file system and never touch the store or the MLflow database.

Main's ``logdir`` on a worker: ``<store>/workers/<index>`` when the store's directory exists on that
worker (same machine, or a shared file system), else ``<tmp>/datamodels_ml/<store name>/<index>`` on
the worker's local disk (``tempfile.gettempdir()``), left there.

Faults. A worker lost mid-task (kill -9, a node gone) makes the scheduler run its tasks again on
other workers: the one it was running and those whose results it held, not fetched yet (up to
``distributed.scheduler.allowed-failures`` times, then ``KilledWorker``: the model is recorded
failed). The driver gets one result per index whatever happened, so no row is
written twice. Killing the driver cancels its tasks (the scheduler drops a disconnected client's
work); rows it had committed stay complete and a rerun trains the missing indices only.

GPUs: with ``gpus=G`` (G > 0) every task asks for the worker resource ``{"GPU": 1}``, so a worker
started with ``--resources GPU=1`` runs one model at a time per GPU; ``PinGPU`` gives each worker
process of a multi-GPU job its own ``CUDA_VISIBLE_DEVICES``. A per-model ``timeout`` records the model
failed; since a thread cannot be killed, the driver then restarts that worker process through its
nanny (``Client.restart_workers``), which stops the hung main and frees its CPU or GPU (Dask
reschedules the worker's other tasks). A worker started without a nanny cannot be restarted: the
model's error says so and the hung main runs on.

Security (``training.dask_tls``): a ``cluster=`` cluster speaks mutual TLS with temporary credentials, so only
this driver and its workers reach its scheduler; ``scheduler=tls://...`` connects with the user's
certificates from the Dask config.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import traceback
import uuid
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from distributed import WorkerPlugin, get_worker

from datamodels_ml.errors import UserError
from datamodels_ml.store.store import WORKERS_DIR, RowError, Store
from datamodels_ml.store.safe_open import make_store_dir
from datamodels_ml.training.run_model import ModelResult, load_main, nonfinite_keys, scalar_outputs

CONNECT_TIMEOUT = 30.0  # seconds to reach the scheduler
WINDOW = 256  # tasks in flight at least; more on a big cluster (4 per worker thread)

# -- the worker's side ---------------------------------------------------------------------------
_MAINS: dict[str, Callable[..., Any]] = {}  # main target -> main: one import per worker process
_MAINS_LOCK = threading.Lock()


def _main(target: str, argv: list[str]) -> Callable[..., Any]:
    """main, imported once per worker process (with the script's sys.argv set first, see ``load_main``)."""
    key = "\0".join([target, *argv])
    with _MAINS_LOCK:
        if key not in _MAINS:
            _MAINS[key] = load_main(target, argv)
        return _MAINS[key]


def _logdir(store: str, index: int) -> Path:
    if os.path.isdir(store):
        return Path(store) / "workers" / str(index)
    return Path(tempfile.gettempdir()) / "datamodels_ml" / Path(store).name / str(index)


def _to_numpy(outputs: Any) -> Any:
    """Tensors (CUDA ones included) become numpy arrays, so the driver needs no GPU to read them."""
    if not isinstance(outputs, dict):
        return outputs  # the driver's validation names the problem
    out = {}
    for key, value in outputs.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = value
    return out


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], timeout: float | None) -> Any:
    """``fn(**kwargs)``; with a timeout in a daemon thread, abandoned when late (a thread cannot be
    killed: the driver restarts the worker process, see :meth:`DaskFanout._stop_hung`)."""
    if not timeout:
        return fn(**kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"model-{kwargs.get('index')}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def train_task(job: dict[str, Any], index: int, timeout: float | None = None) -> dict[str, Any]:
    """Run on a Dask worker: train ``index``; return its outputs (never raises for main's faults)."""
    try:
        fn = _main(job["main"], list(job.get("argv", ())))
    except UserError as exc:
        return {"index": index, "fatal": str(exc)}
    logdir = _logdir(job["store"], index)
    start = time.perf_counter()
    try:
        if os.path.isdir(job["store"]):  # never through a link planted in the store
            make_store_dir(job["store"], Path(WORKERS_DIR) / str(index))
        else:
            logdir.mkdir(parents=True, exist_ok=True)
        outputs = _to_numpy(_call(fn, dict(job["args"], index=index, logdir=str(logdir)), timeout))
    except TimeoutError as exc:
        try:
            worker = get_worker().address
        except ValueError:  # not in a worker (tests calling the task directly)
            worker = None
        return {"index": index, "status": "failed", "duration": time.perf_counter() - start, "error": str(exc),
                "hung_worker": worker}
    except BaseException:  # noqa: BLE001 - a failing main (sys.exit included) is recorded, never fatal
        return {"index": index, "status": "failed", "duration": time.perf_counter() - start,
                "error": traceback.format_exc()}
    return {"index": index, "status": "completed", "duration": time.perf_counter() - start, "outputs": outputs}


class PinGPU(WorkerPlugin):
    """Worker plugin: worker process k of a job that sees GPUs a,b,c,... keeps only the k-th.

    dask-jobqueue starts ``processes`` worker processes per job, named ``<job>-0``, ``<job>-1``, ...;
    all of them see every GPU of the job. Set before the first task, so before main imports torch.
    """

    name = "datamodels-pin-gpu"

    def setup(self, worker: Any) -> None:
        ids = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        rank = str(worker.name).rsplit("-", 1)[-1]
        if len(ids) > 1 and rank.isdigit():
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[int(rank) % len(ids)]


# -- the driver's side ---------------------------------------------------------------------------
def _resolve_main(main: str) -> str:
    """A .py path becomes absolute (workers start elsewhere); a dotted module stays as it is."""
    if (main.endswith(".py") or os.sep in main) and os.path.isfile(main):
        return str(Path(main).resolve())
    return main


class DaskFanout:
    """Submits one task per index (a bounded window of them), writes each returned row, reports."""

    def __init__(self, store: Store, job: dict[str, Any], todo: list[int], timeout: float | None, *,
                 scheduler: str = "", cluster: str = "", gpus: int = 0):
        import distributed

        self.store = Store(store.path)  # this thread's own maps; the driver commits through its own
        # absolute paths: a worker on this machine (or on a shared file system) finds them from its own cwd
        self.job = dict(job, main=_resolve_main(job["main"]), store=str(Path(job["store"]).resolve()))
        self.todo = list(todo)
        self.timeout = timeout
        self._hung: dict[int, str] = {}  # index -> the worker whose thread still runs its main
        self.gpus = gpus
        self.results: queue.Queue[ModelResult | tuple[str, str]] = queue.Queue()
        self.fatal: str | None = None
        self.deaths: str | None = None
        self.stop = threading.Event()
        self._futures: dict[str, tuple[Any, int]] = {}
        self._lock = threading.Lock()
        self._window_at, self._window_size = -1e9, WINDOW
        self.cluster = None
        self.where = scheduler
        if cluster:
            from datamodels_ml.training.dask_cluster import start_cluster

            self.cluster, ccfg = start_cluster(cluster, gpus=gpus)
            self.gpus = gpus or ccfg["gpus_per_job"]  # GPU workers: every model asks for one GPU
            per_job, max_jobs = ccfg["gpus_per_job"] or 1, ccfg["jobs"]
            self.where = f"{type(self.cluster).__name__} from {cluster}"
            address: Any = self.cluster
            security = None  # the cluster's own temporary credentials (dask_tls)
        else:
            from datamodels_ml.training.dask_tls import client_security

            address = _scheduler_address(scheduler)
            security = client_security(address)
        try:
            self.client = distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False,
                                             security=security)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise UserError(f"cannot reach the Dask scheduler at {scheduler or cluster}: {exc}") from None
        if self.cluster is not None:  # scaled to the work: no more worker processes than models
            self.cluster.scale(jobs=min(max_jobs, -(-len(todo) // per_job)))
        elif gpus:
            self._check_gpu_workers()
        if self.gpus:
            self.client.register_plugin(PinGPU())

    def _check_gpu_workers(self) -> None:
        workers = self.client.scheduler_info().get("workers", {})
        if workers and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
            self.close()
            raise UserError(f"gpus={self.gpus}: each model asks for the worker resource GPU=1, but no worker of the "
                            f"Dask cluster at {self.where} has it (start them with --resources GPU=1, one per GPU)")

    def describe(self) -> str:
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        what = f"{len(workers)} workers, {threads} threads" if workers else "no workers yet: waiting for them"
        gpu = ", one model per GPU (resource GPU=1)" if self.gpus else ""
        where = "" if self.where == self.client.scheduler.address else f"{self.where}; "
        return f"on the Dask cluster at {self.client.scheduler.address} ({where}{what}{gpu})"

    def params(self) -> dict[str, Any]:
        return {"backend": "dask", "scheduler": self.client.scheduler.address}

    def _window(self) -> int:
        """Tasks to keep in flight: 4 per worker thread (the cluster may grow), at least ``WINDOW``."""
        now = time.monotonic()
        if now - self._window_at > 5.0:
            self._window_at = now
            try:
                threads = sum(w.get("nthreads", 0) for w in self.client.scheduler_info()["workers"].values())
            except Exception:  # noqa: BLE001 - the scheduler is slow to answer: keep the last value
                threads = 0
            self._window_size = max(WINDOW, 4 * threads, self._window_size)
        return self._window_size

    def _submit(self, pending: Any, ac: Any) -> None:
        resources = {"GPU": 1} if self.gpus else None
        for index in islice(pending, max(0, self._window() - len(self._futures))):
            key = f"datamodels-{index}-{uuid.uuid4().hex[:8]}"
            future = self.client.submit(train_task, self.job, index, self.timeout, key=key, pure=False,
                                        resources=resources)
            with self._lock:
                self._futures[future.key] = (future, index)
            ac.add(future)

    def run(self) -> None:
        from distributed import as_completed

        try:
            pending = iter(self.todo)
            ac = as_completed(loop=self.client.loop)
            self._submit(pending, ac)
            for future in ac:
                with self._lock:
                    _, index = self._futures.pop(future.key)
                if self.stop.is_set():
                    break
                result = self._absorb(future, index)
                future.release()  # before a restart below: a key still wanted would be computed again
                if result is not None and result.status == "failed" and result.error.startswith("timed out"):
                    result.error += self._stop_hung(self._hung.pop(index, None))
                if result is None:
                    self.kill_all()
                    break
                self.results.put(result)
                self._submit(pending, ac)
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler went away: stop with one message
            self.deaths = (f"train stopped: the Dask back end failed ({type(exc).__name__}: {exc}); "
                           "completed models are kept, rerun the same command to resume")
            self.kill_all()
        finally:
            self.results.put(("done", ""))

    def _absorb(self, future: Any, index: int) -> ModelResult | None:
        """Write the row a finished task returned; the result to report (None: the run must stop)."""
        if future.status == "cancelled":
            self.deaths = (f"train stopped: the Dask scheduler cancelled model {index} (scheduler restarted or "
                           "lost?); completed models are kept, rerun the same command to resume")
            self.stop.set()
            return None
        if future.status == "error":
            exc = future.exception()
            if type(exc).__name__ == "KilledWorker":
                return ModelResult(index, "failed", error=f"the Dask workers running this model died: {exc}")
            return ModelResult(index, "failed", error="".join(traceback.format_exception(exc)))
        out = future.result()
        if "fatal" in out:
            self.fatal = out["fatal"]
            self.stop.set()
            return None
        if out["status"] != "completed":
            if out.get("hung_worker"):
                self._hung[index] = out["hung_worker"]
            return ModelResult(index, "failed", out["duration"], error=out["error"])
        try:
            rows = self.store.write_data(index, out["outputs"])
        except RowError as exc:
            return ModelResult(index, "failed", out["duration"], error=f"invalid result: {exc}")
        except Exception:  # noqa: BLE001 - e.g. a full disk: recorded, the row stays incomplete
            return ModelResult(index, "failed", out["duration"], error=traceback.format_exc())
        return ModelResult(index, "completed", out["duration"], scalars=scalar_outputs(self.store, rows),
                           nonfinite=nonfinite_keys(rows))

    def _stop_hung(self, worker: str | None) -> str:
        """Restart (through its nanny) the worker whose model timed out: the only way to stop the
        hung main, which would otherwise hold the worker's CPU or GPU. Its other tasks, if any,
        are rescheduled by Dask. Returns what to add to the model's error."""
        if worker is None:
            return ""
        try:
            status = self.client.restart_workers([worker], timeout=120, raise_for_error=False).get(worker, "?")
        except Exception as exc:  # noqa: BLE001 - e.g. a worker without a nanny
            status = f"{type(exc).__name__}: {exc}"
        if status == "OK":
            return f"; its Dask worker {worker} was restarted to stop the hung main"
        return (f"; its Dask worker {worker} could not be restarted ({status}; workers need a nanny): "
                "the hung main keeps running there")

    def kill_all(self) -> None:
        """Cancel every task not finished yet (one that runs finishes on its worker; its result is dropped)."""
        self.stop.set()
        with self._lock:
            futures = [f for f, _ in self._futures.values()]
        if futures:
            try:
                self.client.cancel(futures)
            except Exception:  # noqa: BLE001 - the scheduler is gone: nothing runs for us any more
                pass

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.cluster is not None:
            from datamodels_ml.training.dask_cluster import close_cluster

            close_cluster(self.cluster)


def _scheduler_address(scheduler: str) -> Any:
    """``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (any Dask protocol) as it is; a scheduler JSON file
    becomes its address."""
    if "://" in scheduler:
        return scheduler
    if os.path.isfile(scheduler):
        import json

        try:
            return json.loads(Path(scheduler).read_text())["address"]
        except (ValueError, KeyError):
            raise UserError(f"scheduler file {scheduler}: expected the JSON a Dask scheduler writes "
                            "(dask scheduler --scheduler-file), with an 'address' key") from None
    raise UserError(f"scheduler={scheduler!r}: expected an address such as tcp://HOST:8786 (tls://HOST:8786) "
                    "or a scheduler JSON file")


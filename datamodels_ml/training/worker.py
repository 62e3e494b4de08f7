"""The ``worker`` command: train one model index of a store and write its row, in an MLflow run of its own.

``train`` (many indices over slots or Dask) is ``training.train``; both run the model through
``training.run_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from datamodels_ml.errors import UserError
from datamodels_ml.store.store import Store


@dataclass
class WorkerConfig:
    SCRIPT_ARGV = "argv"  # the CLI appends the script's own options (--section.key=value) to this key
    ALIASES = {  # the original worker's flags (--worker.index=I ...), mapped onto ours by the CLI
        "worker.index": "index", "worker.main_import": "main", "worker.logdir": "store",
        "worker.do_if_complete": "overwrite", "worker.job_timeout": "timeout"}

    store: str = field(default=MISSING, metadata={"help": "store directory (created by init or train)"})
    index: int = field(default=MISSING, metadata={"help": "model index to train"})
    main: str = field(default=MISSING, metadata={"help": "dotted module or .py file with main(*, index, logdir, ...)"})
    args: dict[str, Any] = field(default_factory=dict, metadata={"help": "args.NAME=VALUE reach main as keyword arguments"})
    argv: list[str] = field(default_factory=list, metadata={
        "help": "the script's sys.argv after its name, e.g. '[--training.lr=0.5]' (for scripts that read options)"})
    overwrite: bool = field(default=False, metadata={"help": "retrain an index that is already complete"})
    timeout: float = field(default=0.0, metadata={"help": "per-model timeout in seconds (0: none; timing out is a failure)"})


def worker(cfg: WorkerConfig) -> int:
    """Train one model and write its row; an MLflow run of its own (or the one `mlflow run` made).

    Workers may share a store (one row each), never with a ``train``; two on one row are refused.
    With a timeout the model runs in a child runner process that is killed when time is up.
    SIGTERM stops it as Ctrl-C does (exit 143); nothing is written for an unfinished model.
    """
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.interrupts import terminate_as_interrupt
    from datamodels_ml.store.lock import row_lock, store_lock
    from datamodels_ml.training.run_model import load_main, run_model

    store = Store(cfg.store)
    index = store.check_index(cfg.index)
    if cfg.timeout < 0:
        raise UserError("timeout must be >= 0 seconds")
    main = load_main(cfg.main, cfg.argv) if not cfg.timeout else None  # with a timeout, the runner imports it
    stopped = f"terminated (SIGTERM): model {index} was not written"
    with terminate_as_interrupt(stopped), store_lock(store.path, "worker", shared=True), \
            row_lock(store.path, index, f"worker index={index}"):
        if store.completed[index] and not cfg.overwrite:
            print(f"model {index} is already complete in {store.path}: skipped (overwrite=true to retrain)")
            return 0
        params = {"store": cfg.store, "index": index, "main": cfg.main}
        params.update({f"args.{k}": v for k, v in cfg.args.items()})
        if cfg.argv:
            params["argv"] = " ".join(cfg.argv)
        with tracking.run("worker", name=f"model-{index}", params=params, tags={"index": index, "main": cfg.main}):
            if cfg.timeout:  # killed from outside when time is up, wherever main hangs
                from datamodels_ml.training.runner_parent import run_isolated

                job = {"store": str(store.path), "main": cfg.main, "args": dict(cfg.args), "argv": list(cfg.argv),
                       "overwrite": cfg.overwrite}
                result = run_isolated(store, index, job, cfg.timeout)
            else:
                result = run_model(store, index, main, dict(cfg.args))
            metrics = {"duration": result.duration, **result.scalars}
            tracking.log_metrics(metrics)
            tags = {"status": result.status}
            if result.error:
                tags["error"] = result.error[-7000:]
            if result.nonfinite:
                tags["nonfinite"] = ",".join(result.nonfinite)
            tracking.set_tags(tags)
            if result.status == "failed":
                last = result.error.strip().splitlines()[-1] if result.error.strip() else "failed"
                raise UserError(f"model {index} failed: {last} (full error in the MLflow run's 'error' tag)")
    if result.status == "skipped":
        print(f"model {index} was completed by another process meanwhile: skipped")
        return 0
    if result.nonfinite:
        print(f"warning: model {index} returned NaN/inf in {', '.join(result.nonfinite)} (stored; write_dataset drops such rows)")
    print(f"model {index} completed in {result.duration:.2f} s -> {store.path}")
    return 0

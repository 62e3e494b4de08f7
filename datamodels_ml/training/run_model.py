"""Run one model: import the user's ``main``, call it for an index, validate and write its row.

``run_model`` is the shared core used by the ``worker`` command (one index, its own MLflow run) and
by the long-lived runner processes of ``train`` (many indices, child runs logged by the parent).
Timeouts are not enforced here: the parent of a runner process kills it (``training.runner_parent``), which
stops a main wherever it hangs and leaves no half-imported module in a process that goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from datamodels_ml.errors import UserError
from datamodels_ml.store.store import RowError, Store


@dataclass
class ModelResult:
    """What happened to one index; ``error`` holds the traceback text of a failure."""

    index: int
    status: str  # "completed", "failed" or "skipped" (completed by another writer meanwhile)
    duration: float = 0.0
    scalars: dict[str, float] = field(default_factory=dict)
    error: str = ""
    nonfinite: list[str] = field(default_factory=list)  # keys whose row holds NaN or inf (still stored)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "status": self.status, "duration": self.duration,
                "scalars": self.scalars, "error": self.error, "nonfinite": self.nonfinite}


def script_argv(target: str, argv: list[str]) -> None:
    """Give the user's script the command line it expects before it is imported: ``sys.argv`` is
    ``[target, *argv]``, and fastargs (when installed) parses known arguments only, as the original
    worker makes it do, so options meant for another section never stop a script."""
    sys.argv = [target, *argv]
    if importlib.util.find_spec("fastargs") is None:
        return
    import types

    from fastargs import get_current_config

    def collect_known_args(self, parser, disable_help=False):  # fastargs' method, with parse_known_args
        cli_args = [a for a in sys.argv[1:] if not (disable_help and a == "--help")]
        args = vars(parser.parse_known_args(cli_args)[0])
        for fname in args.pop("config_file", None) or []:
            self.collect_config_file(fname)
        self.collect(args)
        self.collect_env_variables()
        return self

    config = get_current_config()
    config.collect_argparse_args = types.MethodType(collect_known_args, config)


def load_main(target: str, argv: Sequence[str] = ()) -> Callable[..., Any]:
    """Import ``main`` from a dotted module (importable from the current directory) or a .py path.

    ``sys.argv`` is set first to ``[target, *argv]`` (``script_argv``; ``argv``: options for the
    script, e.g. ``["--training.lr=0.5"]``), so a script that reads its settings from the command
    line, at import or in main, sees those and nothing of ours.
    """
    script_argv(target, list(argv))
    if not target:
        raise UserError("main is empty: give a dotted module (e.g. datamodels_ml.examples.minimal) or a .py file")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target)
            if not path.is_file():
                raise UserError(f"main file not found: {target}")
            name = f"_datamodels_main_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise UserError(f"cannot import main module '{target}': no module named '{exc.name}' "
                            "(give a dotted module importable from the current directory, or a path to a .py file)") from None
        raise UserError(f"cannot import main module '{target}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed at import time
        raise UserError(f"cannot import main module '{target}': {type(exc).__name__}: {exc}") from None
    fn = getattr(module, "main", None)
    if not callable(fn):
        raise UserError(f"module '{target}' has no function main(*, index, logdir, ...)")
    from datamodels_ml.training.script_options import collect_declared

    collect_declared()  # the script's fastargs options, as the original worker collects them
    return fn


def scalar_outputs(store: Store, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """The scalar (shape ``[]``) outputs of a model, to log as metrics."""
    out = {}
    for key, fld in store.spec.schema.items():
        if fld.shape == () and key in rows:
            out[key] = float(rows[key])
    return out


def nonfinite_keys(rows: dict[str, np.ndarray]) -> list[str]:
    """The keys of a validated row that hold NaN or inf (floating-point keys only)."""
    return [key for key, arr in rows.items() if arr.dtype.kind in "fc" and not np.isfinite(arr).all()]


def run_model(store: Store, index: int, main: Callable[..., Any], args: dict[str, Any], *,
              flag: bool = True, still_wanted: Callable[[], bool] | None = None) -> ModelResult:
    """Call ``main(index=, logdir=, **args)``; on success write row ``index`` of the store.

    A main that raises or returns something that does not fit the spec gives a failed result;
    nothing is written for it. With ``flag=False`` the row is written but not marked complete: the
    caller commits it later with ``Store.commit`` (``train`` does, in batches). ``still_wanted`` is
    asked after main returns, right before writing: False (another writer completed the row, or
    the parent that asked for it is gone) gives a "skipped" result and writes nothing.
    """
    start = time.perf_counter()
    try:
        logdir = store.make_logdir(index)  # a real folder of the store: a link there is refused
    except UserError as exc:
        return ModelResult(index, "failed", error=str(exc))
    try:
        outputs = main(index=index, logdir=str(logdir), **args)
    except Exception:  # noqa: BLE001 - a failing main is recorded, never fatal to the fan-out
        return ModelResult(index, "failed", time.perf_counter() - start, error=traceback.format_exc())
    if still_wanted is not None and not still_wanted():
        return ModelResult(index, "skipped", time.perf_counter() - start)
    try:
        rows = store.write_row(index, outputs) if flag else store.write_data(index, outputs)
    except RowError as exc:
        return ModelResult(index, "failed", time.perf_counter() - start, error=f"invalid result: {exc}")
    except Exception:  # noqa: BLE001 - e.g. a full disk: recorded as a failure, the row stays incomplete
        return ModelResult(index, "failed", time.perf_counter() - start, error=traceback.format_exc())
    return ModelResult(index, "completed", time.perf_counter() - start, scalars=scalar_outputs(store, rows),
                       nonfinite=nonfinite_keys(rows))

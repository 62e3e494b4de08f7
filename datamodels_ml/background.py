"""Work started in a daemon thread and awaited later.

A command's slow, single-threaded set-up (importing MLflow, opening its store: about 1.5 s of
Python) and its first computation (reading the masks and their Gram, mostly outside the GIL) can
run side by side; ``start`` runs the computation in a thread, optionally on fewer torch threads so
the two do not wait on each other's cores, then imports modules that the command needs later.
The returned function waits for the result and re-raises the thread's error in the caller.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable


def start(fn: Callable[[], Any], *, name: str, threads: int = 0,
          then_import: tuple[str, ...] = ()) -> Callable[[], Any]:
    """Run ``fn()`` in a daemon thread named ``name`` (on ``threads`` torch threads if > 0, then
    back to the caller's count: OpenMP keeps the count per thread, MKL's is global), then import
    ``then_import`` there. Returns ``wait()``: ``fn``'s result, or its exception raised again; it does not wait
    for the imports."""
    import torch

    out: dict[str, Any] = {}
    ready = threading.Event()
    before = torch.get_num_threads()  # the caller's setting (OpenMP keeps one per thread)

    def work() -> None:
        try:
            if threads > 0:
                torch.set_num_threads(threads)
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            out["error"] = exc
        finally:
            if threads > 0:
                torch.set_num_threads(before)
            ready.set()
        for module in then_import:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the caller's own import reports it
                return

    threading.Thread(target=work, name=name, daemon=True).start()

    def wait() -> Any:
        ready.wait()
        if "error" in out:
            raise out["error"]
        return out["result"]

    return wait

"""Work started in a daemon thread and awaited later.

A command's slow, single-threaded set-up (importing MLflow, opening its store: about 1.5 s of
Python) and its first computation (reading the masks and their Gram, mostly outside the GIL) can
run side by side; ``start`` runs the computation in a thread, on fewer torch threads while the two
overlap, then imports modules that the command needs later. The returned :class:`Pending` waits
for the result and re-raises the thread's error in the caller; from the moment the caller waits
(its set-up is over) the computation may use every thread the caller has: the computation calls
its ``widen`` between steps, which moves it to the caller's thread count.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable


class Pending:
    """A computation under way in a thread: call it to wait for its result."""

    def __init__(self, caller_threads: int, threads: int) -> None:
        self.caller_threads = caller_threads
        self.threads = threads  # the count the computation runs on now (0: the caller's)
        self._waiting = threading.Event()
        self._ready = threading.Event()
        self._out: dict[str, Any] = {}

    def widen(self) -> None:
        """Called by the computation (in its own thread, between steps): once the caller waits,
        run on the caller's thread count (OpenMP keeps the count per thread, so only the
        computation's own thread can change it)."""
        if self.threads and self._waiting.is_set():
            import torch

            torch.set_num_threads(self.caller_threads)
            self.threads = 0

    def __call__(self) -> Any:
        """Wait for the result and hand it over (once: a second call raises ``KeyError``)."""
        self._waiting.set()
        self._ready.wait()
        if "error" in self._out:
            raise self._out["error"]
        # handed over, not kept: the result may be the regression's Gram, whose memory must go as
        # soon as the caller drops it (not while the results are written and logged)
        return self._out.pop("result")


def start(fn: Callable[[Callable[[], None]], Any], *, name: str, threads: int = 0,
          then_import: tuple[str, ...] = ()) -> Pending:
    """Run ``fn(widen)`` in a daemon thread named ``name``: on ``threads`` torch threads if > 0
    until the caller waits (``fn`` calls ``widen()`` between its steps to move to the caller's
    count from then on), then import ``then_import`` there. Returns the :class:`Pending` result;
    waiting does not wait for the imports."""
    import torch

    pending = Pending(torch.get_num_threads(), threads)  # the caller's setting (per thread)

    def work() -> None:
        try:
            if threads > 0:
                torch.set_num_threads(threads)
            pending._out["result"] = fn(pending.widen)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's wait
            pending._out["error"] = exc
        finally:
            if pending.threads:  # never widened: back to the caller's count (MKL's is global)
                torch.set_num_threads(pending.caller_threads)
                pending.threads = 0
            pending._ready.set()
        for module in then_import:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the caller's own import reports it
                return

    threading.Thread(target=work, name=name, daemon=True).start()
    return pending

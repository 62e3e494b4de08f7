"""SIGTERM handled like Ctrl-C, so ``train`` and ``worker`` stop the same clean way on either.

A batch scheduler, ``kill`` or ``docker stop`` sends SIGTERM. Inside ``terminate_as_interrupt()``
the first SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``) in the main thread, so the code
that already cleans up after Ctrl-C runs for it too: completed rows committed, summary printed,
failures file written, runners stopped, the MLflow run marked KILLED. Further SIGTERMs are ignored
while that cleanup runs. The command then exits 143 (128 + 15, what a shell reports for a process
ended by SIGTERM); Ctrl-C exits 130.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM inside ``terminate_as_interrupt``."""


def _on_sigterm(_signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up, even if the sender insists
    raise Terminated()


@contextmanager
def terminate_as_interrupt(message: str = "") -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` within the block; a ``Terminated`` leaving it exits 143
    (after printing ``message`` on stderr, if given)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except Terminated:
        if message:
            print(message, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)

"""`python -m datamodels_ml <command> key=value ...`.

``regress`` and ``evaluate`` end without the interpreter's module teardown (torch, mlflow and
matplotlib take about a second to unload, which a finished command does not need): once the
command has returned, the exit handlers run (MLflow's, ``weakref.finalize``, multiprocessing's),
output is flushed, and the process exits. Any other command, or a non-daemon thread still alive,
exits normally.
"""

import atexit
import logging
import os
import sys
import threading

from datamodels_ml.cli import main

_FAST_EXIT = ("regress", "evaluate")

code = main()
others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
if sys.argv[1:2] and sys.argv[1] in _FAST_EXIT and not others and hasattr(atexit, "_run_exitfuncs"):
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)
raise SystemExit(code)

"""datamodels_ml: compute datamodels as an MLflow project.

Train many models on random subsets of a training set, record their outputs in a memmapped store,
then fit one sparse linear model per target from the subset masks to those outputs.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenBLAS's idle worker threads spin for about 2^28 cycles (0.1 s) after each call before they
# sleep, taking a core from torch's own threads in between: set a short spin before numpy loads
# OpenBLAS (the user's own setting wins). Whether it holds decides if the solver's iterative
# products may go through OpenBLAS (``solvers/blas.py``).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
_timeout = _os.environ.get("OPENBLAS_THREAD_TIMEOUT", "").strip()
OPENBLAS_QUIET = _timeout.isdigit() and int(_timeout) <= 12

# The same for torch's OpenMP threads (GNU libgomp): after each parallel operation they spin
# 300,000 times before they sleep, and the solver alternates torch's elementwise work with
# OpenBLAS's products on the same cores. 10,000 made the 5k benchmark's path 18-22% faster
# (``docs/benchmarks.md``); set before torch loads libgomp, the user's own setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Thread pools sized to the CPUs this process is allotted (affinity mask, cgroup quota), not the
# machine's core count, unless the user sized them (``cpus.environment_defaults``).
if "torch" not in _sys.modules and "numpy" not in _sys.modules:
    from datamodels_ml.cpus import environment_defaults as _environment_defaults

    _environment_defaults()

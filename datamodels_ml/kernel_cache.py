"""The measured kernel rates, kept per machine in the user's cache directory.

``solvers.kernels`` times each of the equivalent exact kernels (tens of milliseconds); this module
keeps the result in ``kernels.json`` under ``$DATAMODELS_CACHE_DIR``, else
``$XDG_CACHE_HOME/datamodels_ml``, else ``~/.cache/datamodels_ml``, keyed by what decides the rates:
the CPU model and torch's CPU capability, the cores and threads, the versions of torch, numpy
and scipy (their BLAS) and of the probe. Any change of those measures again; so does
``regress cfg.kernels=measure`` (or deleting the file). A cache that cannot be read or written
costs a probe per process, nothing else.

:func:`machine` describes this machine in one line, as every benchmark and speed figure names it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError

FILE = "kernels.json"


def cache_dir() -> Path:
    """Where the measured rates are kept."""
    if os.environ.get("DATAMODELS_CACHE_DIR"):
        return Path(os.environ["DATAMODELS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "datamodels_ml"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def capability() -> str:
    """torch's CPU capability (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old torch
        return "unknown"


def machine_key() -> dict[str, Any]:
    """What the rates depend on; the cache entry is redone when any of it changes."""
    import numpy
    import scipy
    import torch

    from datamodels_ml.solvers.probe import PROBE_VERSION

    return {"probe": PROBE_VERSION, "cpu": cpu_model(), "capability": capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__}


def machine() -> str:
    """One line naming this machine: CPU model, torch's CPU capability, cores allotted, threads."""
    import torch

    from datamodels_ml.cpus import allotment

    return (f"{cpu_model()}, torch CPU capability {capability()}, {allotment()} of {os.cpu_count()} cores "
            f"allotted, {torch.get_num_threads()} threads, torch {torch.__version__}")


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Atomically (a temporary file renamed over the old one); a failure is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def load(*, forced: str = "", refresh: bool = False):
    """The kernels for this machine (``solvers.kernels.Kernels``), installed for this process: the
    cached rates when the machine's key matches, else measured now and cached. ``forced``: ``op=name``
    pairs (as ``DATAMODELS_KERNELS``) that win over the rates, and ``measure`` to measure again
    whatever the cache holds; a bad one is a UserError."""
    from datamodels_ml.solvers import kernels
    from datamodels_ml.solvers.probe import probe

    parts = [t.strip() for t in forced.replace(";", ",").split(",")]
    refresh = refresh or "measure" in parts
    try:
        force = kernels.parse_forced(",".join(t for t in parts if t != "measure"))
    except ValueError as exc:
        raise UserError(f"cfg.kernels: {exc}") from None
    key = machine_key()
    name = json.dumps(key, sort_keys=True)
    path = cache_dir() / FILE
    doc = _read(path)
    entry = doc.get(name) if not refresh else None
    rates = entry.get("rates") if isinstance(entry, dict) else None
    if isinstance(rates, dict) and all(isinstance(v, (int, float)) for v in rates.values()) and rates:
        source = "cached"
    else:
        rates, source = probe(), "measured"
        doc = {k: v for k, v in doc.items() if isinstance(v, dict)}
        doc[name] = {"key": key, "rates": rates}
        _write(path, doc)
    chosen = kernels.choose(rates, force, source=source)
    kernels.use(chosen)
    return kernels.active()


def use_kernels(forced: str = "", *, quiet: bool = False):
    """:func:`load` (``forced``: ``cfg.kernels``), then the machine and the kernels with their rates
    in two lines on stderr (``regress: ...``), unless ``quiet``."""
    import sys

    k = load(forced=forced)
    if not quiet:
        print(f"regress: {machine()}", file=sys.stderr)
        print(f"regress: {k.describe()}", file=sys.stderr)
    return k

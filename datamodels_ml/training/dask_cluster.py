"""A Dask cluster on a batch system, from a small YAML file (``train ... cluster=CONFIG.yaml``).

The YAML names what a user knows about their cluster; ``cluster_kwargs`` turns it into the keyword
arguments of a dask-jobqueue class (``SLURMCluster``, ``PBSCluster``, ...), and ``start_cluster``
builds the cluster (no job is submitted until it is scaled). Keys (see configs/cluster/slurm.yaml):

``type`` slurm | pbs | lsf | sge | htcondor | moab | oar (or local: the job scripts run here); ``queue``; ``account``; ``walltime``;
``jobs`` (at most this many batch jobs; fewer when there are fewer models); ``gpus_per_job`` (one
worker process per GPU, each running one model at a time through the worker resource ``GPU=1``);
``cores_per_job``; ``memory_per_job``; ``setup`` (shell lines run in the job script before the
worker starts: modules, a virtual environment); ``job_directives`` (extra scheduler directives);
``interface``; ``log_directory``; ``python``; ``dashboard``; ``shared_directory``; ``options`` (any
other keyword of the class, as is).

Security. Every cluster speaks TLS only, with temporary credentials (``training.dask_tls.Credentials``) written
to ``shared_directory`` (default: the current directory; the nodes must see it at the same path) for
the job scripts; ``type: local`` writes them to the temporary directory. ``type: local`` listens on
127.0.0.1 only (scheduler, nannies, workers). The scheduler's dashboard is off unless asked
(``dashboard: true`` serves it on 127.0.0.1:8787, ``dashboard: HOST:PORT`` where given); its other
HTTP routes (health, metrics) and those of the workers listen on 127.0.0.1, on a free port.
``close_cluster`` closes the cluster and removes its credentials.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from datamodels_ml.training.dask_tls import Credentials
from datamodels_ml.errors import UserError

TYPES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster",
         "htcondor": "HTCondorCluster", "moab": "MoabCluster", "oar": "OARCluster",
         "local": "local.LocalCluster"}  # local: the job scripts run as local processes (to try a config)
KEYS = {"type", "queue", "account", "walltime", "jobs", "gpus_per_job", "cores_per_job", "memory_per_job",
        "setup", "job_directives", "interface", "log_directory", "python", "dashboard", "shared_directory",
        "options"}
OWN_OPTIONS = {"security", "protocol", "shared_temp_directory"}  # set by the project: TLS for every cluster
LOOPBACK = "127.0.0.1"
_CREDENTIALS: "weakref.WeakKeyDictionary[Any, weakref.finalize]" = weakref.WeakKeyDictionary()


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """The YAML as a dict, checked: known keys, a known type, positive counts."""
    from datamodels_ml.files import read_yaml

    cfg = read_yaml(path, "cluster config")
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping of keys ({', '.join(sorted(KEYS))})")
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}' (keys: {', '.join(sorted(KEYS))}; "
                        "other dask-jobqueue keywords go under options:)")
    kind = str(cfg.get("type", "slurm")).lower()
    if kind not in TYPES:
        raise UserError(f"{path}: type '{kind}' is not one of {', '.join(TYPES)}")
    cfg["type"] = kind
    for key, low in (("jobs", 1), ("gpus_per_job", 0), ("cores_per_job", 1)):
        value = cfg.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{path}: {key} must be an integer >= {low}, got {value!r}")
        cfg[key] = value
    for key in ("setup", "job_directives"):
        lines = cfg.get(key) or []
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise UserError(f"{path}: {key} must be a list of strings (one line each)")
        cfg[key] = lines
    if kind == "local" and cfg["setup"]:
        raise UserError(f"{path}: setup lines run in batch job scripts only; type: local starts the workers "
                        "directly, with the driver's environment")
    if kind == "local" and cfg.get("interface"):
        raise UserError(f"{path}: type: local listens on {LOOPBACK} only; interface: is for batch clusters")
    options = cfg.get("options") or {}
    if not isinstance(options, dict):
        raise UserError(f"{path}: options must be a mapping of dask-jobqueue keywords")
    own = sorted(OWN_OPTIONS & set(options))
    if own:
        raise UserError(f"{path}: options: {own[0]} is set by datamodels_ml (every cluster it starts uses TLS with "
                        "temporary credentials; shared_directory: says where the nodes find them)")
    dashboard = cfg.get("dashboard", False)
    if not isinstance(dashboard, (bool, str)) or dashboard == "":
        raise UserError(f"{path}: dashboard must be true, false or an address such as {LOOPBACK}:8787, "
                        f"got {dashboard!r}")
    shared = cfg.get("shared_directory")
    if shared is not None and (not isinstance(shared, str) or not shared.strip() or any(c.isspace() for c in shared)):
        raise UserError(f"{path}: shared_directory must be a directory path without spaces (it goes into the "
                        f"job script), got {shared!r}")
    return cfg


def cluster_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the dask-jobqueue class for a checked config."""
    gpus = cfg["gpus_per_job"]
    kwargs: dict[str, Any] = {
        "cores": cfg["cores_per_job"],
        "memory": str(cfg.get("memory_per_job", "16GB")),
        "processes": gpus or 1,  # one worker process per GPU
        "job_script_prologue": list(cfg["setup"]),
        "job_extra_directives": list(cfg["job_directives"]),
    }
    if gpus:
        kwargs["worker_extra_args"] = ["--resources", "GPU=1"]
        if cfg["type"] == "slurm" and not any("gres" in d or "gpus" in d for d in cfg["job_directives"]):
            kwargs["job_extra_directives"].append(f"--gres=gpu:{gpus}")
    for key in ("queue", "account", "walltime", "interface", "log_directory", "python"):
        if cfg.get(key):
            kwargs[key] = str(cfg[key])
    dashboard = cfg.get("dashboard", False)
    scheduler: dict[str, Any] = {"dashboard": bool(dashboard),
                                 "dashboard_address": dashboard if isinstance(dashboard, str)
                                 else f"{LOOPBACK}:8787" if dashboard else f"{LOOPBACK}:0"}
    # the workers' HTTP routes (health, metrics) on loopback; their dashboards off
    workers = ["--no-dashboard", "--dashboard-address", f"{LOOPBACK}:0"]
    if cfg["type"] == "local":
        scheduler["host"] = LOOPBACK
        workers += ["--host", LOOPBACK]
    options = dict(cfg.get("options") or {})
    kwargs["scheduler_options"] = {**scheduler, **(options.pop("scheduler_options", None) or {})}
    kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), *workers,
                                   *(options.pop("worker_extra_args", None) or [])]
    kwargs.update(options)
    return kwargs


def credentials_parent(cfg: dict[str, Any]) -> str:
    """Where the cluster's TLS credentials go: a directory the nodes share (absolute: a job may start
    elsewhere), or the temporary directory for ``type: local``."""
    if cfg.get("shared_directory"):
        return os.path.abspath(os.path.expanduser(os.path.expandvars(cfg["shared_directory"])))
    return tempfile.gettempdir() if cfg["type"] == "local" else os.getcwd()


def make_cluster(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The dask-jobqueue cluster object (its scheduler runs here; no job submitted yet) and the config."""
    cfg = load_cluster_config(path)
    try:
        import dask_jobqueue
        import dask_jobqueue.local  # noqa: F401 - type: local
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise UserError(f"cluster= needs dask-jobqueue: {exc} (pip install dask-jobqueue)") from None
    cls: Any = dask_jobqueue
    for part in TYPES[cfg["type"]].split("."):
        cls = getattr(cls, part)
    kwargs = cluster_kwargs(cfg)
    credentials = Credentials(credentials_parent(cfg))
    try:
        cluster = cls(**kwargs, security=credentials.security)
    except (TypeError, ValueError) as exc:
        credentials.remove()
        raise UserError(f"{path}: dask-jobqueue refused the config: {exc}") from None
    except BaseException:
        credentials.remove()
        raise
    # removed by close_cluster, else when the cluster is collected or the process exits
    _CREDENTIALS[cluster] = weakref.finalize(cluster, credentials.remove)
    return cluster, cfg


def close_cluster(cluster: Any) -> None:
    """Close the cluster (its workers stop) and remove its TLS credentials."""
    try:
        cluster.close()
    finally:
        remove = _CREDENTIALS.pop(cluster, None)
        if remove is not None:
            remove()


def start_cluster(path: str | Path, *, gpus: int) -> tuple[Any, dict[str, Any]]:
    """The cluster (not scaled yet) and its checked config, for ``train`` with ``gpus`` GPUs."""
    cluster, cfg = make_cluster(path)
    if gpus and not cfg["gpus_per_job"]:
        close_cluster(cluster)
        raise UserError(f"gpus={gpus} but {path} sets no gpus_per_job: its workers would have no GPU to run on")
    return cluster, cfg

"""A Dask cluster on a batch system, from a small YAML file (``train ... cluster=CONFIG.yaml``).

The YAML names what a user knows about their cluster; ``cluster_kwargs`` turns it into the keyword
arguments of a dask-jobqueue class (``SLURMCluster``, ``PBSCluster``, ...), and ``start_cluster``
builds the cluster (no job is submitted until it is scaled). Keys (see configs/cluster/slurm.yaml):

``type`` slurm | pbs | lsf | sge | htcondor | moab | oar (or local: the job scripts run here); ``queue``; ``account``; ``walltime``;
``jobs`` (at most this many batch jobs; fewer when there are fewer models); ``gpus_per_job`` (one
worker process per GPU, each running one model at a time through the worker resource ``GPU=1``);
``cores_per_job``; ``memory_per_job``; ``setup`` (shell lines run in the job script before the
worker starts: modules, a virtual environment); ``job_directives`` (extra scheduler directives);
``interface``; ``log_directory``; ``python``; ``options`` (any other keyword of the class, as is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError

TYPES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster",
         "htcondor": "HTCondorCluster", "moab": "MoabCluster", "oar": "OARCluster",
         "local": "local.LocalCluster"}  # local: the job scripts run as local processes (to try a config)
KEYS = {"type", "queue", "account", "walltime", "jobs", "gpus_per_job", "cores_per_job", "memory_per_job",
        "setup", "job_directives", "interface", "log_directory", "python", "options"}


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
    if not isinstance(cfg.get("options") or {}, dict):
        raise UserError(f"{path}: options must be a mapping of dask-jobqueue keywords")
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
    kwargs.update(cfg.get("options") or {})
    return kwargs


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
    try:
        cluster = cls(**cluster_kwargs(cfg))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: dask-jobqueue refused the config: {exc}") from None
    return cluster, cfg


def start_cluster(path: str | Path, *, gpus: int) -> tuple[Any, dict[str, Any]]:
    """The cluster (not scaled yet) and its checked config, for ``train`` with ``gpus`` GPUs."""
    cluster, cfg = make_cluster(path)
    if gpus and not cfg["gpus_per_job"]:
        cluster.close()
        raise UserError(f"gpus={gpus} but {path} sets no gpus_per_job: its workers would have no GPU to run on")
    return cluster, cfg

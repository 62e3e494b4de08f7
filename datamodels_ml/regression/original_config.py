"""Regression configs written for the original MadryLab tools, read with the original's meaning.

A config file whose keys are all keys of the original ``regression_config.yaml`` (``ORIGINAL_KEYS``)
is an *original config*. ``load_config`` reads it as the original does: the original's defaults for
the original keys it leaves out, and the original's behaviour for the points that have a key of
ours (``ORIGINAL_BEHAVIOUR``: the ordered split, fast_l1's grid, the refit's standardization, the
path's patience, the relaxed lasso that stands for fast_l1's loose stops), one line on stderr per setting; a ``key=value`` on the command line still wins.
Any other config (one with a key of ours) is read as written. ``notes`` names the settings of any
config that this run cannot honour as written (fast_l1's SAGA settings under fista, more loader
threads than cores). Keys spelled as in the original always mean what they mean there.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ORIGINAL_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data_path", "num_train", "num_val", "seed", "target_start_ind", "target_end_ind"),
    "cfg": ("k", "lr", "eps", "batch_size", "out_dir", "num_workers", "use_bias"),
    "early_stopping": ("check_every", "eps"),
}

# The original's defaults where ours differ (compute_datamodels' fastargs sections). cfg.num_workers
# (16 there) is left out: it has no effect here.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "cfg.lr": 0.01,
    "cfg.eps": 1e-5,
    "early_stopping.check_every": 2,
    "early_stopping.eps": 1e-5,
}

# Our keys set to the original's behaviour, with the line printed for each.
ORIGINAL_BEHAVIOUR: dict[str, tuple[Any, str]] = {
    "data.split": ("ordered", "the first data.num_train rows of the .beton train, the next data.num_val validate"),
    "cfg.grid": ("fast_l1", "λ_max of the raw masks · cfg.eps^(i/cfg.k), i = 0..k-1, then λ = 0"),
    "cfg.refit_standardization": ("train_val", "the refit standardizes with the mean/std of train+val"),
    "cfg.min_lambdas": (8, "no target leaves the path before 10 λ (fast_l1's, counting λ = 0)"),
    "cfg.relax": ("true", "the relaxed lasso: each target's weights blended with least squares on their support, "
                  "φ picked with λ on the validation rows (fast_l1's loose stops between the λ = 0 fit and the "
                  "lasso undo part of its shrinkage too)"),
}


def is_original_config(doc: Any) -> bool:
    """True for a mapping whose sections and keys all belong to the original's regression config."""
    if not isinstance(doc, dict) or not doc or not set(doc) <= set(ORIGINAL_KEYS):
        return False
    return all(isinstance(doc[s], dict) and set(doc[s]) <= set(ORIGINAL_KEYS[s]) for s in doc)


def translate(path: str, doc: dict, overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(tokens, lines)`` for an original config ``doc`` read from ``path``: dot-list tokens that give
    it the original's meaning (to merge before ``overrides``, which win), and one line per setting."""
    given = {token.partition("=")[0] for token in overrides}
    tokens: list[str] = []
    lines = [f"{path} holds only the original's keys: read with the original's meaning "
             f"(a key=value on the command line changes any of these)"]
    for key, (value, what) in ORIGINAL_BEHAVIOUR.items():
        if key not in given:
            tokens.append(f"{key}={value}")
            lines.append(f"  {key}={value}: {what}")
    defaults = {key: value for key, value in ORIGINAL_DEFAULTS.items()
                if key not in given and key.partition(".")[2] not in doc.get(key.partition(".")[0], {})}
    if defaults:
        tokens += [f"{key}={value}" for key, value in defaults.items()]
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in defaults.items()) + ": the original's defaults "
                     "(not in the file)")
    return tokens, lines


def load_config(argv: list[str], *, config_key: str = "config", quiet: bool = False):
    """The ``RegressConfig`` of ``argv`` (``config=PATH`` and ``key=value`` tokens), an original
    config file translated by ``translate`` (its lines printed to stderr unless ``quiet``)."""
    from datamodels_ml.config import load
    from datamodels_ml.files import read_yaml
    from datamodels_ml.regression.config import RegressConfig

    paths = [t.partition("=")[2] for t in argv if t.partition("=")[0] == config_key]
    if paths and os.path.isfile(paths[-1]):
        overrides = [t for t in argv if t.partition("=")[0] != config_key]
        doc = read_yaml(paths[-1], "regression config")
        if is_original_config(doc):
            tokens, lines = translate(paths[-1], doc, overrides)
            if not quiet:
                for line in lines:
                    print(f"regress: {line}", file=sys.stderr)
            argv = [f"{config_key}={paths[-1]}", *tokens, *overrides]
    return load(RegressConfig, argv, config_key=config_key)


def notes(cfg) -> list[str]:
    """One line per setting of ``cfg`` that this run cannot honour as written (any config)."""
    c, es = cfg.cfg, cfg.early_stopping
    lines = []
    if c.method == "fista" and c.lr is not None:
        lines.append(f"cfg.lr={c.lr} is the saga step size (fast_l1's); cfg.method=fista takes its step from the "
                     f"data, so it is not used (cfg.method=saga uses it)")
    if c.method == "fista" and es.eps is not None:
        lines.append(f"early_stopping.eps={es.eps} is fast_l1's absolute test per saga epoch; cfg.method=fista "
                     f"solves each λ to cfg.tol={c.tol} (relative) instead (cfg.method=saga uses it)")
    if c.method == "saga" and c.relax:
        lines.append("cfg.relax=true (the relaxed lasso) needs the Gram of cfg.method=fista; cfg.method=saga fits the "
                     "lasso alone")
    from datamodels_ml.cpus import allotment

    cores = allotment()
    if c.num_workers > cores:
        lines.append(f"cfg.num_workers={c.num_workers} is more than the {cores} CPU cores here: clamped to {cores} "
                     f"(no effect anyway: the .beton reader reads ahead in one thread)")
    return lines

"""Names and descriptions of the MLflow runs of a fit, so two different fits never look alike.

A regression is named by what distinguishes it: solver, path length, training models, and a short
hash of every setting that changes its result (``settings_hash``: the config less output-only keys,
the dataset path included), e.g. ``regress-fista-k50-n1100-3fa2c1``; its evaluations carry the same
tail (``evaluate-fista-k50-n1100-3fa2c1``). The same fit run again gets the same name, and a
different one (120 training models instead of 1100, another target slice) a different one.

``regress_description`` is the run's description (MLflow's ``mlflow.note.content`` tag): what a
step of the path metrics is and which number to compare first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

# settings that do not change a fit's result (results.NOT_FINGERPRINTED, as nested keys)
OUTPUT_ONLY = ("cfg.force", "cfg.num_workers", "cfg.progress", "cfg.out_dir", "cfg.target_block", "gpus",
               "cfg.kernels")
NOTE_TAG = "mlflow.note.content"


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_hash(config: Mapping[str, Any]) -> str:
    """Six hex digits naming the settings of a regression config (a nested dict) that decide its result."""
    flat = {k: v for k, v in _flat(config).items() if k not in OUTPUT_ONLY}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:6]


def fit_name(config: Mapping[str, Any]) -> str:
    """``fista-k50-n1100-3fa2c1``: solver, λ values, training models, settings hash."""
    solver, data = config.get("cfg") or {}, config.get("data") or {}
    return f"{solver.get('method')}-k{solver.get('k')}-n{data.get('num_train')}-{settings_hash(config)}"


def regress_description(config: Mapping[str, Any], targets: int) -> str:
    """The regress run's description (markdown, shown on the run's page in the MLflow UI)."""
    solver, data = config.get("cfg") or {}, config.get("data") or {}
    return (
        f"Lasso paths of {targets} targets: {solver.get('method')}, k={solver.get('k')} λ values from λ_max down "
        f"to eps·λ_max (eps={solver.get('eps')}), {data.get('num_train')} training and {data.get('num_val')} "
        f"validation models.\n\n"
        "Compare runs first by **best_val_mse** (mean over targets of the validation MSE at each target's "
        "selected λ; lower is better), then by the path.\n\n"
        "Path metrics (`val_mse`, `train_mse`, `nnz`, `lam_ratio`, `active_fraction`) are logged at "
        "**step = round(100·log10(λ_max/λ))**: 100 steps per decade of λ, step 0 is λ_max and step 300 "
        "is λ_max/1000, the same λ/λ_max in every run whatever its k. `val_mse`, `train_mse` and `nnz` at a "
        "step are means over ALL targets; a target that stopped early counts with its value at its "
        "selected λ. `active_fraction` is the share of targets still on the path.")


__all__ = ["settings_hash", "fit_name", "regress_description", "NOTE_TAG"]

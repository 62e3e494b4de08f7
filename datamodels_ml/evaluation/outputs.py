"""What an evaluation hands back and writes: its result, the printed summary of its scores, and the
check that an ``out`` directory holds nothing an evaluation did not write.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError
from datamodels_ml.evaluation.heldout import HeldOut
from datamodels_ml.evaluation.metrics import Scores


@dataclass
class EvaluationResult:
    """What ``run_evaluation`` found; ``files`` are the artifacts written (name -> path)."""

    scores: Scores
    heldout: HeldOut
    files: dict[str, str]
    run_id: str | None
    model_uri: str | None
    seconds: float
    interval: Any = None  # bootstrap.Interval of the LDS, or None


def format_scores(s: Scores) -> str:
    lines = [f"held-out models: {s.n_models}   targets: {s.n_targets}",
             f"LDS (mean Spearman): {s.lds:.4f}",
             f"mean Pearson:        {s.pearson:.4f}",
             f"mean R^2:            {s.r2:.4f}",
             f"MSE:                 {s.mse:.6g}"]
    if s.n_constant:
        lines.append(f"({s.n_constant} targets constant over the held-out models: left out of the means)")
    if s.n_constant_pred:
        lines.append(f"({s.n_constant_pred} targets with a constant prediction: correlation counted as 0)")
    return "\n".join(lines)


EVALUATE_FILES = ("metrics.json", "per_target.csv", "scatter.png", "digits_influence.png")


def check_out(out: str) -> None:
    """``out`` may gain our files; refuse to overwrite files of those names that an evaluation did not write."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"out {path} exists and is not a directory")
    clashes = [name for name in EVALUATE_FILES if (path / name).exists()]
    if not clashes:
        return
    try:
        ours = "lds" in json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise UserError(f"out {path} holds {clashes[0]}, which evaluate did not write (no metrics.json of an "
                        "evaluation there): choose another out directory")

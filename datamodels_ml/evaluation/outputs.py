"""What an evaluation hands back and writes: its result, the printed summary of its scores, and the
check that an ``out`` directory holds nothing an evaluation did not write.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

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


def write_and_log(out: Path, metrics: dict[str, float], params: dict[str, Any], held: HeldOut, pred: np.ndarray,
                  scores: Scores, write_per_target: Callable[[Path], Any]) -> dict[str, str]:
    """An evaluation's artifacts in ``out`` (``metrics.json`` with the held-out indices, the per-target
    CSV that ``write_per_target(path)`` writes, ``scatter.png``), logged to the active run with the
    metrics. Returns ``{name: path}``."""
    import matplotlib.pyplot as plt

    from datamodels_ml.figures import scatter_figure
    from datamodels_ml.tracking import runs as tracking

    tracking.log_metrics(metrics)
    doc = {**metrics, **params, "heldout_indices": [int(i) for i in held.indices]}
    (out / "metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_per_target(out / "per_target.csv")
    files = {"metrics": str(out / "metrics.json"), "per_target": str(out / "per_target.csv")}
    for name in ("metrics", "per_target"):
        tracking.log_artifact(files[name], "evaluate")
    fig = scatter_figure(pred, held.actual, scores)
    fig.savefig(out / "scatter.png", dpi=110)
    files["scatter"] = str(out / "scatter.png")
    tracking.log_figure(fig, "evaluate/scatter.png")
    plt.close(fig)
    return files


def finished(scores: Scores, held: HeldOut, files: dict[str, str], run_id: str | None, model_uri: str | None,
             start: float, interval: Any, *, out: str, quiet: bool) -> EvaluationResult:
    """The result of an evaluation started at ``start`` (``time.perf_counter``), said in one or two
    lines unless ``quiet``; ``files`` only when they were written to ``out`` (not a temporary folder)."""
    seconds = time.perf_counter() - start
    if not quiet:
        if out:
            print(f"artifacts: {', '.join(sorted(files.values()))}")
        print(f"MLflow run {run_id} ({seconds:.1f} s)")
    return EvaluationResult(scores, held, files if out else {}, run_id, model_uri, seconds, interval)

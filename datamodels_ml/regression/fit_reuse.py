"""A ``regress`` whose ``cfg.out_dir`` already holds the same fit (same config less output-only keys,
same dataset: ``regression.output_dir.is_up_to_date``) reuses it instead of refusing the directory, as the demo
does: ``make regress`` and the README's ``mlflow run . -e regress`` work right after ``make demo``.

Nothing is refitted or written, and no new run is made, except under ``mlflow run``, which made a
run before the command started: that run is named after the fit, points at the run that fitted it
(tag ``datamodels.reused_run_id``) and says so in its description. ``cfg.force=true`` refits.
"""

from __future__ import annotations

import sys
from pathlib import Path


def reuse_finished_fit(cfg) -> bool:
    """True (after saying so) when ``cfg.out_dir`` holds this very fit and ``cfg.force`` is off."""
    from datamodels_ml.regression.output_dir import config_dict, is_up_to_date, read_regress_manifest

    if cfg.cfg.force or not is_up_to_date(cfg):
        return False
    out = Path(cfg.cfg.out_dir)
    manifest = read_regress_manifest(out) or {}
    run_id = manifest.get("mlflow_run_id")
    print(f"regress: {out} already holds this fit (same config and data{f', MLflow run {run_id}' if run_id else ''}): "
          "reused, nothing refitted (cfg.force=true fits again)", file=sys.stderr, flush=True)
    summary = manifest.get("summary") or {}
    if "best_val_mse" in summary:
        print(f"reused {out / 'datamodels.pt'}: mean best val MSE {summary['best_val_mse']:.4g}, mean non-zeros "
              f"{summary.get('mean_nnz_at_best', float('nan')):.1f}", flush=True)
    _record(cfg, run_id, config_dict(cfg))
    return True


def _record(cfg, run_id: str | None, config: dict) -> None:
    """Under ``mlflow run``: its run, named and linked; otherwise the fitting run's link (``ui``)."""
    import os

    from datamodels_ml.tracking import links, runs as tracking
    from datamodels_ml.tracking.run_names import NOTE_TAG, fit_name

    name = f"regress-{fit_name(config)}"
    if os.environ.get("MLFLOW_RUN_ID"):
        note = (f"Reused the finished fit in {cfg.cfg.out_dir}" + (f" (MLflow run {run_id})" if run_id else "")
                + ": same config and data, nothing refitted. Its metrics and artifacts are on that run.")
        with tracking.run("regress", name=name, tags={"datamodels.reused_run_id": run_id or "", NOTE_TAG: note}):
            pass
        return
    if run_id:
        from mlflow.tracking import MlflowClient

        found = tracking.safe(lambda: MlflowClient().get_run(run_id), "get run")
        if found is not None:
            links.remember(found.info.experiment_id, run_id, found.info.run_name)


__all__ = ["reuse_finished_fit"]

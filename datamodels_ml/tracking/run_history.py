"""What ``train`` recorded in MLflow, read back: how long each model of a store ran (for ``budget``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mlflow.tracking import MlflowClient

from datamodels_ml.tracking import backend as tracking_store


def model_durations(store: str | Path) -> tuple[dict[int, float], int]:
    """Seconds each model of ``store`` ran in its slot (the ``duration`` metric of the FINISHED child
    runs of every train run whose ``store`` param names it, relative paths taken from the working
    directory; a later run wins) and the most GPUs those runs used (0: CPU slots). ``({}, 0)`` when
    this tracking store holds no such run."""
    client, target = MlflowClient(tracking_store.prepare()), Path(store).resolve()

    def search(exps: list[str], query: str) -> Iterator[Any]:
        token = None
        while True:
            page = tracking_store.retry(lambda: client.search_runs(exps, query, max_results=5000, page_token=token,
                                                     order_by=["attributes.start_time ASC"]))
            yield from page
            if not (token := page.token):
                return

    exps = [e.experiment_id for e in tracking_store.retry(client.search_experiments)]
    durations: dict[int, float] = {}
    gpus = 0
    for parent in search(exps, "params.store LIKE '%'"):
        p = parent.data.params
        if "main" not in p or "n" not in p or Path(p["store"]).resolve() != target:
            continue  # not a train run on this store
        gpus = max(gpus, int(p.get("gpus") or 0))
        query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' AND attributes.status = 'FINISHED'"
        for child in search([parent.info.experiment_id], query):
            if "index" in child.data.params and "duration" in child.data.metrics:
                durations[int(child.data.params["index"])] = float(child.data.metrics["duration"])
    return durations, gpus

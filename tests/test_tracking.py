"""MLflow records: named experiments of the model-training kind, runs named by what they are, runs
ended FAILED when a stage dies, child runs written through the public API."""

import contextlib

import pytest

from conftest import EXPERIMENT, TRAIN_EXPERIMENT, tracking_client

KIND = {"mlflow.experimentKind": "custom_model_development"}


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    """In-process tracking to tmp_path/mlflow.db, artifacts under tmp_path, no experiment chosen."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tracking_client(tmp_path)


def _experiment(client, run_id):
    return client.get_experiment(client.get_run(run_id).info.experiment_id)


@pytest.mark.parametrize("env_name, main, training", [
    (None, EXPERIMENT, TRAIN_EXPERIMENT),
    ("mine", "mine", "mine-train"),
])
def test_runs_go_to_named_experiments_of_the_model_training_kind(own_store, monkeypatch, env_name, main, training):
    from datamodels_ml import tracking

    if env_name:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", env_name)
    with tracking.run("regress", name="regress-fista-k50", tags={"k": 50}) as reg:
        pass
    with tracking.run("worker", name="model-7") as model:
        pass
    for run_id, stage, name, experiment in ((reg.info.run_id, "regress", "regress-fista-k50", main),
                                            (model.info.run_id, "worker", "model-7", training)):
        run = own_store.get_run(run_id)
        assert (run.info.run_name, run.info.status, run.data.tags["datamodels.stage"]) == (name, "FINISHED", stage)
        exp = _experiment(own_store, run_id)
        assert exp.name == experiment and KIND.items() <= exp.tags.items()
    assert own_store.get_run(reg.info.run_id).data.tags["k"] == "50"
    assert "mlflow.experimentKind" not in own_store.get_experiment("0").tags  # Default is left alone


def test_a_train_run_nested_in_a_pipeline_goes_to_the_training_experiment_linked_by_tags(own_store):
    from datamodels_ml import tracking

    with tracking.run("demo", name="demo-30") as demo:
        with tracking.run("regress", name="regress-fista-k5") as reg:
            pass
        with tracking.run("train", name="train-30") as train:
            import mlflow

            assert mlflow.active_run().info.run_id == train.info.run_id
        assert mlflow.active_run().info.run_id == demo.info.run_id
    demo_run, reg_run, train_run = (own_store.get_run(r.info.run_id) for r in (demo, reg, train))
    assert reg_run.data.tags["mlflow.parentRunId"] == demo.info.run_id  # same experiment: nested as MLflow does
    assert _experiment(own_store, train.info.run_id).name == TRAIN_EXPERIMENT
    assert "mlflow.parentRunId" not in train_run.data.tags
    assert train_run.data.tags["pipeline.parent_run_id"] == demo.info.run_id
    assert demo_run.data.tags["pipeline.train_run_id"] == train.info.run_id
    assert {r.info.status for r in (demo_run, reg_run, train_run)} == {"FINISHED"}
    assert train_run.data.tags["mlflow.user"] == demo_run.data.tags["mlflow.user"]  # context tags as start_run's


def test_an_experiment_made_elsewhere_gets_the_kind_and_a_deleted_one_is_refused(own_store):
    from datamodels_ml import tracking
    from datamodels_ml.errors import UserError

    made = own_store.create_experiment(EXPERIMENT)  # as `mlflow run --experiment-name datamodels` makes it
    with tracking.run("evaluate", name="evaluate-fista-k50") as active:
        pass
    assert active.info.experiment_id == made and own_store.get_experiment(made).tags == KIND
    own_store.delete_experiment(made)
    tracking._EXPERIMENTS.clear()  # a new process
    with pytest.raises(UserError, match=rf"the MLflow experiment '{EXPERIMENT}' \(id {made}\) is deleted: restore it "
                       rf"\(mlflow experiments restore --experiment-id {made}\) or set MLFLOW_EXPERIMENT_NAME"):
        with tracking.run("evaluate"):
            pass


@pytest.mark.parametrize("exc, status", [
    (None, "FINISHED"), (SystemExit(0), "FINISHED"), (SystemExit(1), "FAILED"), (ValueError("boom"), "FAILED"),
    ("user", "FAILED"), (KeyboardInterrupt(), "KILLED"), ("sigterm", "KILLED"),
])
def test_a_run_ends_with_the_status_of_how_its_block_ended(own_store, exc, status):
    from datamodels_ml import tracking
    from datamodels_ml.errors import UserError
    from datamodels_ml.interrupts import Terminated

    exc = {"user": UserError("bad key"), "sigterm": Terminated()}.get(exc, exc) if isinstance(exc, str) else exc
    with pytest.raises(type(exc)) if exc is not None else contextlib.nullcontext():
        with tracking.run("regress", name="regress-x") as active:
            if exc is not None:
                raise exc
    assert own_store.get_run(active.info.run_id).info.status == status

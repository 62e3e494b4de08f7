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
    from datamodels_ml.tracking import backend as tracking_store

    tracking_store.prepare()  # SQLite in WAL mode with a busy timeout, as every command has it
    return tracking_client(tmp_path)


def _experiment(client, run_id):
    return client.get_experiment(client.get_run(run_id).info.experiment_id)


@pytest.mark.parametrize("env_name, main, training", [
    (None, EXPERIMENT, TRAIN_EXPERIMENT),
    ("mine", "mine", "mine-train"),
])
def test_runs_go_to_named_experiments_of_the_model_training_kind(own_store, monkeypatch, env_name, main, training):
    from datamodels_ml.tracking import runs as tracking

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
    from datamodels_ml.tracking import runs as tracking

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
    from datamodels_ml.tracking import runs as tracking
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
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.errors import UserError
    from datamodels_ml.interrupts import Terminated

    exc = {"user": UserError("bad key"), "sigterm": Terminated()}.get(exc, exc) if isinstance(exc, str) else exc
    with pytest.raises(type(exc)) if exc is not None else contextlib.nullcontext():
        with tracking.run("regress", name="regress-x") as active:
            if exc is not None:
                raise exc
    assert own_store.get_run(active.info.run_id).info.status == status


# -- child runs of train ---------------------------------------------------------------------------
def _records(n):
    from datamodels_ml.tracking.child_runs import ChildRecord

    records = []
    for i in range(n):
        failed = i % 7 == 3
        metrics = {"duration": 0.5 + i, "accuracy": float("nan") if i == 5 else i / 100}
        tags = {"error": f"ValueError: model {i}"} if failed else {}
        records.append(ChildRecord(i, "FAILED" if failed else "FINISHED", 1_000_000 + i, 1_000_500 + i, metrics, tags))
    return records


@pytest.mark.parametrize("mode", ["api", "sql"])
def test_child_runs_one_per_model_with_its_params_metrics_tags_and_status(own_store, monkeypatch, mode):
    """The public API and the SQLite fast path write the same records."""
    import math

    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.tracking.child_runs import ChildRunWriter

    monkeypatch.setenv("DATAMODELS_CHILD_RUNS", "api" if mode == "api" else "auto")
    with tracking.run("train", name="train-20") as parent:
        writer = ChildRunWriter(parent.info.run_id, flush_every=0.05, max_batch=8)
        assert writer.mode == mode
        for rec in _records(20):
            writer.add(rec)
        writer.close()
    assert (writer.written, writer.failed) == (20, 0)
    children = own_store.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(c.data.params["index"]) for c in children) == list(range(20))
    for child in children:
        i = int(child.data.params["index"])
        failed = i % 7 == 3
        assert child.info.run_name == f"model-{i}" and child.info.user_id == parent.info.user_id
        assert child.info.status == ("FAILED" if failed else "FINISHED")
        assert (child.info.start_time, child.info.end_time) == (1_000_000 + i, 1_000_500 + i)
        assert child.data.params == {"index": str(i)}
        assert child.data.metrics["duration"] == 0.5 + i
        assert math.isnan(child.data.metrics["accuracy"]) if i == 5 else child.data.metrics["accuracy"] == i / 100
        assert child.data.tags["status"] == ("failed" if failed else "completed")
        assert child.data.tags.get("error") == (f"ValueError: model {i}" if failed else None)


def test_a_create_run_whose_answer_was_lost_leaves_no_second_run_of_that_model(own_store, monkeypatch, capsys):
    # the server commits a create_run, then dies before answering: the writer sees a connection
    # error, waits for the server, writes the record again, and deletes the unfinished leftover
    from datamodels_ml.tracking import backend
    from datamodels_ml.tracking import child_runs
    from datamodels_ml.tracking import runs as tracking

    monkeypatch.setenv("DATAMODELS_CHILD_RUNS", "api")
    monkeypatch.setattr(child_runs, "RETRY_EVERY", 0.05)
    monkeypatch.setattr(backend, "answers", lambda uri, timeout=3.0: True)
    with tracking.run("train", name="train-6") as parent:
        writer = child_runs.ChildRunWriter(parent.info.run_id, flush_every=0.05)
        create, lost = writer.client.create_run, []

        def create_then_lose_the_answer(*args, **kwargs):
            run = create(*args, **kwargs)
            if not lost and kwargs["run_name"] == "model-2":
                lost.append(run.info.run_id)
                raise ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))")
            return run

        monkeypatch.setattr(writer.client, "create_run", create_then_lose_the_answer)
        for rec in _records(6):
            writer.add(rec)
        writer.close()
    assert (writer.written, writer.failed, writer.outages) == (6, 0, 1) and len(lost) == 1
    children = own_store.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(c.data.params["index"]) for c in children) == list(range(6))
    assert lost[0] not in {c.info.run_id for c in children}
    assert own_store.get_run(lost[0]).info.lifecycle_stage == "deleted"
    err = capsys.readouterr().err
    assert "MLflow: deleted 1 unfinished duplicate child runs (created by the server while its answer was lost; " \
           "each model's run was written again)" in err


def test_other_mlflow_tables_turn_the_fast_path_off_with_one_line(own_store, monkeypatch, capsys):
    from datamodels_ml.tracking import child_runs, child_runs_sql
    from datamodels_ml.tracking import runs as tracking

    monkeypatch.setitem(child_runs_sql.COLUMNS, "SqlRun", child_runs_sql.COLUMNS["SqlRun"] | {"workspace"})
    with tracking.run("train", name="train-3") as parent:
        writer = child_runs.ChildRunWriter(parent.info.run_id)
        for rec in _records(3):
            writer.add(rec)
        writer.close()
    assert writer.mode == "api" and writer.written == 3
    err = capsys.readouterr().err
    assert "child runs through the public API (slower on SQLite): its tables are not the ones the fast path " \
           "was written for (SqlRun columns ['workspace'] differ)" in err


def test_train_through_the_public_api_writes_one_child_run_per_model(tmp_path):
    from conftest import CONFIGS, run_cli, search_runs

    out = run_cli("train", "store=st", f"spec={CONFIGS / 'minimal_spec.json'}", "main=datamodels_ml.examples.minimal",
                  "n=6", "jobs=1", "args.multiple=4", "progress=false", cwd=tmp_path,
                  env={"DATAMODELS_CHILD_RUNS": "api"}, check=True)
    assert "train: 6 completed, 0 failed" in out.stdout
    [parent] = search_runs(tmp_path, "tags.`datamodels.stage` = 'train'", training=True)
    assert parent.info.run_name == "train-6" and parent.data.tags["n"] == "6"
    children = search_runs(tmp_path, f"tags.mlflow.parentRunId = '{parent.info.run_id}'", training=True)
    assert sorted(c.info.run_name for c in children) == [f"model-{i}" for i in range(6)]
    assert all(c.info.status == "FINISHED" and c.data.metrics["index"] == float(c.data.params["index"])
               for c in children)


def test_ctrl_c_while_child_runs_are_flushed_stops_the_flush_and_counts_what_was_not_written(own_store, monkeypatch):
    import _thread
    import signal
    import threading

    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.tracking.child_runs import ChildRunWriter

    monkeypatch.setenv("DATAMODELS_CHILD_RUNS", "api")  # ~15 ms per run: 600 take seconds
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever set another
    try:
        with pytest.raises(KeyboardInterrupt), tracking.run("train", name="train-600") as parent:
            writer = ChildRunWriter(parent.info.run_id)
            for rec in _records(600):
                writer.add(rec)
            threading.Timer(1.0, _thread.interrupt_main).start()  # Ctrl-C
            writer.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not writer._thread.is_alive()
    children = own_store.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                     max_results=1000)
    assert 0 < len(children) == writer.written < 600
    assert writer.lost == 600 - writer.written  # what the one-line warning at close reports
    assert own_store.get_run(parent.info.run_id).info.status == "KILLED"

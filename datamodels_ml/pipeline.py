"""The end-to-end pipeline (``demo`` command, MLproject ``main``): init -> train -> write_dataset -> regress -> evaluate.

One parent MLflow run ("demo") holds one nested run per stage. A stage that already finished with
the same inputs is reused, not redone: it adds no nested run, the demo run is tagged
``pipeline.<stage>=reused`` with a note (``pipeline.<stage>_note``):

* init: creating a store with the same spec is a no-op; train resumes, so it only runs what is missing;
* write_dataset: skipped when the beton's manifest lists exactly the store's completed models and keys;
* regress: skipped when ``out_dir/manifest.json`` records the same config and the same beton;
* evaluate: always rerun (seconds).

So rerunning ``make demo`` after an interruption picks up where it stopped, and rerunning a finished
demo only re-scores it.
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from datamodels_ml.errors import UserError


@dataclass
class DemoConfig:
    store: str = field(default="data/digits/store", metadata={"help": "store directory (created from spec)"})
    spec: str = field(default="configs/digits_spec.json", metadata={"help": "spec JSON of the store"})
    main: str = field(default="datamodels_ml.examples.digits", metadata={"help": "training script module"})
    n: int = field(default=1500, metadata={"help": "models to train (indices 0..n-1; finished ones are kept)"})
    jobs: int = field(default=0, metadata={"help": "CPU slots for train (0: one per core)"})
    gpus: int = field(default=0, metadata={"help": "GPUs for train (0: CPU only)"})
    args: dict[str, Any] = field(default_factory=dict, metadata={"help": "args.NAME=VALUE reach main as keyword arguments"})
    x_name: str = field(default="masks", metadata={"help": "store key of the masks"})
    y_name: str = field(default="margins", metadata={"help": "store key of the outputs to model"})
    beton: str = field(default="data/digits/reg_data.beton", metadata={"help": "FFCV dataset written from the store"})
    reg_config: str = field(default="configs/reg.yaml", metadata={"help": "regression config (YAML)"})
    results: str = field(default="data/digits/reg_results", metadata={"help": "regression output directory (cfg.out_dir)"})
    reg: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "overrides of the regression config, e.g. reg.cfg.k=20 reg.data.num_train=1000"})
    evaluate_out: str = field(default="data/digits/evaluate", metadata={"help": "directory for evaluate's CSV and plots"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


@dataclass
class StageResult:
    name: str
    status: str  # "ran" or "reused"
    seconds: float
    note: str = ""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _reused_run(name: str, params: dict[str, Any], note: str) -> None:
    """Record a reused stage on the demo run itself (tags ``pipeline.<stage>=reused`` and
    ``pipeline.<stage>_note``), not as a run of its own: a rerun adds no run per reused stage."""
    from datamodels_ml.tracking import runs as tracking

    del params  # the run that did the work holds them
    tracking.set_tags({f"pipeline.{name}_note": note})


# -- stages ----------------------------------------------------------------------------------------
def stage_init(cfg: DemoConfig) -> StageResult:
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.store.spec import load_spec
    from datamodels_ml.store.layout import SPEC_FILE
    from datamodels_ml.store.store import create_store

    t0 = time.perf_counter()
    spec = load_spec(cfg.spec)
    if cfg.n > spec.num_models:
        raise UserError(f"n={cfg.n} but the spec {cfg.spec} declares only {spec.num_models} models")
    existed = os.path.isfile(os.path.join(cfg.store, SPEC_FILE))
    store = create_store(cfg.store, spec)  # a no-op for the same spec; an error for another one
    params = {"spec": cfg.spec, "store": cfg.store, "num_models": spec.num_models}
    if existed:
        note = f"store {store.path} exists with this spec ({int(store.completed.sum())} models complete)"
        _say(f"init: {note}: skipped")
        _reused_run("init", params, note)
        return StageResult("init", "reused", time.perf_counter() - t0, note)
    with tracking.run("init", name=f"init-{spec.num_models}", params=params, tags={"pipeline.stage": "init"}):
        tracking.log_artifact(store.path / SPEC_FILE)
    _say(f"init: created store {store.path} for {spec.num_models} models")
    return StageResult("init", "ran", time.perf_counter() - t0)


def stage_train(cfg: DemoConfig) -> StageResult:
    from datamodels_ml.training.train import TrainConfig, train
    from datamodels_ml.store.store import Store

    t0 = time.perf_counter()
    done = Store(cfg.store, writable=False).completed[: cfg.n]
    if done.all():
        note = f"all {cfg.n} models are complete in {cfg.store}"
        _say(f"train: {note}: skipped")
        _reused_run("train", {"store": cfg.store, "n": cfg.n, "main": cfg.main}, note)
        return StageResult("train", "reused", time.perf_counter() - t0, note)
    train(TrainConfig(store=cfg.store, main=cfg.main, n=cfg.n, gpus=cfg.gpus, jobs=cfg.jobs,
                      args=dict(cfg.args), progress=cfg.progress))
    return StageResult("train", "ran", time.perf_counter() - t0,
                       f"resumed: {int(done.sum())} were already complete" if done.any() else "")


def beton_is_current(cfg: DemoConfig) -> bool:
    """True when the beton's manifest lists exactly the store's completed models, with the same keys."""
    from datamodels_ml.dataset.reader import read_manifest
    from datamodels_ml.store.store import Store

    if not os.path.isfile(cfg.beton):
        return False
    m = read_manifest(cfg.beton)
    if not m:
        return False
    store = Store(cfg.store, writable=False)
    written = sorted(int(i) for i in list(m.get("indices", [])) + list(m.get("dropped", [])))
    return (m.get("store") == str(store.path.resolve()) and m.get("x_name") == cfg.x_name
            and m.get("y_name") == cfg.y_name and written == [int(i) for i in store.completed_indices()])


def _check_beton_is_ours(cfg: DemoConfig) -> None:
    """The demo replaces its beton (force): only a file write_dataset wrote, recognised by its manifest."""
    from datamodels_ml.dataset.reader import manifest_path, read_manifest

    if os.path.lexists(cfg.beton) and read_manifest(cfg.beton) is None:
        raise UserError(f"beton={cfg.beton} exists but was not written by write_dataset (no {manifest_path(cfg.beton)} "
                        "beside it): choose another beton path; the demo replaces only files it wrote")


def _check_outputs(cfg: DemoConfig, rc) -> None:
    """Before training: the beton and the results directory are new or ours (the demo replaces them)."""
    from datamodels_ml.regression.output_dir import check_out_dir

    _check_beton_is_ours(cfg)
    check_out_dir(rc)


def stage_write_dataset(cfg: DemoConfig) -> StageResult:
    from datamodels_ml.dataset.write_dataset import WriteDatasetConfig, write_dataset

    t0 = time.perf_counter()
    if beton_is_current(cfg):
        note = f"{cfg.beton} holds the store's completed models and keys"
        _say(f"write_dataset: {note}: skipped")
        _reused_run("write_dataset", {"store": cfg.store, "out": cfg.beton, "x_name": cfg.x_name,
                                      "y_name": cfg.y_name}, note)
        return StageResult("write_dataset", "reused", time.perf_counter() - t0, note)
    _check_beton_is_ours(cfg)
    write_dataset(WriteDatasetConfig(store=cfg.store, out=cfg.beton, x_name=cfg.x_name, y_name=cfg.y_name,
                                     force=True, progress=cfg.progress))
    return StageResult("write_dataset", "ran", time.perf_counter() - t0)


def regress_config(cfg: DemoConfig):
    """The regression config: the YAML, then the pipeline's paths, then the ``reg`` overrides."""
    from datamodels_ml.config import to_dotlist
    from datamodels_ml.evaluation.budget import load_regress_config

    tokens = [f"data.data_path={cfg.beton}", f"cfg.out_dir={cfg.results}",
              f"cfg.progress={'true' if cfg.progress else 'false'}"]
    return load_regress_config(cfg.reg_config, tokens + to_dotlist(cfg.reg) + ["cfg.force=true"])


def _completed_count(store: str) -> int:
    from datamodels_ml.store.layout import SPEC_FILE
    from datamodels_ml.store.store import Store

    return int(Store(store, writable=False).completed.sum()) if os.path.isfile(os.path.join(store, SPEC_FILE)) else 0


def _check_split(used: int, rows: int) -> None:
    """The regression must leave some models out for evaluate."""
    if rows and used >= rows:
        raise UserError(f"the regression uses data.num_train + data.num_val = {used} models but there are only "
                        f"{rows}: none would be left to evaluate on; raise n or lower them (reg.data.num_train=...)")


def stage_regress(cfg: DemoConfig) -> StageResult:
    from datamodels_ml.dataset.reader import read_manifest
    from datamodels_ml.regression.output_dir import is_up_to_date
    from datamodels_ml.regression.regress import regress

    t0 = time.perf_counter()
    rc = regress_config(cfg)
    _check_split(rc.data.num_train + rc.data.num_val, int((read_manifest(cfg.beton) or {}).get("num_rows", 0)))
    if is_up_to_date(rc):
        note = f"{cfg.results} holds a regression of this beton with this config"
        _say(f"regress: {note}: skipped")
        _reused_run("regress", {"config": cfg.reg_config, "out_dir": cfg.results, "data_path": cfg.beton}, note)
        return StageResult("regress", "reused", time.perf_counter() - t0, note)
    if (Path(cfg.results) / "datamodels.pt").is_file():
        _say(f"regress: the config or the data changed: refitting into {cfg.results}")
    regress(rc)
    return StageResult("regress", "ran", time.perf_counter() - t0)


def stage_evaluate(cfg: DemoConfig):
    from datamodels_ml.evaluation.evaluate import EvaluateConfig, run_evaluation

    t0 = time.perf_counter()
    _say("evaluate:")
    result = run_evaluation(EvaluateConfig(datamodels=str(Path(cfg.results) / "datamodels.pt"), store=cfg.store,
                                           x_name=cfg.x_name, y_name=cfg.y_name, out=cfg.evaluate_out))
    return StageResult("evaluate", "ran", time.perf_counter() - t0), result


# -- the command -----------------------------------------------------------------------------------
def _ui_hint() -> str:
    from datamodels_ml.tracking import backend as tracking_store

    uri = tracking_store.tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.resolve() == (Path.cwd() / "mlflow.db").resolve():
            return "open the results: make ui  (it prints the address of the runs table)"
        return f"open the results: python -m datamodels_ml.tracking.ui --backend-store-uri {uri}  (prints the runs table's address)"
    return f"open the results in the MLflow UI at {uri}"


def demo(cfg: DemoConfig) -> int:
    """Run the digits example end to end (init, train, write_dataset, regress, evaluate), reusing finished stages."""
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.config import to_flat_dict

    if cfg.n <= 0:
        raise UserError(f"n must be a positive number of models, got {cfg.n}")
    rc = regress_config(cfg)  # a bad regression config fails now, not after training
    _check_outputs(cfg, rc)
    _check_split(rc.data.num_train + rc.data.num_val, max(cfg.n, _completed_count(cfg.store)))
    from datamodels_ml.training.local_slots import check_gpus_visible, slot_environments

    slot_environments(cfg.gpus, cfg.jobs)  # wrong gpus/jobs fail before init creates the store
    check_gpus_visible(cfg.gpus)
    t0 = time.perf_counter()
    stages: list[StageResult] = []
    steps: list[Callable[[DemoConfig], StageResult]] = [stage_init, stage_train, stage_write_dataset, stage_regress]
    with tracking.run("demo", name=f"demo-{cfg.n}", params=to_flat_dict(cfg),
                      tags={"pipeline.stage": "pipeline", "n": cfg.n, "jobs": cfg.jobs, "gpus": cfg.gpus}) as parent:
        for step in steps:
            stages.append(step(cfg))
            tracking.set_tags({f"pipeline.{stages[-1].name}": stages[-1].status})
        stage, result = stage_evaluate(cfg)
        stages.append(stage)
        total = time.perf_counter() - t0
        tracking.log_metrics({**{k: v for k, v in result.scores.metrics().items()},
                              "seconds": total, **{f"seconds_{s.name}": s.seconds for s in stages}})
        tracking.set_tags({"pipeline.evaluate": "ran", "pipeline.reused_stages":
                           ",".join(s.name for s in stages if s.status == "reused") or "none"})
        for name in ("digits_influence", "scatter", "per_target"):
            if name in result.files:
                tracking.log_artifact(result.files[name], "evaluate")
        run_id = parent.info.run_id
    _say("")
    _say(f"{'stage':<14} {'status':<8} {'seconds':>8}")
    for s in stages:
        _say(f"{s.name:<14} {s.status:<8} {s.seconds:>8.1f}")
    _say(f"{'total':<14} {'':<8} {total:>8.1f}")
    sc = result.scores
    _say(f"\nLDS = {sc.lds:.4f} on {sc.n_models} held-out models, {sc.n_targets} targets "
         f"(mean Pearson {sc.pearson:.4f}, mean R^2 {sc.r2:.4f})")
    _say(f"files: {cfg.results}/datamodels.pt, {cfg.evaluate_out}/ "
         f"({', '.join(sorted(Path(p).name for p in result.files.values()))})")
    main, training = tracking.experiments_of(parent)
    ran = [s.name for s in stages if s.status == "ran"]
    _say(f"MLflow: parent run {run_id} ('demo-{cfg.n}') in experiment '{main}', one nested run per stage it ran "
         f"({', '.join(ran)}; reused stages are tags on it); train runs and their model runs in '{training}'")
    _say(_ui_hint())
    return 0


__all__ = ["DemoConfig", "demo", "beton_is_current", "regress_config"]

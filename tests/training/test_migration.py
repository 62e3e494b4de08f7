"""Coming from the original MadryLab datamodels: its training scripts and command lines run unchanged.

A script written for the original (fastargs sections, ``main(index, logdir)`` that collects the
command line itself; tests/mains/fastargs_cifar.py) is run through ``worker`` with the original's
flags and through ``train``, and every row must hold the values derived from the options passed.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import MAINS, search_runs
from datamodels_ml.cli import apply_aliases, bare_flags, split_script_options
from datamodels_ml.errors import UserError
from datamodels_ml.training.train import TrainConfig
from datamodels_ml.training.worker import WorkerConfig

pytest.importorskip("fastargs")

DEFAULT_DATASET = "/mnt/cfs/datasets/cifar_ffcv/cifar_train.beton"


@pytest.fixture
def original(cli, tmp_path):
    """A store (made with the original initialize_store's flags) and the original-style script
    ``train_cifar.py`` importable from the test's cwd."""
    shutil.copy(MAINS / "fastargs_cifar.py", tmp_path / "train_cifar.py")
    cli("init", "--logging.logdir=st", f"--logging.spec={MAINS / 'fastargs_cifar_spec.json'}", check=True)
    return tmp_path / "st"


def rows(store: Path):
    return (np.load(store / "_completed.npy"), np.load(store / "masks.npy"), np.load(store / "margins.npy"))


def expected_margins(index, lr, epochs, dataset=DEFAULT_DATASET, scale=1.0):
    return np.array([lr, epochs, len(dataset), scale * index * lr], dtype=np.float32)


def expected_mask(index):
    return np.random.default_rng(index).random(8) > 0.5


def test_worker_with_the_original_flags(cli, original):
    out = cli("worker", "--worker.index=3", "--worker.main_import=train_cifar", f"--worker.logdir={original}",
              "--training.lr=0.25", "--data.train_dataset", "/d/x.beton", "--unknown.option=7", check=True)
    assert "model 3 completed" in out.stdout
    done, masks, margins = rows(original)
    assert done.nonzero()[0].tolist() == [3]
    np.testing.assert_array_equal(margins[3], expected_margins(3, 0.25, 24, "/d/x.beton"))
    np.testing.assert_array_equal(masks[3], expected_mask(3))
    [run] = search_runs(original.parent, training=True)
    assert run.info.run_name == "model-3"
    assert run.data.params["argv"] == "--training.lr=0.25 --data.train_dataset /d/x.beton --unknown.option=7"
    assert run.data.params["store"] == str(original) and run.data.params["index"] == "3"


def test_worker_combines_our_keys_argv_and_options(cli, original):
    cli("worker", "store=st", "index=2", "main=train_cifar", "args.scale=3", "argv=[--training.epochs=5]",
        "--training.lr=0.5", check=True)
    again = ["--worker.index=2", "--worker.main_import=train_cifar", "--worker.logdir=st", "--training.lr=2"]
    assert "already complete" in cli("worker", *again, check=True).stdout
    np.testing.assert_array_equal(rows(original)[2][2], expected_margins(2, 0.5, 5, scale=3.0))
    # the original's bare do_if_complete flag and its job_timeout (the model runs in a runner process)
    cli("worker", *again, "--worker.do_if_complete", "--worker.job_timeout=120", check=True)
    done, _, margins = rows(original)
    assert done.nonzero()[0].tolist() == [2]
    np.testing.assert_array_equal(margins[2], expected_margins(2, 2.0, 24))


def test_train_passes_options_to_every_index(cli, original, tmp_path):
    (tmp_path / "extra.yaml").write_text("data:\n  train_dataset: /from/yaml.beton\n")  # the script's -C file
    cli("train", "store=st", "main=train_cifar", "n=6", "jobs=2", "progress=false",
        "--training.lr=0.125", "--training.epochs", "3", "-C", "extra.yaml", check=True)
    done, masks, margins = rows(original)
    assert done.all()
    for i in range(6):
        np.testing.assert_array_equal(margins[i], expected_margins(i, 0.125, 3, "/from/yaml.beton"))
        np.testing.assert_array_equal(masks[i], expected_mask(i))


@pytest.mark.parametrize("args, message", [
    (["index=1", "--worker.index=1", "main=train_cifar", "store=st"],
     "error: 'index' and 'worker.index' name the same setting: give one of them"),
    (["--worker.main_import=train_cifar", "store=st"],
     "error: missing required config key 'index'"),
    (["--worker.index=1", "--worker.main_import=train_cifar", "--worker.logdir=st", "--worker.bogus=1"],
     "error: unknown config key 'worker.bogus' (the original's spellings accepted here: worker.index, "
     "worker.main_import, worker.logdir, worker.do_if_complete, worker.job_timeout)"),
])
def test_worker_flag_errors(cli, original, args, message):
    out = cli("worker", *args, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == message
    assert not rows(original)[0].any()


def test_script_that_fails_is_a_failed_model(cli, original):
    # a value fastargs cannot convert: the script's own validation exits, recorded as a failure
    out = cli("train", "store=st", "main=train_cifar", "n=2", "jobs=1", "progress=false",
              "--training.epochs=many", check=False)
    assert out.returncode == 1
    assert not rows(original)[0].any()


@pytest.mark.parametrize("schema", [WorkerConfig, TrainConfig])
@pytest.mark.parametrize("args, ours, script", [
    (["store=s", "--training.lr=0.5"], ["store=s"], ["--training.lr=0.5"]),
    (["--training.lr", "0.5", "store=s"], ["store=s"], ["--training.lr", "0.5"]),
    (["--data.flip", "store=s"], ["store=s"], ["--data.flip"]),
    (["--data.flip", "--training.lr=1"], [], ["--data.flip", "--training.lr=1"]),
    (["-C", "c.yaml", "--store=s"], ["--store=s"], ["-C", "c.yaml"]),
    (["-C=c.yaml"], [], ["--config-file=c.yaml"]),
    (["--args.k=1", "args.j=2"], ["--args.k=1", "args.j=2"], []),
    (["training.lr=0.5"], ["training.lr=0.5"], []),  # our spelling stays ours: an unknown key, refused
])
def test_split_script_options(schema, args, ours, script):
    assert split_script_options(schema, args) == (ours, script)


def test_original_worker_flags_are_ours_only_for_worker():
    args = ["--worker.index=3", "--worker.do_if_complete"]
    assert split_script_options(WorkerConfig, args) == (args, [])
    assert split_script_options(TrainConfig, args) == ([], args)


@pytest.mark.parametrize("args, expected", [
    (["--worker.do_if_complete"], ["worker.do_if_complete=true"]),
    (["--overwrite", "store=s"], ["overwrite=true", "store=s"]),
    (["--overwrite", "false"], ["--overwrite", "false"]),
    (["--worker.index", "3"], ["--worker.index", "3"]),
    (["--data.flip"], ["--data.flip"]),
])
def test_bare_flags(args, expected):
    assert bare_flags(WorkerConfig, args) == expected


def test_aliases_rewrite_and_refuse_both_spellings():
    assert apply_aliases(WorkerConfig, ["worker.logdir=st", "worker.job_timeout=5", "args.x=1"]) == \
        ["store=st", "timeout=5", "args.x=1"]
    with pytest.raises(UserError, match=r"^'store' and 'worker.logdir' name the same setting: give one of them$"):
        apply_aliases(WorkerConfig, ["worker.logdir=st", "store=st"])


def test_help_documents_the_pass_through(cli):
    for command in ("worker", "train"):
        out = cli(command, "--help", check=True)
        assert "argv" in out.stdout and "--section.key=value" in out.stdout
    assert "worker.main_import" in cli("worker", "--help", check=True).stdout


def test_original_workflow_on_an_original_store(cli, tmp_path):
    """An original-layout store (what initialize_store writes: one open_memmap per key and
    _completed, no spec.json), the original-style script, the original flags from end to end."""
    import json

    shutil.copy(MAINS / "fastargs_cifar.py", tmp_path / "train_cifar.py")
    spec = json.loads((MAINS / "fastargs_cifar_spec.json").read_text())
    store = tmp_path / "orig"
    store.mkdir()
    schema = dict(spec["schema"], _completed={"shape": [], "dtype": "bool_"})
    for key, meta in schema.items():
        np.lib.format.open_memmap(store / f"{key}.npy", mode="w+", dtype=getattr(np, meta["dtype"]),
                                  shape=(spec["num_models"], *meta["shape"])).flush()

    cli("worker", "--worker.index=0", "--worker.main_import=train_cifar", f"--worker.logdir={store}",
        "--training.lr=0.5", "--training.epochs=2", check=True)
    cli("train", f"store={store}", "main=train_cifar", "n=4", "jobs=1", "progress=false",
        "--training.lr=0.5", "--training.epochs=2", check=True)
    out = store / "reg_data.beton"
    cli("write_dataset", "--cfg.data_dir", str(store), "--cfg.out_path", str(out), "--cfg.y_name", "margins",
        "--cfg.x_name", "masks", "progress=false", check=True)

    assert not (store / "spec.json").exists()  # the store keeps its original layout
    done, masks, margins = rows(store)
    assert done.nonzero()[0].tolist() == [0, 1, 2, 3]
    from datamodels_ml.dataset.reader import read_beton

    x, y, idx = read_beton(out)
    assert idx.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(x, masks[:4])
    np.testing.assert_array_equal(y, margins[:4])
    for i in range(4):
        np.testing.assert_array_equal(y[i], expected_margins(i, 0.5, 2))
        np.testing.assert_array_equal(x[i], expected_mask(i))

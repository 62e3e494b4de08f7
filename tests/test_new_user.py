"""What a new user meets first (issue 22): wrong inputs that used to pass quietly, the counts of
``status``, ``--help`` and progress wording, the path plot's markers."""

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS

SPEC = CONFIGS / "minimal_spec.json"


@pytest.fixture
def complete_store(cli):
    cli("train", f"spec={SPEC}", "store=st", "main=datamodels_ml.examples.minimal", "n=4", "jobs=1",
        "progress=false", check=True)
    return "st"


def test_train_with_a_misspelt_main_on_a_complete_store_fails(cli, complete_store):
    proc = cli("train", "store=st", "main=datamodels_ml.examples.minimla", "n=4", "jobs=1", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("error: cannot import main module 'datamodels_ml.examples.minimla': no module named "
                                   "'datamodels_ml.examples.minimla' (give a dotted module importable from the "
                                   "current directory, or a path to a .py file)")
    assert "nothing to do" not in proc.stdout and "Traceback" not in proc.stderr
    ok = cli("train", "store=st", "main=datamodels_ml.examples.minimal", "n=4", "jobs=1", check=True)
    assert "all 4 models are already complete" in ok.stdout


def test_status_counts_against_num_models_and_the_last_train(cli, complete_store):
    status = cli("status", "store=st", check=True).stdout
    assert "completed: 4/100 (num_models of the spec)" in status
    assert "missing (96): 4-99" in status
    assert "last train: n=4 of num_models=100: 4/4 complete, none missing below n" in status


def test_help_says_each_default_once(cli):
    for command in ("evaluate", "budget", "write_dataset", "regress", "train"):
        text = cli(command, "--help", check=True).stdout
        doubled = [line for line in text.splitlines() if "(default" in line and line.count("(default") > 1]
        assert doubled == [], doubled
    text = cli("evaluate", "--help", check=True).stdout
    assert re.search(r"^  store\s+store of the models \(default: the one recorded in datamodels.pt\)$", text, re.M)


def test_regress_progress_counts_iterations_for_fista():
    from datamodels_ml.progress import PathBar

    assert PathBar(5, 3, 1, progress=False).bar.unit == "iteration"
    assert PathBar(5, 3, 1, progress=False, unit="epoch").bar.unit == "epoch"


def test_path_plot_marks_each_targets_own_lambda():
    from datamodels_ml.figures import path_figure

    lam = np.array([1.0, 0.1, 0.01])
    fig = path_figure(lam, [2.0, 1.0, 1.5], [1.9, 0.8, 0.5], [1, 10, 50], selected=[0.1, 0.1, 0.01, np.nan])
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "each target's selected λ (3 targets)" in labels
    assert "median selected λ/λ_max = 0.1" in labels
    assert not any("index" in label for label in labels)

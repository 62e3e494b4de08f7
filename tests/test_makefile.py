"""The Makefile a new user meets: every path follows one name, ``make help`` lists every variable
(plain text when piped), and the README documents them all."""

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args):
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _commands(*args):
    """The datamodels_ml commands ``make -n`` would run (set-up lines left out)."""
    return [line for line in _make("-n", "-W", "Makefile", "-o", "setup", *args).splitlines()
            if "-m datamodels_ml " in line]


def _variables():
    text = (ROOT / "Makefile").read_text()
    return re.findall(r"^([A-Z_]+)\s*\??=", text, re.M)


@pytest.mark.parametrize("given, data", [([], "data/digits"), (["NAME=c10"], "data/c10"),
                                         (["STORE=/scratch/me/store"], "/scratch/me")])
def test_every_path_follows_the_store(given, data):
    cmds = _commands("write_dataset", "regress", "evaluate", "demo", *given)
    write, regress, evaluate, demo = cmds
    store = "/scratch/me/store" if given and given[0].startswith("STORE") else f"{data}/store"
    assert f"store={store} out={data}/reg_data.beton " in write
    assert f"data.data_path={data}/reg_data.beton cfg.out_dir={data}/reg_results" in regress
    assert f"datamodels={data}/reg_results/datamodels.pt store={store} out={data}/evaluate" in evaluate
    assert (f"store={store} beton={data}/reg_data.beton results={data}/reg_results "
            f"evaluate_out={data}/evaluate") in demo


INTERNAL = {"SHELL", "PY", "STAMP", "DEB_PKGS", "DM", "DATA", "PYTEST"}  # Makefile variables not for the user to set


def test_help_lists_every_variable_without_colour_when_piped():
    text = _make("help")
    assert "\033" not in text
    listed = set(re.findall(r"^  ([A-Z_]+)=", text, re.M))
    assert set(_variables()) - INTERNAL == listed


def test_readme_documents_every_variable():
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in _variables() if v not in INTERNAL and f"`{v}" not in readme]
    assert missing == []


@pytest.mark.parametrize("jobs", ["0", "3"])
def test_make_test_runs_one_pytest_worker_per_cpu_allotted_at_most_four_unless_told(jobs):
    from datamodels_ml.cpus import allotment

    [line] = [ln for ln in _make("-n", "-o", "setup", "test", f"TEST_JOBS={jobs}").splitlines() if "pytest" in ln]
    assert "--dist loadfile -n $(" in line
    workers = subprocess.run(["bash", "-c", f"cd {ROOT} && echo {line.split(' -n ', 1)[1]}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert workers == (jobs if jobs != "0" else str(min(4, allotment())))

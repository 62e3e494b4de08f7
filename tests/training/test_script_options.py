"""A fastargs script's options reach its ``@param``-decorated main as under the original worker,
which collects the command line into fastargs's config after importing the module
(``datamodels_ml.training.script_options``): the script never calls ``collect_argparse_args`` itself."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from datamodels_ml.training.script_options import collect_declared

MAINS = Path(__file__).parent.parent / "mains"
SPEC = Path(__file__).resolve().parent.parent.parent / "configs" / "minimal_spec.json"
HAS_FASTARGS = importlib.util.find_spec("fastargs") is not None


class FakeConfig:
    """The two calls of fastargs's Config that the original worker makes, recorded."""

    def __init__(self, sections):
        self.sections = sections
        self.calls = []

    def augment_argparse(self, parser):
        parser.add_argument("--exp.multiple")
        self.calls.append("augment_argparse")

    def collect_argparse_args(self, parser):
        self.calls.append(("collect_argparse_args", vars(parser.parse_known_args(["--exp.multiple=3"])[0])))


def test_collects_when_the_module_declared_sections():
    config = FakeConfig({("exp",): object()})
    assert collect_declared(config) is True
    assert config.calls == ["augment_argparse", ("collect_argparse_args", {"exp.multiple": "3"})]


def test_leaves_a_script_without_sections_alone():
    config = FakeConfig({})
    assert collect_declared(config) is False
    assert config.calls == []


@pytest.mark.skipif(not HAS_FASTARGS, reason="fastargs is not installed (pip install -e '.[test]' installs it)")
@pytest.mark.parametrize("options, expected", [(["--exp.multiple=3"], 3), (["--exp.multiple", "5"], 5), ([], 1)])
def test_worker_gives_the_options_to_a_param_main(cli, tmp_path, options, expected):
    shutil.copy(MAINS / "fa_main.py", tmp_path / "fa_main.py")
    cli("init", f"spec={SPEC}", "store=st", check=True)
    out = cli("worker", "--worker.index=2", "--worker.main_import=fa_main", f"--worker.logdir={tmp_path / 'st'}",
              *options, check=True)
    assert "model 2 completed" in out.stdout
    assert np.load(tmp_path / "st" / "_completed.npy").nonzero()[0].tolist() == [2]
    np.testing.assert_array_equal(np.load(tmp_path / "st" / "values.npy")[2], np.full(10, expected, np.uint8))


@pytest.mark.skipif(not HAS_FASTARGS, reason="fastargs is not installed (pip install -e '.[test]' installs it)")
def test_train_gives_the_options_to_every_index(cli, tmp_path):
    shutil.copy(MAINS / "fa_main.py", tmp_path / "fa_main.py")
    cli("train", f"spec={SPEC}", "store=st", "main=fa_main", "n=4", "jobs=2", "progress=false", "--exp.multiple=3",
        check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "st" / "values.npy")[:4], np.full((4, 10), 3, np.uint8))

"""Command-line spellings: ``key=value``, ``--key=value``, ``--key value`` and the original's ``-C FILE``."""

import pytest

from datamodels_ml.cli import normalize_args
from datamodels_ml.errors import UserError


@pytest.mark.parametrize("argv, expected", [
    (["cfg.k=30"], ["cfg.k=30"]),
    (["--cfg.k=30", "--data.num_train", "100"], ["cfg.k=30", "data.num_train=100"]),
    (["-C", "reg.yaml", "--cfg.k=5"], ["config=reg.yaml", "cfg.k=5"]),
    (["-C=reg.yaml"], ["config=reg.yaml"]),
    (["--config-file", "reg.yaml"], ["config=reg.yaml"]),
])
def test_spellings(argv, expected):
    assert normalize_args(argv, config_key="config") == expected


@pytest.mark.parametrize("argv, config_key, message", [
    (["-C"], "config", r"option '-C' needs a file"),
    (["-C", "x.yaml"], None, r"option '-C' names a config file, which this command does not read"),
    (["--cfg.k"], "config", r"option '--cfg.k' needs a value"),
])
def test_bad_spellings(argv, config_key, message):
    with pytest.raises(UserError, match=message):
        normalize_args(argv, config_key=config_key)

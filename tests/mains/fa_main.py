"""A training script for the original MadryLab worker that never parses its command line itself:
its ``main`` is ``@param``-decorated and relies on the worker to collect fastargs's options
(``--exp.multiple=3``), as the original's ``make_config`` does. Spec: configs/minimal_spec.json."""

import numpy as np
from fastargs import Param, Section
from fastargs.decorators import param

Section("exp", "the toy's settings").params(multiple=Param(int, "the value every entry takes", default=1))


@param("exp.multiple")
def main(index, logdir, multiple):
    return {"values": np.full(10, multiple, dtype=np.uint8), "index": np.int64(index)}

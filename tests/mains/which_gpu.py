"""Test main: records which GPU its slot process sees (CUDA_VISIBLE_DEVICES), without using CUDA."""

import os

import numpy as np


def main(*, index, logdir):
    seen = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    code = -1 if seen == "" else (-2 if seen == "unset" else int(seen))
    return {"values": np.zeros(10, np.uint8), "index": np.int64(code)}

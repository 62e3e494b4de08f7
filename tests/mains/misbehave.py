"""Test main: index 1 hangs, index 2 kills its own process, index 3 returns a wrong shape."""

import os
import time

import numpy as np


def main(*, index, logdir):
    if index == 1:
        time.sleep(1000)
    if index == 2:
        os._exit(3)
    if index == 3:
        return {"values": np.zeros(11, np.uint8), "index": np.int64(index)}
    return {"values": np.full(10, index, np.uint8), "index": np.int64(index)}

"""Test main: fails for every index divisible by `fail_every` unless `fixed`; logs each call."""

import os
import time

import numpy as np


def main(*, index, logdir, fail_every=3, fixed=False, sleep=0.0, multiple=1):
    store = os.path.dirname(os.path.dirname(logdir))
    with open(os.path.join(store, "calls.log"), "a") as f:
        f.write(f"{index}\n")
    if sleep:
        time.sleep(sleep)
    print(f"training model {index}")  # goes to workers/<index>/output.log, not the protocol pipe
    if not fixed and index % fail_every == 0:
        raise RuntimeError(f"planted failure at {index}")
    return {"values": np.full(10, (index * multiple) % 256, np.uint8), "index": np.int64(index)}

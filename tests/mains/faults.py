"""Test main for the fault suite: row i holds ``values = (i * multiple) % 256``, ``index = i`` and a
``loss``; each call is appended to ``<store>/calls.log`` (so a test sees any row trained twice).

Knobs: ``sleep`` seconds per model; ``hang`` an index that hangs, swallowing whatever is raised
inside it (as user code with a broad ``except`` does) and starting a child process that must die
with it (its PID goes to ``<store>/hang.pid``); ``die_from`` indices from which main kills its own
process with SIGBUS (what a full disk does to a writer of a memmap); ``nan`` a ``-``-separated list
of indices whose loss is NaN. ``FAULTS_IMPORT_SECONDS`` (environment) makes the import that slow,
like a big framework's.
"""

import os
import signal
import subprocess
import time

import numpy as np

time.sleep(float(os.environ.get("FAULTS_IMPORT_SECONDS", "0")))


def main(*, index, logdir, multiple=1, sleep=0.0, hang=-1, die_from=-1, nan=""):
    store = os.path.dirname(os.path.dirname(logdir))
    with open(os.path.join(store, "calls.log"), "a") as f:
        f.write(f"{index}\n")
    if index == hang:
        child = subprocess.Popen(["sleep", "1000"])
        with open(os.path.join(store, "hang.pid"), "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
        while True:
            try:
                time.sleep(1000)
            except BaseException:  # noqa: BLE001 - a main that swallows everything, a timeout included
                break
    if 0 <= die_from <= index:
        os.kill(os.getpid(), signal.SIGBUS)
    if sleep:
        time.sleep(sleep)
    loss = np.float32("nan") if str(index) in str(nan).split("-") else np.float32(index / 10)
    return {"values": np.full(10, (index * multiple) % 256, np.uint8), "index": np.int64(index), "loss": loss}

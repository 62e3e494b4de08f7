"""No-op training script for the overhead benchmark: imports what a real main imports, trains nothing."""

import numpy as np
import torch  # noqa: F401  (a real main pays these imports)
import ffcv  # noqa: F401


def main(*, index, logdir):
    return {"masks": np.zeros(1000, dtype=bool), "margins": np.full(797, index, dtype=np.float32),
            "accuracy": np.float32(1.0)}

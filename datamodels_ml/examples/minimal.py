"""The toy example: every model records a uint8 vector equal to ``multiple`` (see configs/minimal_spec.json).

It trains nothing; it shows the training-script contract end to end:
``python -m datamodels_ml train store=/tmp/minimal spec=configs/minimal_spec.json main=datamodels_ml.examples.minimal n=10 args.multiple=3``
"""

import numpy as np


def main(*, index: int, logdir: str, multiple: int = 1) -> dict[str, np.ndarray]:
    return {"values": np.full(10, multiple, dtype=np.uint8), "index": np.int64(index)}

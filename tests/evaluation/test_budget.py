"""What each point of the model-budget curve consumes (``budget.consumed``); the curve itself runs on
the demo data in test_pipeline.py."""

import math

import numpy as np
import pytest

from datamodels_ml.evaluation.budget import consumed
from datamodels_ml.datamodel import Datamodels


def _fit(train, val):
    p = 4
    return Datamodels(weight=np.zeros((p, 1)), bias=np.zeros(1), mean=np.zeros(p), std=np.ones(p),
                      meta={"train_indices": np.array(train), "val_indices": np.array(val)})


DURATIONS = {i: 0.5 + i for i in range(10)}  # seconds of model i in its slot


@pytest.mark.parametrize("train, val, used, seconds", [
    ([0, 1, 2], [7, 8], 5, 0.5 * 5 + 0 + 1 + 2 + 7 + 8),  # train and validation models both count
    ([3], [], 1, 3.5),
    ([4, 5], [5, 6], 3, 1.5 + 15),  # a model in both is one model
    ([0, 1], [12], 3, math.nan),  # no time recorded for model 12: unknown, not guessed
])
def test_models_used_and_their_compute(train, val, used, seconds):
    n, compute = consumed(_fit(train, val), DURATIONS)
    assert n == used
    assert compute == pytest.approx(seconds, nan_ok=True)

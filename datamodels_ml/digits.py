"""The digits data set of the example: its fixed train/test split, and recognizing a store made from it.

``examples.digits`` trains on this split; ``evaluate`` draws the influence figure (``figures``) when the
store it scores has the split's shapes (x of 1000 features, y of 797 targets).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

N_TRAIN = 1000
N_TEST = 797


@lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [1000, 64], y_train, x_test [797, 64], y_test), pixels scaled to [0, 1]; fixed order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]



def is_digits(store: Any, x_name: str, y_name: str) -> bool:
    """True when the store's x/y have the digits example's shapes ([1000] masks, [797] outputs)."""
    schema = store.spec.schema
    return (x_name in schema and y_name in schema and schema[x_name].shape == (N_TRAIN,)
            and schema[y_name].shape == (N_TEST,))

"""The digits example's picture of a datamodel: a test image beside the training images that move it most.

For a few test images, one row: the test image, then its most helpful training images (largest
positive raw-scale weights: including them raises the test image's margin) and its most harmful
ones (most negative weights), each titled with its label and weight. ``evaluate`` draws it when the
store is a digits store (x of 1000 features, y of 797 targets).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datamodels_ml.examples.digits import N_TEST, N_TRAIN, load_split


def is_digits(store: Any, x_name: str, y_name: str) -> bool:
    """True when the store's x/y have the digits example's shapes ([1000] masks, [797] outputs)."""
    schema = store.spec.schema
    return (x_name in schema and y_name in schema and schema[x_name].shape == (N_TRAIN,)
            and schema[y_name].shape == (N_TEST,))


def pick_targets(n_targets: int, spearman_t: np.ndarray | None, count: int) -> list[int]:
    """Slice-relative targets to draw: those whose datamodels rank held-out models best, else the first ones."""
    if spearman_t is None or not np.isfinite(spearman_t).any():
        return list(range(min(count, n_targets)))
    s = np.where(np.isfinite(spearman_t), spearman_t, -np.inf)
    return [int(t) for t in np.argsort(-s, kind="stable")[:count]]


def influence_figure(dm: Any, spearman_t: np.ndarray | None = None, *, targets: list[int] | None = None,
                     count: int = 3, k: int = 5):
    """A matplotlib figure: one row per target, test image | k most helpful | k most harmful training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_train, y_train, x_test, y_test = load_split()
    targets = list(targets) if targets is not None else pick_targets(dm.n_targets, spearman_t, count)
    fig, axes = plt.subplots(len(targets), 1 + 2 * k, figsize=(1.45 * (1 + 2 * k), 1.75 * len(targets) + 0.4),
                             squeeze=False)
    for row, t in enumerate(targets):
        top = dm.top_k(t, k)
        test = top.absolute_target
        ax = axes[row, 0]
        ax.imshow(x_test[test].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"test {test}\nlabel {y_test[test]}", fontsize=8, color="tab:blue")
        cells = [(i, w, "tab:green") for i, w in zip(top.positive_indices, top.positive_weights)]
        cells += [(None, None, None)] * (k - len(top.positive_indices))
        cells += [(i, w, "tab:red") for i, w in zip(top.negative_indices, top.negative_weights)]
        cells += [(None, None, None)] * (k - len(top.negative_indices))
        for col, (i, w, color) in enumerate(cells, start=1):
            ax = axes[row, col]
            if i is not None:
                ax.imshow(x_train[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
                ax.set_title(f"train {int(i)} ({y_train[i]})\n{w:+.3f}", fontsize=7, color=color)
            else:
                ax.axis("off")  # fewer than k non-zero weights of this sign
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("test image | most helpful training images (green) | most harmful (red); "
                 "weight = change in margin", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["is_digits", "influence_figure", "pick_targets"]

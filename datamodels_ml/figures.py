"""Every matplotlib figure of the project (Agg backend, no display needed): the regularization path
(``regress``), predicted against actual outputs (``evaluate``), the model-budget curve (``budget``) and,
for the digits example, test images beside the training images that move them most (``evaluate``).

Each function returns a ``matplotlib.figure.Figure``; callers save it or log it to MLflow.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def path_figure(lam_ratio: Sequence[float], val_mse: Sequence[float], train_mse: Sequence[float],
                nnz: Sequence[float], *, selected: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """Validation/train MSE and mean non-zeros against λ/λ_max (log x axis), one point per λ index.

    NaN entries are left out. Each target picks its own λ, so no one point of the mean curve is
    "the" selection: ``selected`` holds each target's selected λ/λ_max, drawn as ticks along the
    bottom of the MSE panel, with their median as a dashed line.
    """
    lam = np.asarray(lam_ratio, dtype=float)
    val = np.asarray(val_mse, dtype=float)
    train = np.asarray(train_mse, dtype=float)
    nz = np.asarray(nnz, dtype=float)
    if not (lam.shape == val.shape == train.shape == nz.shape) or lam.ndim != 1:
        raise ValueError(f"path_figure needs four 1-D arrays of one length, got shapes "
                         f"{lam.shape}, {val.shape}, {train.shape}, {nz.shape}")
    ok = np.isfinite(lam) & (lam > 0)
    fig, (ax_mse, ax_nnz) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    ax_mse.plot(lam[ok], val[ok], "o-", ms=3, label="validation MSE")
    ax_mse.plot(lam[ok], train[ok], "s--", ms=3, label="train MSE")
    ax_nnz.plot(lam[ok], nz[ok], "o-", ms=3, color="tab:green", label="mean non-zeros per target")
    chosen = np.asarray(selected if selected is not None else [], dtype=float)
    chosen = chosen[np.isfinite(chosen) & (chosen > 0)]
    if chosen.size:
        ax_mse.plot(chosen, np.zeros_like(chosen), "|", color="r", ms=12, alpha=0.3,
                    transform=ax_mse.get_xaxis_transform(), label=f"each target's selected λ ({chosen.size} targets)")
        median = float(np.median(chosen))
        for ax in (ax_mse, ax_nnz):
            ax.axvline(median, color="r", lw=0.8, ls="--", alpha=0.6,
                       label=f"median selected λ/λ_max = {median:.3g}" if ax is ax_mse else None)
    for ax in (ax_mse, ax_nnz):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if ok.any():  # the path runs from λ_max (left) to small λ (right); x is shared by both panels
        ax_nnz.set_xlim(lam[ok].max() * 1.3, lam[ok].min() / 1.3)
    ax_mse.set_ylabel("MSE (mean over all targets)")
    ax_nnz.set_ylabel("non-zeros")
    ax_nnz.set_xlabel("λ / λ_max")
    ax_mse.set_title(title or "regularization path")
    return fig


def save_figure(fig: Figure, path: str) -> None:
    """Write ``fig`` to ``path`` and release its memory."""
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter_figure(pred: np.ndarray, actual: np.ndarray, scores: Any, *, max_points: int = 20000, seed: int = 0):
    """Predicted vs actual (all targets pooled, subsampled), the median target, and the Spearman histogram."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    flat_p, flat_a = pred.reshape(-1), actual.reshape(-1)
    if flat_p.size > max_points:
        pick = np.random.default_rng(seed).choice(flat_p.size, max_points, replace=False)
        flat_p, flat_a = flat_p[pick], flat_a[pick]
    ax = axes[0]
    ax.scatter(flat_a, flat_p, s=3, alpha=0.25, linewidths=0)
    lo, hi = float(min(flat_a.min(), flat_p.min())), float(max(flat_a.max(), flat_p.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--")
    ax.set(xlabel="actual output", ylabel="predicted output",
           title=f"all targets pooled ({scores.n_models} held-out models)")
    finite = np.flatnonzero(np.isfinite(scores.spearman_t))
    ax = axes[1]
    if finite.size:
        order = finite[np.argsort(scores.spearman_t[finite])]
        t = int(order[order.size // 2])
        ax.scatter(actual[:, t], pred[:, t], s=8, alpha=0.6)
        ax.set(xlabel="actual output", ylabel="predicted output",
               title=f"median target (slice index {t}): Spearman {scores.spearman_t[t]:.3f}")
        axes[2].hist(scores.spearman_t[finite], bins=40, color="tab:green")
    axes[2].axvline(scores.lds, color="black", ls="--", lw=1)
    axes[2].set(xlabel="Spearman correlation per target", ylabel="targets", title=f"LDS = {scores.lds:.3f}")
    fig.tight_layout()
    return fig


def budget_figure(rows: list[dict[str, Any]], unit: str = "core-seconds"):
    axes_x = [("models_used", "models used (train + validation)")]
    if all(np.isfinite(r["compute_seconds"]) for r in rows):
        axes_x.append(("compute_seconds", f"training compute of those models ({unit})"))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4.2), squeeze=False, sharey=True)
    for ax, (key, label) in zip(axes[0], axes_x):
        xs = [r[key] for r in rows]
        if all("lds_low" in r for r in rows):  # the bootstrap's 95% interval (evaluation.bootstrap)
            ax.fill_between(xs, [r["lds_low"] for r in rows], [r["lds_high"] for r in rows], alpha=0.2,
                            label="LDS 95% interval")
        ax.plot(xs, [r["lds"] for r in rows], marker="o", label="LDS (mean Spearman)")
        ax.plot(xs, [r["pearson"] for r in rows], marker="s", ls="--", label="mean Pearson")
        ax.set_xscale("log")
        ax.set(xlabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set(ylabel="correlation on held-out models")
    axes[0][0].legend()
    fig.suptitle(f"model budget ({rows[-1]['n_heldout']} held-out models, {rows[-1]['n_targets']} targets)")
    fig.tight_layout()
    return fig


def pick_targets(n_targets: int, spearman_t: np.ndarray | None, count: int) -> list[int]:
    """Slice-relative targets to draw: those whose datamodels rank held-out models best, else the first ones."""
    if spearman_t is None or not np.isfinite(spearman_t).any():
        return list(range(min(count, n_targets)))
    s = np.where(np.isfinite(spearman_t), spearman_t, -np.inf)
    return [int(t) for t in np.argsort(-s, kind="stable")[:count]]


def influence_figure(dm: Any, spearman_t: np.ndarray | None = None, *, targets: list[int] | None = None,
                     count: int = 3, k: int = 5):
    """A matplotlib figure: one row per target, test image | k most helpful | k most harmful training images."""
    from datamodels_ml.digits import load_split

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

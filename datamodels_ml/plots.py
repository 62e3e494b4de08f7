"""Matplotlib figures of the project (Agg backend, no display needed): the regularization path plot.

Each function returns a ``matplotlib.figure.Figure``; callers save it or log it to MLflow.
"""

from __future__ import annotations

from typing import Sequence

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

"""The held-out models of an evaluation: their masks and the outputs they actually produced.

From a store: every completed model of a second store (``heldout_store``), or the completed models
of the datamodels' own store outside the regression's ``train_indices`` and ``val_indices``, checked
against the datamodels (array names, shapes, target slice, the store's fingerprint). Or from a
ground-truth directory (``export_lds``, or the files of TRAK, kronfluence or dattri).
"""

import os
import sys
from dataclasses import dataclass

import numpy as np

from datamodels_ml.datamodel import Datamodels
from datamodels_ml.errors import UserError
from datamodels_ml.provenance import check_store

MIN_HELDOUT = 3



@dataclass
class HeldOut:
    """The held-out models' masks and actual outputs (the fitted slice of y), read from a store."""

    store: str
    indices: np.ndarray
    masks: np.ndarray
    actual: np.ndarray
    x_name: str
    y_name: str
    y_shape: tuple[int, ...]


def open_store(path: str, what: str):
    from datamodels_ml.store.store import Store

    if not path:
        raise UserError(f"no {what}: give store=DIR")
    if not os.path.isdir(path):
        raise UserError(f"{what} not found: {path}")
    return Store(path, writable=False)


def _check_arrays(store, dm: Datamodels, x_name: str, y_name: str, source: str):
    x = store.array(x_name)
    y = store.array(y_name)
    n_x = int(np.prod(x.shape[1:], dtype=np.int64))
    if x.ndim != 2 or n_x != dm.n_features:
        raise UserError(f"{source} has {dm.n_features} features but '{x_name}' in the store at {store.path} "
                        f"has shape {list(x.shape[1:])} per model; evaluate the datamodels on the store they were fitted on")
    n_y = int(np.prod(y.shape[1:], dtype=np.int64))
    if dm.target_end > n_y or dm.target_end - dm.target_start != dm.n_targets:
        raise UserError(f"{source} covers targets {dm.target_start}..{dm.target_end - 1} but '{y_name}' in the store "
                        f"at {store.path} has {n_y} targets per model")
    return x, y


def check_targets(dm: Datamodels, source: str) -> None:
    """The fitted slice of targets must be a real one: at least one target, starting at 0 or later."""
    if dm.n_targets == 0:
        raise UserError(f"{source} holds no targets ('weight' has shape [{dm.n_features}, 0]): nothing to evaluate")
    if dm.target_start < 0:
        raise UserError(f"{source} records target_start={dm.target_start}, below 0: the fitted targets must be "
                        f"a slice of the store's outputs starting at 0 or later")


def warn_unchecked_masks(st, dm: Datamodels, source: str) -> None:
    """One warning line when ``dm`` carries no fingerprint, so ``check_store`` could not check the masks."""
    if not dm.meta.get("store_fingerprint"):
        print(f"warning: {source} records no store fingerprint (fitted before fingerprints were recorded, or by "
              f"the original tools): the store at {st.path} is checked by its sizes and completed models only, "
              f"not by its masks; make sure it is the store the datamodels were fitted on", file=sys.stderr)


def load_heldout(dm: Datamodels, *, store: str, heldout_store: str = "", x_name: str = "", y_name: str = "",
                 source: str = "the datamodels", exclude: np.ndarray | None = None, warn: bool = True) -> HeldOut:
    """Masks and actual outputs of the held-out models (see the module docstring for which models).

    ``exclude`` adds store indices to leave out besides the datamodels' own train/val indices
    (``budget`` passes the union over all its fits). ``warn=False``: the caller says ``warn_unchecked``
    itself, after its own refusals.
    """
    check_targets(dm, source)
    x_name = x_name or dm.x_name or "masks"
    y_name = y_name or dm.y_name or "margins"
    if heldout_store:
        st = open_store(heldout_store, "held-out store")
        _check_arrays(st, dm, x_name, y_name, source)
        idx = st.completed_indices()
        where = f"the held-out store {st.path} has no completed models"
    else:
        st = open_store(store, "store")
        _check_arrays(st, dm, x_name, y_name, source)
        check_store(st, x_name, dm, source=source)
        used = np.concatenate([dm.indices("train_indices"), dm.indices("val_indices"),
                               np.asarray(exclude if exclude is not None else [], dtype=np.int64)])
        if dm.indices("train_indices").size == 0:
            raise UserError(f"{source} does not record which models the regression used (train_indices); "
                            "give heldout_store=DIR with models trained apart from the regression")
        idx = np.setdiff1d(st.completed_indices(), used)
        where = (f"all {st.completed_indices().size} completed models of {st.path} were used by the regression "
                 f"(train/val); train more models (train n=...) or give heldout_store=DIR")
    if idx.size == 0:
        raise UserError(f"no held-out models: {where}")
    if idx.size < MIN_HELDOUT:
        raise UserError(f"only {idx.size} held-out models; at least {MIN_HELDOUT} are needed for rank correlations")
    x = st.array(x_name)
    y = st.array(y_name)
    actual = np.asarray(y[idx], dtype=np.float64).reshape(idx.size, -1)[:, dm.target_start: dm.target_end]
    finite = np.isfinite(actual).all(axis=1)
    if not finite.all():  # as write_dataset does: a model whose outputs hold NaN/inf cannot be scored
        print(f"note: left out {int((~finite).sum())} held-out models whose '{y_name}' holds NaN or inf")
        idx, actual = idx[finite], actual[finite]
        if idx.size < MIN_HELDOUT:
            raise UserError(f"only {idx.size} held-out models with finite outputs; at least {MIN_HELDOUT} are needed")
    masks = np.asarray(x[idx])
    if not heldout_store and warn:  # said once every refusal is past, so a refused command prints one line
        warn_unchecked_masks(st, dm, source)
    return HeldOut(str(st.path), idx, masks, actual, x_name, y_name, tuple(y.shape[1:]))


def heldout_from_ground_truth(directory: str, fmt: str, *, n_train: int, target_start: int = 0,
                              n_targets: int = 0, source: str = ""):
    """A ``HeldOut`` from a ground-truth directory; ``target_start``/``n_targets``: the slice a datamodels covers."""
    from datamodels_ml.evaluation import ground_truth

    gt = ground_truth.read(directory, fmt, n_train=n_train)
    if n_train and gt.masks.shape[1] != n_train:
        raise UserError(f"{source} has {n_train} training examples but the ground truth in {directory} has masks of "
                        f"shape {list(gt.masks.shape)} ([models, training examples])")
    first = int(gt.meta.get("target_start", 0))
    actual = gt.outputs
    if n_targets:
        lo, hi = target_start - first, target_start - first + n_targets
        if lo < 0 or hi > actual.shape[1]:
            raise UserError(f"{source} covers targets {target_start}..{target_start + n_targets - 1} but the ground "
                            f"truth in {directory} has outputs of shape {list(actual.shape)} ([models, targets])")
        actual = actual[:, lo:hi]
    if gt.indices.size < MIN_HELDOUT:
        raise UserError(f"only {gt.indices.size} models in {directory}; at least {MIN_HELDOUT} are needed")
    return HeldOut(str(directory), gt.indices, gt.masks, actual, gt.meta.get("x_name", "masks"),
                   gt.meta.get("y_name", "margins"), (gt.outputs.shape[1],))

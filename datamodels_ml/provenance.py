"""Which store a regression was fitted on: a fingerprint recorded by ``regress``, checked by ``evaluate``.

Scoring datamodels against the wrong store (another run's masks with the same sizes, a store made
again after a ``force``) gives a plausible, meaningless LDS. ``regress`` therefore records, besides the
train/val store indices it already keeps, a digest of the masks of a few of its training models
(``FINGERPRINT_ROWS`` of them, spread over the train indices). ``check_store`` recomputes it from the
store ``evaluate`` was given and refuses a mismatch with one line. Reading a handful of rows keeps
the check cheap at any scale.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

FINGERPRINT_ROWS = 16


def fingerprint_rows(train_indices: np.ndarray) -> np.ndarray:
    """The (sorted, at most ``FINGERPRINT_ROWS``) train store indices whose masks are digested."""
    idx = np.unique(np.asarray(train_indices, dtype=np.int64))
    if idx.size <= FINGERPRINT_ROWS:
        return idx
    return idx[np.linspace(0, idx.size - 1, FINGERPRINT_ROWS).round().astype(np.int64)]


def masks_digest(masks: np.ndarray) -> str:
    """sha256 of mask rows as 0/1 bytes (bool, integer or float 0/1 masks digest alike); other
    values are digested as float64."""
    m = np.asarray(masks).reshape(len(masks), -1)
    if m.dtype == bool or np.isin(m, (0, 1)).all():
        data = m.astype(np.uint8)
    else:
        data = m.astype(np.float64)
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def fingerprint(store_indices: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """The record kept in ``datamodels.pt`` (plain types only, safe to load)."""
    return {"rows": [int(i) for i in store_indices], "masks_sha256": masks_digest(masks)}


def check_store(store: Any, x_name: str, dm: Any, *, source: str) -> None:
    """Refuse ``store`` unless it is the one ``dm`` was fitted on (sizes, train/val rows, masks digest)."""
    used = np.concatenate([dm.indices("train_indices"), dm.indices("val_indices")])
    if used.size and int(used.max()) >= store.num_models:
        raise UserError(f"{source} was fitted on models up to index {int(used.max())} but the store at {store.path} "
                        f"holds only {store.num_models}; give the store it was fitted on (store=DIR)")
    if used.size and not store.completed[used].all():
        missing = int((~store.completed[used]).sum())
        raise UserError(f"{source} was fitted on {missing} models that are not complete in the store at "
                        f"{store.path}: it is not the store the datamodels were fitted on (store=DIR)")
    record = dm.meta.get("store_fingerprint")
    if not record:
        return  # fitted before fingerprints were recorded, or by the original tools: sizes checked only
    rows = np.asarray(record.get("rows", []), dtype=np.int64)
    if rows.size == 0 or int(rows.max()) >= store.num_models:
        raise UserError(f"{source}: its store fingerprint names models absent from the store at {store.path}; "
                        f"give the store it was fitted on (store=DIR)")
    if masks_digest(np.asarray(store.array(x_name)[rows])) != record.get("masks_sha256"):
        raise UserError(f"the store at {store.path} is not the one {source} was fitted on: the masks of its "
                        f"training models differ (fingerprint of {rows.size} rows); give the right store=DIR, "
                        f"or heldout_store=DIR for models trained apart")


def fingerprint_from_beton(data_path: str, beton_rows: np.ndarray, store_indices: np.ndarray) -> dict[str, Any]:
    """The fingerprint of a fit, read from its ``.beton`` (whose rows are store rows ``store_indices``)."""
    from datamodels_ml.dataset.reader import read_beton

    by_store = dict(zip((int(s) for s in store_indices), (int(r) for r in beton_rows)))
    chosen = fingerprint_rows(np.fromiter(by_store, dtype=np.int64))
    x, _, _ = read_beton(data_path, [by_store[int(s)] for s in chosen], target_end=None)
    return fingerprint(chosen, x)

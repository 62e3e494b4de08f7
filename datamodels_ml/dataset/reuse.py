"""``write_dataset`` run again on an unchanged store: the .beton already holds exactly the store's
completed models with the same keys and selection, so it is kept and reported, not refused with a
suggestion of ``force=true`` (the demo decides the same way before skipping its stage).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def current_manifest(store: str, out: str, x_name: str, y_name: str, select: dict[str, Any]) -> dict | None:
    """The manifest of ``out`` when ``out`` holds what writing ``store`` now would write; else None."""
    from datamodels_ml.dataset.reader import read_manifest
    from datamodels_ml.store.layout import SPEC_FILE
    from datamodels_ml.store.store import Store

    if select.get("completed_name", "_completed") != "_completed" or select.get("ignore_completed"):
        return None  # another selection than the completed flags: not decided here
    if not os.path.isfile(out) or not os.path.isfile(os.path.join(store, SPEC_FILE)):
        return None
    m = read_manifest(out)
    if not m or any(m.get(k) != v for k, v in select.items()):
        return None
    st = Store(store, writable=False)
    written = sorted(int(i) for i in list(m.get("indices", [])) + list(m.get("dropped", [])))
    if (m.get("store") != str(Path(store).resolve()) or m.get("x_name") != x_name or m.get("y_name") != y_name
            or written != [int(i) for i in st.completed_indices()]):
        return None
    return m


__all__ = ["current_manifest"]

"""What the last ``train`` on a store asked for (``<store>/_train.json``: its ``n`` and ``main``), so
``status`` can count what is missing against it as well as against the spec's ``num_models``.

The file is ours (a leading underscore, like ``_failures.json``); stores without it (the original
tools', or older ones) simply have no last train to report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAIN_FILE = "_train.json"


def record_train(store_path: str | Path, *, n: int, main: str) -> None:
    """Write ``_train.json`` for a train that starts (atomically: a crash leaves the old one)."""
    from datamodels_ml.files import atomic_write_text

    atomic_write_text(Path(store_path) / TRAIN_FILE, json.dumps({"n": int(n), "main": main}) + "\n")


def last_train(store_path: str | Path) -> dict[str, Any] | None:
    """``{"n": ..., "main": ...}`` of the last train, or None (none recorded, or unreadable)."""
    try:
        doc = json.loads((Path(store_path) / TRAIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("n"), int) else None


__all__ = ["TRAIN_FILE", "record_train", "last_train"]

"""Replacing a file atomically: write a temporary file beside it, then rename it into place.

A reader sees the old file or the new one, never a partial one, and a failed write leaves the old
file as it was. The temporary name carries the process id, so concurrent writers never share one.
"""

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

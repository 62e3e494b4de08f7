"""Small file helpers: replacing a file atomically, saving with torch so that a full disk says so, and
reading a user's YAML file with one clear error.

Atomic replace: write a temporary file beside it, then rename it into place. A reader sees the old
file or the new one, never a partial one, and a failed write leaves the old file as it was. The
temporary name carries the process id, so concurrent writers never share one.
"""

import os
from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file ``path`` (``{}`` when empty); a missing or malformed file is one
    ``UserError`` naming ``what`` it should have been."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)  # a stale one, or a link planted at the name: removed, never followed
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, where a failed write (a full disk) raises the ``OSError`` that caused
    it: torch reports it as a ``RuntimeError`` without the reason."""
    import torch

    failed: list[OSError] = []

    class Writer:  # the file as torch writes it, keeping the error of a failed write
        def __init__(self, file):
            self.file = file

        def write(self, data) -> int:
            try:
                return self.file.write(data)
            except OSError as exc:
                failed.append(exc)
                raise

        def flush(self) -> None:
            self.file.flush()

    with open(path, "wb") as file:
        try:
            torch.save(obj, Writer(file))
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise

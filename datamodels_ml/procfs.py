"""Fields of Linux's ``/proc`` files that are sizes in kB (``/proc/meminfo``, ``/proc/self/status``)."""

from __future__ import annotations

__all__ = ["kb_field"]


def kb_field(path: str, key: str) -> int | None:
    """Bytes of the ``key:`` line of ``path`` (a ``"<key>: <n> kB"`` line of a ``/proc`` file),
    None where the file or the line is missing (another system, a restricted container)."""
    prefix = key + ":"
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

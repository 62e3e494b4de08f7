"""Who may write a store: advisory locks (``fcntl.flock``) on ``<store>/.lock`` and on each row.

``store_lock(path, command)`` is exclusive: ``train`` and ``init force=true`` hold it for their
whole run, so a second writer fails at once with the first one's PID instead of training the same
rows again. ``store_lock(path, command, shared=True)`` is what ``worker`` holds: any number of
workers may write one store together (one row each, as on a SLURM array), but not beside a ``train``.
``row_lock(path, index, command)`` keeps two workers off the same row.

The holder writes its PID and command into the lock file so that the refusal can name it. The
kernel drops a lock when its holder exits, however it exits (kill -9 included), so a stale lock
file never blocks anyone; the file itself is left in place (removing it would race with a taker).
The lock file descriptors are not inherited by child processes (Python's default), so a runner
outliving its parent cannot keep a store locked. Lock files and row folders are opened without
following links (``store_files``): a link planted at ``.lock`` or ``workers/<i>`` is refused, its
target never written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from datamodels_ml.errors import UserError
from datamodels_ml.store_files import make_store_dir, open_in_store

LOCK_FILE = ".lock"
_RECORD = 96  # bytes: "<pid> <command>" padded, written with one pwrite so readers never see half of it


def _holder(fd: int) -> str:
    """'PID <pid> (<command>)' from the lock file, waiting briefly for a holder that just took it."""
    for _ in range(50):
        text = os.pread(fd, _RECORD, 0).decode(errors="replace").strip()
        pid, _, command = text.partition(" ")
        if pid.isdigit():
            return f"PID {pid} ({command.strip() or 'unknown command'})"
        time.sleep(0.01)
    return "another process (PID unknown)"


@contextmanager
def _flock(file: Path, store: Path, command: str, *, shared: bool, what: str) -> Iterator[None]:
    try:
        # the umask applies, as for every file we write; a link there is refused, never followed
        base = store if store in file.parents else file.parent  # every folder below base is walked link-free
        fd = open_in_store(base, file.relative_to(base), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"store {store} is not writable ({exc.strerror}: {file}); "
                            f"{command} needs to write to it") from None
        raise UserError(f"cannot create the lock file {file}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} is in use by {_holder(fd)}; wait for it to finish or stop it") from None
        os.pwrite(fd, f"{os.getpid()} {command}"[: _RECORD - 1].ljust(_RECORD - 1).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def store_lock(store_path: str | Path, command: str, *, shared: bool = False):
    """Hold the store's lock for a ``with`` block; raise ``UserError`` at once if another process has it.

    ``command`` (e.g. ``"train"``) is shown to whoever is refused: "store <path> is in use by PID
    <pid> (<command>); wait for it to finish or stop it". A store that cannot be written (read-only
    file system, no permission) is refused with one line saying so.
    """
    store = Path(store_path)
    return _flock(store / LOCK_FILE, store, command, shared=shared, what=f"store {store}")


def row_lock(store_path: str | Path, index: int, command: str):
    """Hold row ``index``'s lock (``<store>/workers/<index>/.lock``) for a ``with`` block; refused at once if taken."""
    store = Path(store_path)
    folder = store / "workers" / str(index)
    try:
        make_store_dir(store, folder.relative_to(store))  # a link on the way is refused
    except OSError as exc:
        raise UserError(f"store {store} is not writable ({exc.strerror}: {folder}); {command} needs to write to it") from None
    return _flock(folder / LOCK_FILE, store, command, shared=False, what=f"model {index} of store {store}")

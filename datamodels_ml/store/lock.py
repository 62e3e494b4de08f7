"""Who may write a store or an output directory: advisory locks (``fcntl.flock``) on ``<store>/.lock``,
on each row, and on ``<out_dir>/.lock``.

``store_lock(path, command)`` is exclusive: ``train`` and ``init force=true`` hold it for their
whole run, so a second writer fails at once with the first one's PID instead of training the same
rows again. ``store_lock(path, command, shared=True)`` is what ``worker`` holds: any number of
workers may write one store together (one row each, as on a SLURM array), but not beside a ``train``.
``row_lock(path, index, command)`` keeps two workers off the same row. ``out_dir_lock(path, command)``
is ``regress``'s: one regression at a time writes an output directory (its target blocks, its results).

The holder writes its PID and command into the lock file so that the refusal can name it. The
kernel drops a lock when its holder exits, however it exits (kill -9 included), so a stale lock
file never blocks anyone; the file itself is left in place (removing it would race with a taker).
The lock file descriptors are not inherited by child processes (Python's default), so a runner
outliving its parent cannot keep a store locked. Lock files and row folders are opened without
following links (``store.safe_open``): a link planted at ``.lock`` or ``workers/<i>`` is refused, its
target never written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from datamodels_ml.errors import UserError
from datamodels_ml.store.safe_open import make_store_dir, open_in_store

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


def _open(file: Path, store: Path, command: str, owner: str = "store") -> int:
    try:
        # the umask applies, as for every file we write; a link there is refused, never followed
        base = store if store in file.parents else file.parent  # every folder below base is walked link-free
        return open_in_store(base, file.relative_to(base), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"{owner} {store} is not writable ({exc.strerror}: {file}); "
                            f"{command} needs to write to it") from None
        raise UserError(f"cannot create the lock file {file}: {exc.strerror}") from None


def _write_holder(fd: int, command: str) -> None:
    os.pwrite(fd, f"{os.getpid()} {command}"[: _RECORD - 1].ljust(_RECORD - 1).encode() + b"\n", 0)


@contextmanager
def _flock(file: Path, store: Path, command: str, *, shared: bool, what: str, owner: str = "store") -> Iterator[None]:
    fd = _open(file, store, command, owner)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} is in use by {_holder(fd)}; wait for it to finish or stop it") from None
        _write_holder(fd, command)
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


@contextmanager
def creation_lock(store_path: str | Path, command: str) -> Iterator[None]:
    """Hold the store's lock while a new store is created, waiting for a creator that holds it.

    Two commands that create one new store at once (two ``train spec=`` started together) take
    turns: the second finds the first one's store complete instead of replacing its files under it.
    The directory must exist. Only a creator waits; a ``train`` on an existing store is refused at once.
    """
    store = Path(store_path)
    fd = _open(store / LOCK_FILE, store, command)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {_holder(fd)} to release store {store} ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd, command)
        yield
    finally:
        os.close(fd)


def recorded_command(file: str | Path) -> str | None:
    """The command recorded in ``file`` when it is a lock file that this module wrote (held or not),
    else None: tells our lock file from someone else's file of the same name."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        record = os.pread(fd, _RECORD + 1, 0)
    finally:
        os.close(fd)
    pid, _, command = record.decode(errors="replace").partition(" ")
    ours = len(record) == _RECORD and record.endswith(b"\n") and pid.isdigit() and command.strip()
    return command.strip() if ours else None


def out_dir_lock(out_dir: str | Path, command: str):
    """Hold ``<out_dir>/.lock`` (the directory is created) for a ``with`` block; refused at once if taken:
    "cfg.out_dir <path> is in use by PID <pid> (<command>); wait for it to finish or stop it"."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cfg.out_dir {out}: {exc.strerror}") from None
    return _flock(out / LOCK_FILE, out, command, shared=False, what=f"cfg.out_dir {out}", owner="cfg.out_dir")

"""Writing a ``.beton`` with FFCV's writer processes, so that a failure ends the command.

FFCV's ``DatasetWriter`` stays the writer of the file format (its header, metadata, pages and
allocation table; ``beton`` reads them). What this module owns is the processes around it:

- **Supervision.** FFCV's own loop waits for a count of written rows that a dead writer process
  never reaches (a full disk in the middle of a page: the command hung forever), and the other
  writers spin waiting for the dead one's page. Here the parent watches every writer: the first
  one that fails (its exception, or a signal) ends the write with one ``UserError`` line, and the
  others are stopped.
- **Writers die with their parent.** Each writer asks Linux to SIGKILL it when the parent dies
  (``PR_SET_PDEATHSIG``) and also checks, every half second, that its parent is still the process
  that started it, so a ``write_dataset`` killed with kill -9 leaves no writer behind.
- **Temporary files.** The file is written under ``.<name>.tmp-<PID>`` beside its destination and
  held with ``flock`` for the whole write (writers inherit the lock). A later write of the same
  destination removes such files whose lock is free and whose process is gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from datamodels_ml.errors import UserError

PAGE = 8 << 20  # FFCV's default page size (4 * ffcv.writer.MIN_PAGE_SIZE): each writer fills whole pages
_POLL = 0.1  # seconds between the parent's looks at its writers
_PARENT_CHECK = 0.5  # seconds between a writer's looks at its parent
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_NEW = 10.0  # seconds during which an unlocked temporary file of a live process may be one just created


# -- sizes -----------------------------------------------------------------------------------------
def page_size(row_bytes: int) -> int:
    """FFCV's page size, raised to the next power of two when one row's arrays would not fit a page."""
    size = PAGE
    while size < row_bytes:
        size *= 2
    return size


def writer_count(num_workers: int, rows: int, cpus: int) -> int:
    """Writer processes: ``num_workers``, or min(4, cpus); never more than one per 64 rows."""
    workers = num_workers if num_workers > 0 else max(1, min(4, cpus))
    return min(workers, max(1, rows // 64))


def bytes_needed(rows: int, row_bytes: int, meta_bytes: int, workers: int) -> int:
    """An upper bound of the file's size: the header and metadata padded to a page, the full pages
    (a row never straddles two), one part-filled page per writer, and the allocation table."""
    page = page_size(row_bytes)
    per_page = max(1, page // max(1, row_bytes))
    head = -(-(8192 + rows * meta_bytes) // page) * page  # header and field descriptors: about 3 KB
    return head + (-(-rows // per_page) + workers) * page + rows * 64


# -- temporary files -------------------------------------------------------------------------------
def temp_name(out: Path, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary files of ``out`` left by writes that died; return what was removed.

    A file is left alone while a process holds its lock, and while it is new (``_NEW`` seconds) and
    the process its name carries is alive: a write that has created it and is about to lock it."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}.tmp-"
    for tmp in sorted(out.parent.iterdir()):
        pid = tmp.name[len(prefix):]
        if not tmp.name.startswith(prefix) or not pid.isdigit():
            continue
        try:
            new = time.time() - tmp.lstat().st_mtime < _NEW
        except OSError:
            continue
        if new and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a link, or gone already: not ours to remove
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(tmp, follow_symlinks=False)):
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass  # locked: a writer still holds it
        finally:
            os.close(fd)
    return removed


def claim_temp(out: Path) -> tuple[Path, int]:
    """Create this process's temporary file for ``out`` and lock it; return it and the lock's fd."""
    tmp = temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # our own PID: a file from a dead process that had it before us
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc} ({exc.filename or tmp})") from None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


# -- the writer processes --------------------------------------------------------------------------
def _tie_to_parent(parent: int) -> None:
    """In a writer: die with ``parent`` (PR_SET_PDEATHSIG, and a thread that watches the PID)."""
    from datamodels_ml.training.runner_child import die_with_parent

    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _reason(exc: BaseException) -> tuple[int, str]:
    """``(errno or 0, what went wrong)`` of a writer's or the parent's exception, for one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.errno or 0, exc.strerror
    return 0, f"an FFCV writer process failed ({type(exc).__name__}: {exc})"


def _writer(parent: int, failures: Any, job: Callable[..., None], args: tuple) -> None:
    """One writer process: FFCV's job; a failure goes to the parent as ``_reason``, no traceback."""
    _tie_to_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops its writers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        job(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        failures.put(_reason(exc))
        os._exit(1)


class WriteFailed(Exception):
    """A writer process failed: ``errno`` (0 when not an OS error) and the reason in words."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.errno, self.reason = code, reason


def _chunks(rows: int, size: int) -> list[list[tuple[int, int]]]:
    """FFCV's work items: (row in the file, row of the dataset) pairs, ``size`` at a time."""
    return [[(j, j) for j in range(s, min(rows, s + size))] for s in range(0, rows, size)]


class _Supervisor:
    """The writer processes of one write, started, watched and stopped by the parent."""

    def __init__(self, writer: Any, dataset: Sequence, workers: int, chunksize: int):
        import multiprocessing as mp

        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.writer import worker_job_indexed_dataset

        self.rows = len(dataset)
        self.work: Any = mp.Queue()
        for item in _chunks(self.rows, chunksize):
            self.work.put(item)
        for _ in range(workers):
            self.work.put(None)
        self.results: Any = mp.Queue()
        self.failures = mp.SimpleQueue()
        self.done = mp.Value("Q", 0)
        self.allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        args = (self.work, writer.metadata_sm, writer.metadata_type, writer.fields, self.allocator, self.done,
                self.results, dataset)
        self.procs = [mp.Process(target=_writer, args=(os.getpid(), self.failures, worker_job_indexed_dataset, args),
                                 name=f"beton-writer-{k}", daemon=True) for k in range(workers)]

    def run(self, shown: Any) -> list:
        """Start the writers, follow them to the end; their allocations, or ``WriteFailed``."""
        # Ctrl-C or SIGTERM during a fork would land in an at-fork hook, where Python drops the
        # exception: held back until every writer has started, then the parent stops them all.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for p in self.procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        allocations: list = []
        finished, reported = 0, 0
        while finished < len(self.procs):
            try:
                allocations.extend(self.results.get(timeout=_POLL))
                finished += 1
            except queue.Empty:
                pass
            done = int(self.done.value)
            shown.update(done - reported)
            reported = done
            self._check()
        return allocations

    def _check(self) -> None:
        if not self.failures.empty():
            raise WriteFailed(*self.failures.get())
        for p in self.procs:
            if p.exitcode is not None and p.exitcode != 0:
                if not self.failures.empty():
                    raise WriteFailed(*self.failures.get())
                how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"ended with status {p.exitcode}"
                raise WriteFailed(0, f"an FFCV writer process was {how}")

    def stop(self, *, finished: bool) -> None:
        """Let writers that ``finished`` exit, stop any other, and let the parent exit without
        flushing the queues (nobody reads them any more)."""
        for q in (self.work, self.results):
            q.cancel_join_thread()
        started = [p for p in self.procs if p.pid is not None]
        if finished:
            deadline = time.monotonic() + 5
            for p in started:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in started:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def _expected_size(supervisor: _Supervisor, allocations: list) -> int:
    """The size FFCV's layout gives the file: the data region's start, every page written, the table."""
    from ffcv.types import ALLOC_TABLE_TYPE

    alloc = supervisor.allocator
    entries = sum(1 for a in allocations if len(a))  # one (sample, ptr, size) entry per allocation
    return alloc.offset + int(alloc.next_page_allocated.value) * alloc.page_size + entries * ALLOC_TABLE_TYPE.itemsize


def _failure(out: Path, code: int, reason: str) -> UserError:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"cannot write {out}: {reason} (the disk filled while writing; nothing was replaced); "
                         "free space or write the .beton to another disk (out=...)")
    return UserError(f"cannot write {out}: {reason}; nothing was replaced")


def write_rows(out: Path, tmp: Path, fields: dict[str, Any], dataset: Sequence, *, workers: int, row_bytes: int,
               shown: Any) -> None:
    """Write ``dataset`` (row j -> one value per field) to ``tmp`` with FFCV's writer in ``workers``
    processes (``out``, the final name, for messages; ``shown``, the progress bar).

    ``UserError`` when a writer or the parent cannot write (a full disk, an I/O error) or the file
    comes out shorter than its layout: ``tmp`` is then incomplete and the caller removes it.
    """
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(tmp), fields, page_size=page_size(row_bytes), num_workers=workers)
    writer.num_samples = len(dataset)
    supervisor, finished = None, False
    try:
        writer.prepare()  # the header, the field descriptors, the metadata's shared memory
        supervisor = _Supervisor(writer, dataset, workers, chunksize=max(1, min(100, len(dataset) // workers)))
        allocations = supervisor.run(shown)
        finished = True
        writer.finalize(allocations)
        size, expected = os.path.getsize(tmp), _expected_size(supervisor, allocations)
    except WriteFailed as exc:
        raise _failure(out, exc.errno, exc.reason) from None
    except OSError as exc:
        raise _failure(out, exc.errno or 0, exc.strerror or str(exc)) from None
    finally:
        if supervisor is not None:
            supervisor.stop(finished=finished)
        sm = getattr(writer, "metadata_sm", None)
        if sm is not None and not isinstance(sm, int):
            sm.close()
            sm.unlink()
    if size != expected:  # a page cut short by a full disk that FFCV did not notice (it ignores short writes)
        raise _failure(out, errno.ENOSPC, f"the file came out {expected - size} bytes short of its layout")


__all__ = ["PAGE", "bytes_needed", "claim_temp", "page_size", "remove_stale", "temp_name", "write_rows",
           "writer_count"]

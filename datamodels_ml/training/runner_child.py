"""The long-lived process behind one ``train`` slot: imports main once, then runs index after index.

Protocol (driven by ``training.runner_parent``): the parent writes the job as the first line on stdin, in
JSON (store, main, args, the script's argv, its own PID; never on the command line, where ``ps``
shows it to every local user), then one index per line. The runner answers on the file descriptor given as
``--reply-fd`` with one JSON line per message: first ``{"ready": true}`` (or ``{"fatal": "..."}``
when main cannot be imported), then one ``ModelResult`` per index ("completed" there means the
row is written; the parent then marks it complete in a group commit). Each model's stdout and
stderr go to ``<store>/workers/<index>/output.log`` so user prints never corrupt the protocol; that
file and its folder are opened without following links (a link there fails the model, in one line).

A row already complete (another writer got there first) is not trained: the runner checks
``_completed[index]`` before calling main and again before writing, and answers "skipped".

The runner never outlives its parent: on Linux the kernel kills it when the parent dies
(``PR_SET_PDEATHSIG``), so a driver killed with kill -9 leaves no runner writing into a store that
a new driver has taken over; elsewhere it checks the parent's PID before writing a row. End of
stdin (the parent closed it, or died) and a broken reply pipe end it quietly with status 0. It
ignores Ctrl-C; the parent stops it, and enforces timeouts by killing its process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _redirect_output(store, index: int) -> tuple[int, int]:
    """Point stdout and stderr at ``workers/<index>/output.log``, opened without following links."""
    from datamodels_ml.store.safe_open import open_in_store

    log = store.make_logdir(index)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = open_in_store(store.path, log.relative_to(store.path) / "output.log",
                       os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore_output(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def _run_one(store, index: int, fn, job: dict, wanted):
    """Train ``index`` with its output in its log; whatever main does, return a ``ModelResult``."""
    from datamodels_ml.errors import UserError
    from datamodels_ml.training.run_model import ModelResult, run_model

    try:
        saved = _redirect_output(store, index)
    except UserError as exc:  # a link at workers/<index> or its output.log: nothing written through it
        return ModelResult(index, "failed", error=str(exc))
    except OSError:
        return ModelResult(index, "failed", error=traceback.format_exc())
    try:
        # the parent marks the row complete once it has synced a batch of rows (Store.commit)
        return run_model(store, index, fn, dict(job["args"]), flag=False, still_wanted=wanted)
    except BaseException:  # noqa: BLE001 - keep the slot alive whatever main did (sys.exit included)
        return ModelResult(index, "failed", error=traceback.format_exc())
    finally:
        _restore_output(saved)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reply-fd", type=int, required=True)
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = os.fdopen(opts.reply_fd, "w", buffering=1)

    def send(obj: dict) -> None:
        try:
            reply.write(json.dumps(obj) + "\n")
            reply.flush()
        except (BrokenPipeError, OSError):  # the parent is gone: nobody to answer, nothing to say
            os._exit(0)

    first = sys.stdin.readline()
    if not first:
        return 0
    job = json.loads(first)
    parent = int(job["parent"])
    overwrite = bool(job.get("overwrite"))
    try:
        from datamodels_ml.store.layout import COMPLETED
        from datamodels_ml.store.store import Store
        from datamodels_ml.training.run_model import ModelResult, load_main

        store = Store(job["store"])
        done = store.array(COMPLETED)  # a shared map: sees the flags other processes set
        fn = load_main(job["main"], job.get("argv", ()))  # sys.argv for the script, then its import
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it once
        send({"fatal": str(exc) if exc.__class__.__name__ == "UserError" else traceback.format_exc()})
        return 1
    send({"ready": True})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        index = int(line)
        if done[index] and not overwrite:
            send(ModelResult(index, "skipped").to_json())
            continue

        def wanted(index: int = index) -> bool:
            return os.getppid() == parent and (overwrite or not done[index])

        send(_run_one(store, index, fn, job, wanted).to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The long-lived process behind one ``train`` slot: imports main once, then runs index after index.

Protocol (driven by ``fanout``): the parent writes one index per line on stdin; the runner answers on
the file descriptor given as ``--reply-fd`` with one JSON line per message: first
``{"ready": true}`` (or ``{"fatal": "..."}`` when main cannot be imported), then one
``ModelResult`` per index ("completed" there means the row is written; the parent then marks it
complete in a group commit). Each model's stdout and stderr go to ``<store>/workers/<index>/output.log``
so user prints never corrupt the protocol. The runner ignores Ctrl-C; the parent stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback


def _redirect_output(path: str) -> tuple[int, int]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reply-fd", type=int, required=True)
    parser.add_argument("--job", required=True, help="JSON: store, main, args, timeout")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = os.fdopen(opts.reply_fd, "w", buffering=1)

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    job = json.loads(opts.job)
    try:
        from datamodels_ml.store import Store
        from datamodels_ml.worker import ModelResult, load_main, run_model

        store = Store(job["store"])
        fn = load_main(job["main"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it once
        send({"fatal": str(exc) if exc.__class__.__name__ == "UserError" else traceback.format_exc()})
        return 1
    send({"ready": True})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        index = int(line)
        log = store.logdir(index)
        log.mkdir(parents=True, exist_ok=True)
        saved = _redirect_output(str(log / "output.log"))
        try:
            # the parent marks the row complete once it has synced a batch of rows (Store.commit)
            result = run_model(store, index, fn, dict(job["args"]), timeout=job.get("timeout") or None, flag=False)
        except BaseException:  # noqa: BLE001 - keep the slot alive whatever main did
            result = ModelResult(index, "failed", error=traceback.format_exc())
        finally:
            _restore_output(saved)
        send(result.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

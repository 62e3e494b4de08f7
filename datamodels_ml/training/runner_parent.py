"""The parent's side of one runner process (``training.runner_child``): start it, hand it the job, send it indices,
read its replies against a deadline, and kill it.

``training.train`` keeps one per slot and starts a fresh one after a timeout or a death; the ``worker``
command uses one when it has a timeout (``run_isolated``). The job (store, main, ``args.*``, argv)
travels on the runner's stdin, not its command line, so ``ps`` shows no user values.

Timeouts are enforced here, from outside: when a model runs past ``timeout`` the runner's whole
process group is killed (with whatever main started) and the model is recorded failed; nothing a
hung main left half done (a half-imported module, a stuck thread) is reused. The clock starts when
the index is sent, after the runner has said it is ready, so its start-up (imports) never counts
against its first model.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from datamodels_ml.errors import UserError
from datamodels_ml.training.run_model import ModelResult

START_TIMEOUT = 600.0  # seconds a runner may take to import main and say it is ready


def describe_exit(code: int | None) -> str:
    """'exit code 3', 'killed by SIGBUS (signal 7)' or 'no exit code' (still running)."""
    if code is None:
        return "no exit code (still running)"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "an unknown signal"
    return f"killed by {name} (signal {-code})"


class RunnerProcess:
    """One runner process, its stdin (job, then indices) and its reply pipe."""

    OK, TIMEOUT, DEAD = "ok", "timeout", "dead"

    def __init__(self, job: dict[str, Any], env: dict[str, str]):
        read_fd, write_fd = os.pipe()
        full_env = dict(os.environ)
        full_env.update(env)
        root = str(Path(__file__).resolve().parent.parent)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), root, full_env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "datamodels_ml.training.runner_child", "--reply-fd", str(write_fd)],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), env=full_env, text=True, start_new_session=True,
        )
        os.close(write_fd)
        self.reply = os.fdopen(read_fd, "r")
        self.death = ""  # how it died while training a model, e.g. 'killed by SIGBUS (signal 7)'
        self._write(json.dumps(dict(job, parent=os.getpid())))

    def _write(self, line: str) -> bool:
        try:
            self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return True
        except (BrokenPipeError, OSError):
            return False

    def _read(self, timeout: float | None) -> dict | str:
        """The next reply; ``TIMEOUT`` if none came in time, ``DEAD`` if the runner exited."""
        ready, _, _ = select.select([self.reply], [], [], timeout)
        if not ready:
            return self.TIMEOUT
        line = self.reply.readline()
        return json.loads(line) if line else self.DEAD

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str | None:
        """None once the runner has imported main; otherwise why it could not start."""
        first = self._read(timeout)
        if isinstance(first, dict):
            return first.get("fatal") if "fatal" in first else None
        if first == self.DEAD:
            return f"the runner process exited during start-up ({describe_exit(self.exit_code())})"
        return f"the runner process did not start within {timeout:g} s"

    def train(self, index: int, timeout: float | None) -> tuple[ModelResult, str]:
        """Run ``index``: its result and ``OK``, or a failed result and ``TIMEOUT``/``DEAD``.

        After ``TIMEOUT`` the runner is killed already; after either the caller must ``stop`` it.
        """
        reply = self._read(timeout) if self._write(str(index)) else self.DEAD
        if isinstance(reply, dict):
            return ModelResult(**reply), self.OK
        if reply == self.TIMEOUT:
            self.kill()
            return ModelResult(index, "failed", float(timeout or 0), error=f"timed out after {timeout:g} s"), reply
        code = self.exit_code()
        hint = " (SIGBUS: is the disk that holds the store full?)" if code == -signal.SIGBUS else ""
        self.death = describe_exit(code) + hint
        return ModelResult(index, "failed", error=f"the runner process died while training this model: {self.death}"), reply

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the runner's process group (main's own child processes included)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()

    def stop(self, kill: bool = False) -> None:
        """End the runner: close its stdin (it exits at end of input) or kill it; reap it."""
        if kill:
            self.kill()
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.reply.close()


def run_isolated(store: Any, index: int, job: dict[str, Any], timeout: float) -> ModelResult:
    """Run one model in a fresh runner process killed after ``timeout`` s; commit its row here."""
    runner = RunnerProcess(job, {})
    outcome = RunnerProcess.DEAD
    try:
        fatal = runner.wait_ready()
        if fatal:
            raise UserError(fatal)
        result, outcome = runner.train(index, timeout)
    finally:
        runner.stop(kill=outcome != RunnerProcess.OK)
    if result.status == "completed":
        store.commit([index])
    return result

"""Progress output, the one place that decides how it looks: every bar of the package is made here.

On a terminal a bar is tqdm's, labelled with the stage it counts ("train", "regress", ...). When the
stream is not a terminal (a piped log, CI, ``mlflow run`` output) carriage-return refreshes would
pile up as thousands of lines in one, so the bar prints a plain labelled line instead, each time
another tenth of the total is done or ``LineBar.INTERVAL`` seconds have passed since the last one,
and a last line when it closes. ``PathBar`` is the regression's bar, fed by the solver's callback.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _interactive(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(label: str, *, total: int | None = None, unit: str = "item", enabled: bool = True,
        file: TextIO | None = None) -> Any:
    """A progress bar for ``label``: tqdm on a terminal, ``LineBar`` otherwise (on stderr by default).

    Both take ``update(n)``, ``set_postfix(**values, refresh=...)``, ``set_postfix_str(text, refresh=...)``,
    ``close()`` and ``with``.
    """
    file = sys.stderr if file is None else file
    if enabled and _interactive(file):
        from tqdm import tqdm

        return tqdm(desc=label, total=total, unit=unit, dynamic_ncols=True, file=file)
    return LineBar(label, total=total, unit=unit, enabled=enabled, file=file)


class LineBar:
    """Progress as plain lines for logs: ``label: 150/1500 models (10%), 12 s, completed=150, failed=0``."""

    INTERVAL = 10.0  # seconds between lines when the count moves slowly
    STEP = 0.1  # or one line per tenth of the total

    def __init__(self, label: str, *, total: int | None, unit: str, enabled: bool, file: TextIO):
        self.label, self.total, self.unit, self.enabled, self.file = label, total, unit, enabled, file
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._next_step = 1  # the next tenth of the total that prints a line
        self._printed_n = 0
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        due = now - self._last >= self.INTERVAL
        if self.total:
            reached = int(self.n / self.total / self.STEP + 1e-9)
            if reached >= self._next_step:
                self._next_step = reached + 1
                due = self.n < self.total or due  # the 100% line is close()'s
        if due:
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)

    def _print(self, now: float) -> None:
        self._last = now
        self._printed_n = self.n
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.label}: {count} {self.unit}s{pct}, {now - self._start:.0f} s{extra}", file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled and (self.n != self._printed_n or self.n == 0):
            self._print(time.monotonic())

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PathBar:
    """The regression's bar: the solver's callback (``lasso_path(callback=...)``) over its steps
    (``unit``: fista's iterations, saga's epochs), with the
    target block, the λ index, the share of targets still on the path and the features being solved;
    one bar for all the target blocks of a ``regress``."""

    def __init__(self, k: int, n_targets: int, n_blocks: int, *, progress: bool, unit: str = "iteration"):
        self.k, self.n_targets, self.n_blocks = k, n_targets, n_blocks
        self.on_path = 1.0  # fraction of the block's targets still on the path
        self.blocks_done = 0
        self.bar = bar("regress", unit=unit, enabled=progress)  # fista: iterations; saga: epochs
        self.block_start = self.refit_start = None  # perf_counter of the block's first event, of its refit
        self.points = 0  # λ indices reached in the block

    def __call__(self, event: str, info: dict) -> None:
        if self.block_start is None:
            self.block_start = time.perf_counter()
        if event == "refit":
            self.refit_start = time.perf_counter()
        elif event == "epoch":
            self.bar.update(1)
            lam = "refit" if info.get("lambda_index", 0) < 0 else f"{info['lambda_index'] + 1}/{self.k}"
            blocks = f"block {self.blocks_done + 1}/{self.n_blocks}, " if self.n_blocks > 1 else ""
            self.bar.set_postfix_str(f"{blocks}λ {lam}, targets on path {self.on_path:.0%}, "
                                     f"solving {info['n_active']}", refresh=False)
        elif event == "lambda":
            self.on_path = float(info["active"])
            self.points = int(info["index"]) + 1

    def end_block(self, n_targets: int | None = None) -> None:
        """The block is over: one line on stderr with its time on the path and in the refit, and
        the process's resident peak so far (where ``/proc`` says it)."""
        self.blocks_done += 1
        if self.block_start is not None and n_targets is not None:
            now = time.perf_counter()
            path_end = self.refit_start or now
            refit = f", refit {now - self.refit_start:.1f} s" if self.refit_start is not None else ""
            blocks = f"block {self.blocks_done}/{self.n_blocks}" if self.n_blocks > 1 else "path"
            if hasattr(self.bar, "clear"):
                self.bar.clear()
            from datamodels_ml.procfs import kb_field
            from datamodels_ml.store.layout import human_bytes

            peak = kb_field("/proc/self/status", "VmHWM")  # the process's resident peak so far (Linux)
            peak = f", peak memory so far {human_bytes(peak)}" if peak else ""
            print(f"regress: {blocks}: {n_targets} targets, {self.points} λ, path {path_end - self.block_start:.1f} s"
                  f"{refit}{peak}", file=sys.stderr, flush=True)
        self.block_start = self.refit_start = None
        self.points = 0

    def close(self) -> None:
        self.bar.close()

"""Work started in a daemon thread and awaited later (datamodels_ml.regression.overlap)."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from datamodels_ml.regression import overlap as background


def test_the_result_comes_back_on_the_threads_asked_for_and_the_imports_follow():
    sys.modules.pop("colorsys", None)
    before = torch.get_num_threads()
    wait = background.start(lambda widen: (torch.get_num_threads(), "done"), name="test-bg", threads=1,
                            then_import=("colorsys",))
    assert wait() == (1, "done")
    assert torch.get_num_threads() == before  # the caller's setting is untouched
    deadline = time.monotonic() + 10
    while "colorsys" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "colorsys" in sys.modules


def test_the_result_is_handed_over_not_kept():
    # regress's statistics (the p x p Gram, 10 GB at p = 50k) must be freed once the path is done,
    # not held by the finished background computation while the results are written and logged
    import gc
    import weakref

    wait = background.start(lambda widen: torch.zeros(1000), name="test-bg")
    result = wait()
    ref = weakref.ref(result)
    del result
    gc.collect()
    assert ref() is None
    with pytest.raises(KeyError):
        wait()


def test_an_error_is_raised_again_in_the_caller():
    def fail(widen):
        raise ValueError("no masks")

    wait = background.start(fail, name="test-bg-error", then_import=("no_such_module_anywhere",))
    with pytest.raises(ValueError, match="^no masks$"):
        wait()


def test_the_work_widens_to_the_callers_threads_once_the_caller_waits():
    # one thread while the caller is busy; every thread of the caller's once it waits
    import threading

    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    caller = torch.get_num_threads()
    seen: list[int] = []
    go = threading.Event()

    def work(widen):
        for _ in range(3):  # steps before the caller waits
            widen()
            seen.append(torch.get_num_threads())
        go.wait(10)
        for _ in range(3):
            widen()
            seen.append(torch.get_num_threads())
        return seen

    wait = background.start(work, name="test-bg-widen", threads=1)
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(0.2, go.set).start()  # released after the caller is waiting
    assert wait() == [1, 1, 1, caller, caller, caller]

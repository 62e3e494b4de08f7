"""Progress output (``progress``): plain labelled lines when the stream is not a terminal."""

import io
import re

import pytest

from datamodels_ml.progress import LineBar, bar


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


@pytest.mark.parametrize("total, step, expected", [
    (1000, 1, [f"job: {n}/1000 items ({n // 10}%)" for n in range(100, 1001, 100)]),  # one line a tenth
    (7, 1, [f"job: {n}/7 items ({n / 7:.0%})" for n in range(1, 8)]),  # a tenth is less than one item
    (1000, 400, ["job: 400/1000 items (40%)", "job: 800/1000 items (80%)", "job: 1000/1000 items (100%)"]),
])
def test_a_line_per_tenth_and_one_at_the_end(total, step, expected):
    out = io.StringIO()
    shown = bar("job", total=total, enabled=True, file=out)
    assert isinstance(shown, LineBar)  # a StringIO is not a terminal
    with shown:
        for start in range(0, total, step):
            shown.update(min(step, total - start))
    lines = _lines(out)
    assert [line.split(", ")[0] for line in lines] == expected
    assert all(re.fullmatch(r"job: .*, \d+ s", line) for line in lines)


def test_postfix_and_unknown_total():
    out = io.StringIO()
    with bar("regress", unit="epoch", file=out) as shown:
        shown.update(3)
        shown.set_postfix_str("λ 2/10")
    assert _lines(out) == ["regress: 3 epochs, 0 s, λ 2/10"]  # no total: one line at the end (or every 10 s)
    out = io.StringIO()
    with bar("train", total=2, unit="model", file=out) as shown:
        shown.set_postfix(completed=2, failed=0, refresh=False)
        shown.update(2)
    assert _lines(out) == ["train: 2/2 models (100%), 0 s, completed=2, failed=0"]


def test_disabled_prints_nothing():
    out = io.StringIO()
    with bar("job", total=10, enabled=False, file=out) as shown:
        shown.update(10)
    assert out.getvalue() == ""


def test_a_finished_target_block_prints_its_times_and_the_resident_peak(capsys):
    from datamodels_ml.progress import PathBar
    from datamodels_ml.procfs import kb_field

    path = PathBar(4, 10, 2, progress=False)
    path("start", {"n_targets": 6, "n_lambdas": 4})
    path("lambda", {"index": 2, "active": 0.5})
    path("refit", {"n_rows": 100, "n_targets": 6})
    path.end_block(6)
    line = capsys.readouterr().err.strip()
    peak = r", peak memory so far [0-9.]+ [KMGT]?B" if kb_field("/proc/self/status", "VmHWM") else ""
    assert re.fullmatch(rf"regress: block 1/2: 6 targets, 3 λ, path [0-9.]+ s, refit [0-9.]+ s{peak}", line), line

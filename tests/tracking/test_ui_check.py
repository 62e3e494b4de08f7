"""The MLflow UI check (benchmarks/ui_check.py): its verdicts on known pages and charts, and, where
Debian's chromium and playwright are installed (make ui-setup), the whole check in a real browser."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import ui_check  # noqa: E402

RUNS = [{"id": "a", "name": "regress-fista-k20", "experiment": "1", "method": "fista", "k": "20"},
        {"id": "b", "name": "regress-saga-k50", "experiment": "1", "method": "saga", "k": "50"}]
HISTORIES = {"a": [(0, 1.4), (11, 1.3), (21, 1.2)], "b": [(0, 1.4), (4, 1.41), (8, 1.38), (12, 1.33)]}
LEGEND = ["regress-fista-k20 (val_mse)", "regress-saga-k50 (val_mse)"]


def _curve(run):
    return {"name": run, "x": [s for s, _ in HISTORIES[run]], "y": [v for _, v in HISTORIES[run]]}


def _chart(curves, legend=LEGEND, xtitle="Step", drawn=4):
    return {"xtitle": xtitle, "curves": curves, "drawn": drawn, "legend": legend}


@pytest.mark.parametrize("charts, problem", [
    ([_chart([_curve("a"), _curve("b")])], None),
    ([_chart([_curve("a"), _curve("b")], xtitle="Time (Wall)")], "the x axis is 'Time (Wall)', not Step"),
    ([_chart([_curve("a")], legend=LEGEND[:1])], "no curve on the chart holds the val_mse path of run regress-saga-k50"),
    ([_chart([_curve("a"), _curve("a")])], "no curve on the chart holds the val_mse path of run regress-saga-k50"),
    ([_chart([_curve("a"), _curve("b")], legend=LEGEND[:1])], "the legend does not name run regress-saga-k50"),
    ([_chart([_curve("a"), _curve("b")], drawn=1)], "only 1 lines are drawn in the chart's SVG, expected 2"),
    ([_chart([_curve("a")]), _chart([_curve("b")])], "expected one chart of val_mse, found 2"),  # side by side
])
def test_chart_verdict(charts, problem):
    problems = ui_check.check_chart(charts, RUNS, HISTORIES, "val_mse")
    if problem is None:
        assert problems == []
    else:
        assert any(p.startswith(problem) for p in problems), problems


RUNS_PAGE = {"url": "http://h/#/experiments/2/runs?workflowType=machine_learning&orderByKey=x",
             "text": "Runs\nregress-saga-k50\nregress-fista-k20\nTraces", "rows": ["regress-saga-k50 ...", "regress-fista-k20"]}
BEST = {"a": 1.3, "b": 1.2}


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"url": "http://h/#/experiments/2/overview/usage?workflowType=genai"}, "the address led to /experiments/2/overview"),
    ({"text": RUNS_PAGE["text"] + "\nDetect Issues"}, "the page shows GenAI pages ('Detect Issues')"),
    ({"text": "Runs\nregress-saga-k50"}, "the runs table does not list run regress-fista-k20"),
    ({"rows": ["regress-fista-k20", "regress-saga-k50"]}, "the first run listed is regress-fista-k20, not regress-saga-k50"),
])
def test_runs_page_verdict(change, problem):
    problems = ui_check.check_runs_page({**RUNS_PAGE, **change}, RUNS, BEST)
    if problem is None:
        assert problems == []
    else:
        assert any(p.startswith(problem) for p in problems), problems


@pytest.mark.ui
@pytest.mark.skipif(not Path(ui_check.CHROMIUM).exists() or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium at /usr/bin/chromium and playwright (make ui-setup)")
def test_make_ui_opens_the_runs_table_and_overlays_two_regression_paths(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ui_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "ui-check: ok" in proc.stdout
    for shot in ("runs.png", "compare.png", "metric.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot

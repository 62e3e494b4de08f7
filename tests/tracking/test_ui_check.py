"""The MLflow UI check (benchmarks/ui_check.py): its chart verdict on known charts, and, where
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


@pytest.mark.ui
@pytest.mark.skipif(not Path(ui_check.CHROMIUM).exists() or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium at /usr/bin/chromium and playwright (make ui-setup)")
def test_the_mlflow_ui_overlays_two_regression_paths(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ui_check.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "ui-check: ok" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and (tmp_path / "metric.png").stat().st_size > 10_000

"""Check in a real headless browser that ``make ui``'s address opens the runs table and that the
MLflow UI overlays the paths of two regressions.

Runs two small regressions that differ in k and solver (fista k=20, saga k=50) on the tiny digits
example into a fresh MLflow store, starts ``make ui``'s command (``python -m datamodels_ml.tracking.ui``) on
a free localhost port, and drives Debian's Chromium (``/usr/bin/chromium``) through Playwright's
Python package (never its own browsers) first to the address it printed, which must show the
experiment's runs table (not the GenAI overview or traces) listing both runs, the lower
``best_val_mse`` first (screenshot ``runs.png``), then to the Compare view of the two runs, then to the chart of the path metric
there (``val_mse`` by default: step = 100·log10(λ_max/λ), equal in both runs). It passes only when that
one chart holds a curve for each run, with both run names in its legend, and saves screenshots
(``compare.png``, ``metric.png``) in ``--out``. Exit status 0: overlaid; 1: not; 2: cannot run
(no browser, no playwright: ``make ui-setup``).

Usage: python benchmarks/ui_check.py [--out data/ui-check] [--metric val_mse] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REGRESSIONS = (("fista", 20), ("saga", 50))  # (cfg.method, cfg.k): two paths whose λ indices differ


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env.setdefault("PYTHONWARNINGS", "ignore")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


def _cli(work: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "datamodels_ml", *args], cwd=work, env=_env(work),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ui-check: `{' '.join(args[:1])}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def make_runs(work: Path) -> list[dict[str, str]]:
    """Train the tiny example, write its .beton, run the two regressions; return their runs."""
    configs = ROOT / "configs"
    _cli(work, "train", "store=st", f"spec={configs / 'digits_spec.json'}", "main=datamodels_ml.examples.digits",
         "n=60", "jobs=2", "progress=false")
    _cli(work, "write_dataset", "store=st", "out=reg.beton", "progress=false")
    started = time.time() * 1000
    for method, k in REGRESSIONS:
        _cli(work, "regress", f"config={configs / 'reg_tiny.yaml'}", "data.data_path=reg.beton",
             f"cfg.out_dir=reg-{method}-k{k}", f"cfg.method={method}", f"cfg.k={k}", "cfg.max_epochs=50")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_env(work)["MLFLOW_TRACKING_URI"])
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(exps, order_by=["attributes.start_time ASC"])
            if r.info.start_time >= started and r.data.params.get("cfg.method") in {m for m, _ in REGRESSIONS}]
    if len(runs) != len(REGRESSIONS):
        raise SystemExit(f"ui-check: expected {len(REGRESSIONS)} regress runs in {work / 'mlflow.db'}, found {len(runs)}")
    return [{"id": r.info.run_id, "name": r.info.run_name, "experiment": r.info.experiment_id,
             "method": r.data.params["cfg.method"], "k": r.data.params["cfg.k"]} for r in runs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path) -> tuple[subprocess.Popen, str, str]:
    """``make ui``'s command (``python -m datamodels_ml.tracking.ui``) on the store, on a free localhost port;
    returns once it printed its address: (process, base URL, the printed address)."""
    port = _free_port()
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "datamodels_ml.tracking.ui", "--no-browser", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"],
                              cwd=work, env=_env(work), stdout=subprocess.PIPE, stderr=log, text=True,
                              start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = server.stdout.readline()
        if line.strip().startswith("http://"):
            return server, f"http://127.0.0.1:{port}", line.strip()
        if not line and server.poll() is not None:
            break
    server.kill()
    raise SystemExit(f"ui-check: make ui's command printed no address (see {work / 'server.log'})")


RUNS_JS = """() => ({
  url: location.href,
  text: document.body.innerText,
  rows: [...document.querySelectorAll('[role="row"], .ag-row, tr')].map(r => r.innerText || '')
})"""


def check_runs_page(page: dict, runs: list[dict], best: dict[str, float]) -> list[str]:
    """What is wrong with the page reached from make ui's address; empty when it is the experiment's
    runs table (not the GenAI overview or traces), listing every run, best ``best_val_mse`` first."""
    problems = []
    route = page["url"].split("#", 1)[-1]
    if not re.search(r"/experiments/\d+/runs(\?|$)", route) or "workflowType=machine_learning" not in route:
        problems.append(f"the address led to {route}, not the experiment's runs table")
    for word in ("Detect Issues", "Usage overview"):  # the GenAI pages' pop-up and overview
        if word in page["text"]:
            problems.append(f"the page shows GenAI pages ({word!r})")
    for run in runs:
        if run["name"] not in page["text"]:
            problems.append(f"the runs table does not list run {run['name']}")
    order = [r["name"] for row in page["rows"] for r in runs if r["name"] in row]
    first = min(runs, key=lambda r: best[r["id"]])["name"]
    if order and order[0] != first:
        problems.append(f"the first run listed is {order[0]}, not {first} (lowest best_val_mse)")
    return problems


# what the chart holds, read from the page: plotly's data on the chart's div, the legend under it
CHART_JS = """() => {
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  return plots.map(p => ({
    xtitle: (p.querySelector('.g-xtitle') || {}).textContent || '',
    curves: (p.data || []).filter(d => d.hoverinfo !== 'skip')
                           .map(d => ({name: d.name, x: [...(d.x || [])], y: [...(d.y || [])]})),
    drawn: [...p.querySelectorAll('.scatterlayer path.js-line')].map(e => e.getAttribute('d') || '')
                                                               .filter(d => (d.match(/L/g) || []).length > 0).length,
    legend: [...document.querySelectorAll('body *')]  // MLflow draws the legend under the chart, in HTML
              .filter(e => e.children.length === 0 && / \\(.+\\)$/.test(e.textContent || ''))
              .map(e => e.textContent.trim()),
  }));
}"""


def check_chart(charts: list[dict], runs: list[dict], histories: dict[str, list[tuple[int, float]]],
                metric: str) -> list[str]:
    """What is wrong with the page's chart(s) of ``metric``; empty when one chart overlays every run
    with exactly its logged path (steps and values), under its run name in the legend."""
    problems = []
    if len(charts) != 1:
        return [f"expected one chart of {metric}, found {len(charts)}"]
    chart = charts[0]
    if chart["xtitle"].strip().lower() != "step":
        problems.append(f"the x axis is {chart['xtitle']!r}, not Step")
    curves = [(c["x"], [round(v, 9) for v in c["y"]]) for c in chart["curves"]]
    for run in runs:
        truth = ([s for s, _ in histories[run["id"]]], [round(v, 9) for _, v in histories[run["id"]]])
        if truth not in curves:
            problems.append(f"no curve on the chart holds the {metric} path of run {run['name']} "
                            f"({run['method']}, k={run['k']}: {len(truth[0])} points, steps {truth[0][:4]}...)")
        if f"{run['name']} ({metric})" not in chart["legend"]:
            problems.append(f"the legend does not name run {run['name']} ({chart['legend']})")
    if len({tuple(c[0]) for c in curves}) < len(runs):
        problems.append("the runs' curves do not differ: it is one path drawn twice")
    if chart["drawn"] < len(runs):
        problems.append(f"only {chart['drawn']} lines are drawn in the chart's SVG, expected {len(runs)}")
    legend_count = sum(1 for text in chart["legend"] if text.endswith(f"({metric})"))
    if legend_count != len(runs):
        problems.append(f"the legend lists {legend_count} curves of {metric}, expected {len(runs)}")
    return problems


def browse(url: str, runs: list[dict], histories: dict, metric: str, out: Path, printed: str = "",
           best: dict[str, float] | None = None) -> list[str]:
    """The page of make ui's printed address (``runs.png``), then the Compare view of the runs and
    its chart of ``metric``; screenshots into ``out``."""
    from playwright.sync_api import sync_playwright

    ids = json.dumps([r["id"] for r in runs])
    exps = json.dumps(sorted({r["experiment"] for r in runs}))
    compare = f"{url}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(exps)}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1900, "height": 1100})
            problems: list[str] = []
            if printed:
                page.goto(printed)
                try:
                    page.get_by_text(runs[0]["name"]).first.wait_for(timeout=90_000)
                except Exception:  # noqa: BLE001 - judged below, with the screenshot
                    pass
                page.wait_for_timeout(2500)
                page.screenshot(path=str(out / "runs.png"), full_page=True)
                problems += check_runs_page(page.evaluate(RUNS_JS), runs, best or {})
            page.goto(compare)
            link = page.locator(f'a[href*="metric=%22{urllib.parse.quote(metric)}%22"]').first
            link.wait_for(timeout=90_000)  # the Compare view's metrics table links each metric to its chart
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "compare.png"), full_page=True)
            text = page.inner_text("body")
            problems += [f"the Compare view does not show run {r['id']}" for r in runs if r["id"] not in text]
            link.click()
            page.wait_for_selector(".js-plotly-plot .scatterlayer path.js-line", timeout=90_000)
            page.wait_for_timeout(2000)  # let every curve arrive and draw
            page.screenshot(path=str(out / "metric.png"), full_page=True)
            return problems + check_chart(page.evaluate(CHART_JS), runs, histories, metric)
        finally:
            browser.close()


def best_of(work: Path, runs: list[dict]) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_env(work)["MLFLOW_TRACKING_URI"])
    return {r["id"]: client.get_run(r["id"]).data.metrics["best_val_mse"] for r in runs}


def histories_of(work: Path, runs: list[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_env(work)["MLFLOW_TRACKING_URI"])
    return {r["id"]: sorted((m.step, m.value) for m in client.get_metric_history(r["id"], metric)) for r in runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/ui-check", help="folder for the screenshots (default: data/ui-check)")
    ap.add_argument("--metric", default="val_mse", help="the path metric to check (default: val_mse)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary MLflow store and data")
    args = ap.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        print(f"ui-check: no browser at {CHROMIUM} (make ui-setup installs Debian's chromium)", file=sys.stderr)
        return 2
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        print("ui-check: the playwright package is missing (make ui-setup)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="datamodels-ui-check-"))
    server = None
    try:
        t0 = time.perf_counter()
        runs = make_runs(work)
        histories = histories_of(work, runs, args.metric)
        print(f"ui-check: 2 regressions in {time.perf_counter() - t0:.0f} s: "
              + ", ".join(f"{r['name']} ({r['method']}, k={r['k']}, {len(histories[r['id']])} points of "
                          f"{args.metric})" for r in runs), flush=True)
        best = best_of(work, runs)
        server, url, printed = start_server(work)
        print(f"ui-check: make ui printed {printed}", flush=True)
        problems = browse(url, runs, histories, args.metric, out, printed, best)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        if args.keep:
            print(f"ui-check: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    shots = f"{out / 'runs.png'}, {out / 'compare.png'}, {out / 'metric.png'}"
    if problems:
        print("ui-check: FAILED: " + "; ".join(problems) + f" (screenshots: {shots})", file=sys.stderr)
        return 1
    print(f"ui-check: ok: make ui's address opens the runs table (best best_val_mse first), and the Compare "
          f"view's {args.metric} chart overlays both paths on one step axis "
          f"(screenshots: {shots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

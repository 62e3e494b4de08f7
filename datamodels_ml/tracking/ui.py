"""``make ui``: ``mlflow ui`` on a backend store, opened on the runs table.

``python -m datamodels_ml.tracking.ui`` starts ``mlflow ui`` on a backend store, creates the
``datamodels`` experiment if needed, prints its runs-table address (``links.experiment_url``; and
opens it where a browser exists), and records the address in ``mlflow-ui.json`` in the working
directory while it runs, so that commands run there print their runs' links.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from datamodels_ml.tracking.links import UI_FILE, experiment_url


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _can_open_browser() -> bool:
    return bool(sys.platform == "darwin" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("BROWSER"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datamodels_ml.tracking.ui",
                                 description="mlflow ui on a backend store, opened on the runs table")
    ap.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--no-browser", action="store_true", help="print the address only")
    args = ap.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.backend_store_uri
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.errors import UserError

    try:
        tracking.prepare()
        exp_id = tracking.ensure_experiment(tracking.experiment_name())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
                             "--host", args.host, "--port", str(args.port)])
    state = Path(UI_FILE)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # kill PID stops mlflow ui too and removes mlflow-ui.json
    try:
        if not _wait_until_up(base, proc):
            print(f"error: mlflow ui did not start on {base} (is the port taken? make ui UI_PORT=...)",
                  file=sys.stderr)
            return 2
        url = experiment_url(base, exp_id)
        state.write_text(json.dumps({"url": base, "backend_store_uri": args.backend_store_uri,
                                     "pid": os.getpid()}) + "\n")
        print(f"\nMLflow UI, experiment '{tracking.experiment_name()}' (runs table, best best_val_mse first):\n"
              f"  {url}\n(Ctrl-C stops it)", flush=True)
        if not args.no_browser and _can_open_browser():
            import webbrowser

            webbrowser.open(url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())

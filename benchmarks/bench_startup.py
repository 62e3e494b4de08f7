"""Start-up of the regression's read path: what a fresh process pays before its first batch.

Writes a digits-shaped ``.beton`` (3600 models, 1000 features, 300 targets) with ``write_beton``,
then, in fresh processes, times (1) importing ``datamodels_ml.dataset.reader`` and reading the header
(``beton_info``), (2) the first batch of ``BetonBatches`` (``import torch`` included), (3) a full
pass; and reports whether FFCV or numba were imported, and the slowest imports
(``python -X importtime``).

Usage: python benchmarks/bench_startup.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, time
t0 = time.perf_counter()
from datamodels_ml.dataset.reader import BetonBatches, beton_info
info = beton_info(sys.argv[1]); t1 = time.perf_counter()
src = BetonBatches(sys.argv[1], batch_size=2000, info=info)
next(iter(src)); t2 = time.perf_counter()
n = sum(x.shape[0] for x, _, _ in src); t3 = time.perf_counter()
heavy = sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('ffcv', 'numba')})
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {','.join(heavy) or '-'}")
"""


def make_beton(path: Path) -> None:
    import numpy as np

    from datamodels_ml.dataset.write_dataset import write_beton
    from datamodels_ml.store.spec import parse_spec
    from datamodels_ml.store.store import create_store

    n, p, t = 3600, 1000, 300
    store = create_store(path.parent / "store", parse_spec({"num_models": n, "schema": {
        "masks": {"shape": [p], "dtype": "bool_"}, "margins": {"shape": [t], "dtype": "float32"}}}))
    rng = np.random.default_rng(0)
    for i in range(n):
        store.write_row(i, {"masks": rng.random(p) < 0.5, "margins": rng.normal(size=t).astype(np.float32)})
    write_beton(store.path, path, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from _common import machine_report

    machine_report()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(tmp) / "reg.beton"
        make_beton(beton)
        print("import + header   first batch   full pass   heavy modules imported")
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", PROBE, str(beton)], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            print(f"{float(out[0]):13.2f} s {float(out[1]):11.2f} s {float(out[2]):9.2f} s   {out[3]}")
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE, str(beton)], env=env,
                             capture_output=True, text=True, check=True).stderr
        rows = []
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                rows.append((int(parts[1]), parts[2].rstrip()))
        print("slowest imports (cumulative):")
        for us, name in sorted(rows, reverse=True)[:6]:
            print(f"  {us / 1e6:6.2f} s {name}")


if __name__ == "__main__":
    main()

"""Held-out MSE of ``regress`` on an unchanged original config against fast_l1 on the same data.

For each seed and noise level: a store of 300 models (40 features, 3 targets, Bernoulli(1/2) masks,
4 non-zero true weights per target), its .beton, and two original regression configs: the CIFAR
example's settings (lr 1e-4, early_stopping.eps 0.5, check_every 3) and the original's defaults (lr
0.01, early_stopping.eps 1e-5, check_every 2), both k=10, eps=1e-2, 200 train / 40 val models,
batch 10. ``regress`` reads each config as written (in process: ``load_config`` + ``fit``; with
``cfg.relax=true``, as an original config is read) and with ``cfg.relax=false`` (the exact lasso);
fast_l1 is the numpy re-implementation of tests/regression/test_original_config.py (``fast_l1_fit``). The MSE
is on 2000 fresh masks against the noise-free truth; the last column counts the seeds where
``regress`` (relaxed) is at least as good as fast_l1.

    .venv/bin/python benchmarks/bench_original_config.py [--seeds 8] [--noise 0.3 1.0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SETTINGS = {"cifar example": dict(lr=1e-4, tol=0.5, check_every=3), "defaults": dict(lr=0.01, tol=1e-5, check_every=2)}


def main() -> None:
    from datamodels_ml.dataset.reader import read_beton
    from datamodels_ml.dataset.write_dataset import write_beton
    from datamodels_ml.regression.original_config import load_config
    from datamodels_ml.regression.regress import fit
    from conftest import make_store
    from test_original_config import NUM_TRAIN, NUM_VAL, N, P, T, EPS, K, fast_l1_fit, heldout_mse, ours

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0])
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine_report

    machine_report()
    print("noise  settings        regress (mean)  relax=false     fast_l1 (mean)  seeds where regress <= fast_l1")
    with tempfile.TemporaryDirectory() as tmp:
        for noise in args.noise:
            rows = {name: [] for name in SETTINGS}
            for seed in range(args.seeds):
                root = Path(tmp) / f"{noise}_{seed}"
                store, w, b = make_store(root / "store", n=N, p=P, t=T, seed=seed, noise=noise)
                write_beton(store.path, root / "d.beton", num_workers=1, progress=False)
                x, y, _ = read_beton(root / "d.beton", np.arange(N))
                fresh = np.random.default_rng(7).random((2000, P)) < 0.5
                truth = fresh @ w + b
                for name, s in SETTINGS.items():
                    cfg = {"data": {"data_path": str(root / "d.beton"), "num_train": NUM_TRAIN, "num_val": NUM_VAL,
                                    "seed": 0},
                           "cfg": {"k": K, "batch_size": 10, "lr": s["lr"], "eps": EPS, "out_dir": "unused",
                                   "num_workers": 8},
                           "early_stopping": {"check_every": s["check_every"], "eps": s["tol"]}}
                    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
                    result = fit(load_config([f"config={root / 'c.yaml'}"], quiet=True), progress=False, log=False)
                    lasso = fit(load_config([f"config={root / 'c.yaml'}", "cfg.relax=false"], quiet=True),
                                progress=False, log=False)
                    rows[name].append((heldout_mse(ours(result), fresh, truth),
                                       heldout_mse(fast_l1_fit(x, y, **s), fresh, truth),
                                       heldout_mse(ours(lasso), fresh, truth)))
            for name, r in rows.items():
                a = np.array(r)
                print(f"{noise:<6} {name:<15} {a[:, 0].mean():<15.4g} {a[:, 2].mean():<15.4g} {a[:, 1].mean():<15.4g} "
                      f"{int((a[:, 0] <= a[:, 1]).sum())}/{len(a)}")


if __name__ == "__main__":
    main()

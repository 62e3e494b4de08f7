"""TRAK against datamodels on the digits example, on the same held-out models: ``make compare``.

TRAK (the ``traker`` package, optional: ``pip install -e '.[compare]'``; its CPU projector) scores
the example's MLP with 1, 4, 16, ... checkpoints, each an MLP trained on a random half of the training
set (``checkpoint_fraction``; on all of it, the LDS was lower at every count), projected to 128
dimensions (``proj_dim``; it must stay below the 1000 training examples);
datamodels are fitted on growing numbers of the store's models (``budget``'s fits). Each point is
scored on the held-out models the largest fit leaves (``evaluate``'s held-out set), with bootstrap
intervals from shared replicates, and placed at its compute in core-seconds, CPU time
(``time.process_time``) for both: TRAK's checkpoints trained, featurized and scored here; for the
datamodels, the models used (train + validation) at the measured CPU time of one digits model, plus
the regression. The plot shows LDS against compute for both; the
table says which is ahead at each compute. Everything is logged as one ``compare`` run; TRAK's
save_dir stays in ``out/trak_results`` (scores of all the checkpoints), for ``evaluate scores=``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.evaluation import bootstrap
from datamodels_ml.errors import UserError


@dataclass
class CompareConfig:
    reg_config: str = field(default="configs/reg.yaml", metadata={"help": "regression config of the demo (its beton)"})
    reg: dict[str, Any] = field(default_factory=dict, metadata={"help": "overrides of the regression config"})
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0], metadata={
        "help": "fractions of data.num_train for the datamodels' fits"})
    checkpoints: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 128], metadata={
        "help": "numbers of MLP checkpoints for TRAK"})
    checkpoint_fraction: float = field(default=0.5, metadata={
        "help": "each TRAK checkpoint is trained on this random fraction of the training set (1: all of it)"})
    proj_dim: int = field(default=128, metadata={
        "help": "TRAK's projection dimension (below the 1000 training examples, or TRAK's inverse is singular)"})
    store: str = field(default="", metadata={"help": "store of the models (default: the regression's)"})
    bootstrap: int = field(default=300, metadata={"help": "bootstrap replicates for the intervals"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap and of the checkpoints"})
    out: str = field(default="data/digits/compare", metadata={"help": "compare.csv, compare.png, TRAK's save_dir"})


def _train_full(seed: int, fraction: float = 1.0, epochs: int = 60, hidden: int = 64, lr: float = 0.01):
    """The digits example's MLP, trained as ``examples.digits.main`` trains it, on the whole training set
    (or on a random ``fraction`` of it, drawn with ``seed``)."""
    import torch

    from datamodels_ml.digits import load_split

    x_train, y_train, _, _ = load_split()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    keep = np.random.default_rng(seed).random(len(x_train)) < fraction if fraction < 1 else slice(None)
    xs, ys = torch.from_numpy(x_train[keep]), torch.from_numpy(y_train[keep])
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    return model.eval()


def trak_scores(counts: list[int], *, proj_dim: int, save_dir: Path, seed: int = 0, fraction: float = 1.0,
                batch: int = 250) -> list[tuple[int, float, np.ndarray]]:
    """TRAK's scores [1000, 797] from the first k checkpoints, for each k: (k, core-seconds, scores)."""
    try:
        from trak import TRAKer
    except ImportError:
        raise UserError("compare needs the traker package: pip install -e '.[compare]' (or pip install traker)") from None
    import torch

    from datamodels_ml.digits import load_split

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_split())
    with contextlib.redirect_stderr(io.StringIO()):  # traker's progress bars
        return _trak(TRAKer, counts, proj_dim, save_dir, seed, fraction, batch, x_train, y_train, x_test, y_test)


def _trak(TRAKer, counts, proj_dim, save_dir, seed, fraction, batch, x_train, y_train, x_test, y_test):
    import logging

    k_max = max(counts)
    cost = np.zeros(k_max)  # core-seconds per checkpoint: training, featurizing, scoring
    models = []
    for c in range(k_max):
        t0 = time.process_time()
        models.append(_train_full(seed * 1000 + 100_000 + c, fraction))
        cost[c] += time.process_time() - t0
    t0 = time.process_time()
    traker = TRAKer(model=models[0], task="image_classification", train_set_size=len(x_train), save_dir=str(save_dir),
                    load_from_save_dir=True, device="cpu", proj_dim=proj_dim, use_half_precision=False,
                    logging_level=logging.WARNING)
    setup = time.process_time() - t0
    for c, model in enumerate(models):
        t0 = time.process_time()
        traker.load_checkpoint(model.state_dict(), model_id=c)
        for i in range(0, len(x_train), batch):
            traker.featurize(batch=(x_train[i:i + batch], y_train[i:i + batch]), num_samples=len(x_train[i:i + batch]))
        cost[c] += time.process_time() - t0
    t0 = time.process_time()
    traker.finalize_features()
    cost += (time.process_time() - t0) / k_max
    for c, model in enumerate(models):
        t0 = time.process_time()
        traker.start_scoring_checkpoint(exp_name="digits", checkpoint=model.state_dict(), model_id=c,
                                        num_targets=len(x_test))
        traker.score(batch=(x_test, y_test), num_samples=len(x_test))
        cost[c] += time.process_time() - t0
    out = []
    for k in sorted(set(counts)):
        t0 = time.process_time()
        scores = traker.finalize_scores(exp_name="digits", model_ids=list(range(k)))
        seconds = float(cost[:k].sum() + setup + time.process_time() - t0)
        out.append((k, seconds, np.asarray(scores, dtype=np.float64).copy()))
    return out


def model_core_seconds(n: int = 8) -> float:
    """CPU seconds of one of the store's digits models, trained here as ``train`` trains it (mean of ``n``)."""
    import torch

    from datamodels_ml.examples import digits

    threads = torch.get_num_threads()  # main() sets one thread, as in its slot
    digits.main(index=9_999, logdir="")  # warm-up: the data set, torch's first calls
    t0 = time.process_time()
    for i in range(n):
        digits.main(index=10_000 + i, logdir="")
    seconds = (time.process_time() - t0) / n
    torch.set_num_threads(threads)
    return seconds


def datamodel_fits(cfg: CompareConfig):
    """Datamodels fitted on each fraction (as ``budget``): [(models used, core-seconds, Datamodels)], store.

    A point's compute: its models (train + validation) at the CPU time of one digits model measured
    here (``train``'s recorded slot seconds are wall time, which a busy machine inflates; TRAK's are
    CPU time), plus the regression's CPU time."""
    from datamodels_ml.evaluation.budget import load_regress_config
    from datamodels_ml.datamodel import Datamodels
    from datamodels_ml.regression.regress import fit

    base = load_regress_config(cfg.reg_config, cfg.reg)
    full = int(base.data.num_train)
    sizes = sorted(set(max(1, int(round(f * full))) for f in cfg.fractions))
    fits = []
    for n in sizes:
        sub = dataclasses.replace(base, data=dataclasses.replace(base.data, num_train=n))
        t0 = time.process_time()
        dm = Datamodels.from_dict(fit(sub, progress=False, log=False), source=f"fit on {n} models")
        fits.append((n, time.process_time() - t0, dm))
        print(f"compare: datamodels fitted on {n} models", flush=True)
    store = cfg.store or fits[-1][2].store or ""
    per_model = model_core_seconds()
    print(f"compare: one digits model takes {per_model:.3f} core-seconds to train here")
    out = []
    for n, fit_seconds, dm in fits:
        used = int(np.union1d(dm.indices("train_indices"), dm.indices("val_indices")).size)
        out.append((used, used * per_model + fit_seconds, dm))
    return out, store


def _wins(rows: list[dict[str, Any]]) -> list[str]:
    """At each point's compute: the other method's best LDS within that compute, and who is ahead."""
    lines = []
    for r in sorted(rows, key=lambda r: r["core_seconds"]):
        other = [o for o in rows if o["method"] != r["method"] and o["core_seconds"] <= r["core_seconds"]]
        best = max(other, key=lambda o: o["lds"]) if other else None
        if best is None:
            lines.append(f"{r['core_seconds']:>9.1f} core-s: {r['method']} {r['lds']:.3f} (the other has no point yet)")
            continue
        ahead = r if r["lds"] > best["lds"] else best
        sure = r["lds_low"] > best["lds_high"] or best["lds_low"] > r["lds_high"]
        lines.append(f"{r['core_seconds']:>9.1f} core-s: {r['method']} {r['lds']:.3f} vs {best['method']} "
                     f"{best['lds']:.3f} -> {ahead['method']} ahead{'' if sure else ' (intervals overlap)'}")
    return lines


def compare_figure(rows: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("datamodels", "o"), ("trak", "s")):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["core_seconds"])
        xs = [r["core_seconds"] for r in pts]
        ax.fill_between(xs, [r["lds_low"] for r in pts], [r["lds_high"] for r in pts], alpha=0.2)
        ax.plot(xs, [r["lds"] for r in pts], marker=marker, label=method)
        for r in pts:
            ax.annotate(str(r["size"]), (r["core_seconds"], r["lds"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="compute (core-seconds: training + attribution)", ylabel="LDS on held-out models (95% interval)",
           title=f"TRAK vs datamodels, digits ({rows[0]['n_heldout']} held-out models)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def compare(cfg: CompareConfig) -> int:
    """TRAK (traker, CPU) vs datamodels on the digits demo: LDS with intervals against compute, in MLflow."""
    from datamodels_ml.tracking import runs as tracking
    from datamodels_ml.evaluation.heldout import load_heldout
    from datamodels_ml.evaluation.metrics import lds

    if not cfg.checkpoints or min(cfg.checkpoints) < 1:
        raise UserError(f"checkpoints must be positive counts, got {list(cfg.checkpoints)}")
    if not 0 < cfg.checkpoint_fraction <= 1:
        raise UserError(f"checkpoint_fraction must be in (0, 1], got {cfg.checkpoint_fraction}")
    if not 0 < cfg.proj_dim < 1000:
        raise UserError(f"proj_dim must be between 1 and 999 (below the 1000 training examples), got {cfg.proj_dim}")
    start = time.perf_counter()
    fits, store = datamodel_fits(cfg)
    used = np.unique(np.concatenate([np.concatenate([d.indices("train_indices"), d.indices("val_indices")])
                                     for _, _, d in fits]))
    held = load_heldout(fits[-1][2], store=store, source="the datamodels", exclude=used)
    if held.masks.shape[1] != 1000 or held.actual.shape[1] != 797:
        raise UserError(f"compare runs on the digits example (1000 training images, 797 targets); the store at "
                        f"{held.store} has masks {list(held.masks.shape)} and outputs {list(held.actual.shape)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dir = out / "trak_results"  # ours: replaced on every run; the last scores (all checkpoints) stay
    shutil.rmtree(save_dir, ignore_errors=True)
    traks = trak_scores(list(cfg.checkpoints), proj_dim=cfg.proj_dim, save_dir=save_dir, seed=cfg.seed,
                        fraction=cfg.checkpoint_fraction)
    masks = held.masks.astype(np.float64)
    points = [("datamodels", n, s, dm.predict(held.masks)) for n, s, dm in fits]
    points += [("trak", k, s, masks @ scores) for k, s, scores in traks]
    ivs = bootstrap.lds_intervals([p for *_, p in points], held.actual, n_boot=cfg.bootstrap, seed=cfg.seed)
    rows = [{"method": m, "size": n, "core_seconds": s, "lds": lds(p, held.actual), "lds_low": iv.low,
             "lds_high": iv.high, "n_heldout": int(held.indices.size)} for (m, n, s, p), iv in zip(points, ivs)]
    print(f"{'method':<11} {'size':>6} {'core-s':>9} {'LDS':>7} {'95% interval':>17}   (size: models used / checkpoints)")
    for r in rows:
        print(f"{r['method']:<11} {r['size']:>6} {r['core_seconds']:>9.1f} {r['lds']:>7.4f} "
              f"[{r['lds_low']:.4f}, {r['lds_high']:.4f}]")
    wins = _wins(rows)
    print("who is ahead at each compute (the other's best point within it):\n  " + "\n  ".join(wins))

    import matplotlib.pyplot as plt

    params = {"reg_config": cfg.reg_config, "fractions": list(cfg.fractions), "checkpoints": list(cfg.checkpoints),
              "proj_dim": cfg.proj_dim, "store": store, "n_heldout": int(held.indices.size), "bootstrap": cfg.bootstrap}
    with tracking.run("compare", name=f"compare-trak-datamodels-{held.indices.size}", params=params):
        for r in rows:
            tracking.log_metrics({f"{r['method']}_{k}": r[k] for k in ("lds", "lds_low", "lds_high", "core_seconds")},
                                 step=int(r["size"]))
        with open(out / "compare.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "wins.txt").write_text("\n".join(wins) + "\n")
        for name in ("compare.csv", "wins.txt"):
            tracking.log_artifact(out / name, "compare")
        fig = compare_figure(rows)
        fig.savefig(out / "compare.png", dpi=110)
        tracking.log_figure(fig, "compare/compare.png")
        plt.close(fig)
    print(f"artifacts: {out / 'compare.csv'}, {out / 'compare.png'} ({time.perf_counter() - start:.0f} s)")
    return 0


__all__ = ["CompareConfig", "compare", "trak_scores", "datamodel_fits", "compare_figure"]

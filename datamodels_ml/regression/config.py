"""The regression config: its structured schema and the checks of its values that need no file.

A superset of the original ``regression_config.yaml`` (sections ``data``, ``cfg``,
``early_stopping``), merged as schema <- YAML <- command line by ``config.load``; unknown or missing
keys are refused with the key's name there. ``check`` refuses out-of-range values with one line;
``regress_devices`` checks ``cfg.device`` and ``gpus`` against the CUDA devices of this machine.
A key spelled as in the original means what it means there; where we differ, the behaviour has a
key of its own (``data.split``, ``cfg.grid``, ``cfg.refit_standardization``, ``cfg.tol``,
``cfg.relax``), and
``regression.original_config`` sets those for a file written for the original.
"""

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from datamodels_ml.errors import UserError


SPLITS = ("random", "ordered")
REFIT_STANDARDIZATIONS = ("train", "train_val")


@dataclass
class DataConfig:
    data_path: str = field(default=MISSING, metadata={"help": "FFCV .beton written by write_dataset"})
    num_train: int = field(default=MISSING, metadata={"help": "models used to fit the datamodels"})
    num_val: int = field(default=MISSING, metadata={"help": "models used to pick λ per target"})
    seed: int = field(default=0, metadata={"help": "seed of the random train/val split (data.split=random) and of the batch order"})
    split: str = field(default="random", metadata={"help": "random: a seeded random train/val split; ordered: the first num_train rows, then the next num_val (the original's)"})
    target_start_ind: int = field(default=0, metadata={"help": "first target (column of y) to fit"})
    target_end_ind: int = field(default=-1, metadata={"help": "end of the target slice, exclusive (-1: all)"})


@dataclass
class SolverConfig:
    out_dir: str = field(default=MISSING, metadata={"help": "directory for datamodels.pt and the reports"})
    k: int = field(default=100, metadata={"help": "number of λ values along the path (cfg.grid=fast_l1: plus λ = 0)"})
    eps: float = field(default=1e-6, metadata={"help": "grid depth in (0, 1]: the smallest λ is eps·λ_max (cfg.grid=fast_l1: λ_max·eps^((k-1)/k))"})
    grid: str = field(default="datamodels_ml", metadata={"help": "datamodels_ml: k λ from λ_max of the standardized masks down to eps·λ_max; fast_l1: the original's (λ_max of the raw masks · eps^(i/k), i < k, then λ = 0)"})
    batch_size: int = field(default=2000, metadata={"help": "rows per minibatch (saga) or per read (fista)"})
    lr: Optional[float] = field(default=None, metadata={"help": "saga step size (null: automatic)"})
    num_workers: int = field(default=0, metadata={"help": "the original's FFCV loader threads; accepted, no effect (the .beton reader reads ahead in one thread)"})
    use_bias: bool = field(default=True, metadata={"help": "fit an unpenalized intercept per target"})
    method: str = field(default="fista", metadata={"help": "solver: fista (Gram matrix, screened) or saga (streams the data)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"help": "working precision: float32 or float64"})
    max_epochs: Optional[int] = field(default=None, metadata={"help": "cap per λ (saga epochs / fista iterations; null: solver default)"})
    min_lambdas: int = field(default=5, metadata={"help": "λ indices always fitted before a target may stop early"})
    refit: bool = field(default=True, metadata={"help": "refit each target at its selected λ on train+val"})
    relax: bool = field(default=False, metadata={"help": "fista: the relaxed lasso: blend each target's weights with least squares on their support, (1-φ)·w + φ·w_LS, φ in {0, .25, .5, .75, 1} picked with λ on the validation models (also applied to the refit)"})
    refit_standardization: str = field(default="train", metadata={"help": "mean/std of the refit (and saved): train (the path's) or train_val (recomputed on train+val, the original's)"})
    tol: float = field(default=1e-6, metadata={"help": "convergence tolerance: each λ is solved until its duality gap is below tol * var(y) (early_stopping.eps is the original's absolute one, saga only)"})
    force: bool = field(default=False, metadata={"help": "replace the outputs of an earlier regress in out_dir (only its own files)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    target_block: int = field(default=0, metadata={"help": "targets solved at a time (0: as many as the memory holds)"})
    kernels: str = field(default="", metadata={"help": "force CPU kernels, e.g. gram=syrk,gemm=torch (gram: int8|syrk|torch, colsum: bytes|int8|torch, gemm: openblas|torch, xty: int8|float; empty: the fastest by rates measured on this machine, cached per machine; measure: measure them again now)"})


@dataclass
class EarlyStoppingConfig:
    check_every: int = field(default=3, metadata={"help": "saga epochs between convergence checks"})
    eps: Optional[float] = field(default=None, metadata={"help": "the original's absolute tolerance (saga): a λ is done when max_j std_j²·Δw_j² over an epoch < eps (null: cfg.tol)"})


@dataclass
class RegressConfig:
    data: DataConfig = field(default_factory=DataConfig)
    cfg: SolverConfig = field(default_factory=SolverConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    gpus: int = field(default=0, metadata={"help": "CUDA devices to spread the target blocks over (0: cfg.device only)"})


def check(cfg: RegressConfig) -> None:
    """Validate the values that need no file (ranges, names)."""
    c, d, es = cfg.cfg, cfg.data, cfg.early_stopping
    if c.k < 1:
        raise UserError(f"cfg.k must be >= 1, got {c.k}")
    if not 0 < c.eps <= 1:
        raise UserError(f"cfg.eps must be in (0, 1], got {c.eps}")
    if c.batch_size < 1:
        raise UserError(f"cfg.batch_size must be >= 1, got {c.batch_size}")
    if c.lr is not None and not c.lr > 0:
        raise UserError(f"cfg.lr must be > 0 (or null for automatic), got {c.lr}")
    if c.method not in ("saga", "fista"):
        raise UserError(f"cfg.method must be saga or fista, got '{c.method}'")
    if c.dtype not in ("float32", "float64"):
        raise UserError(f"cfg.dtype must be float32 or float64, got '{c.dtype}'")
    if c.max_epochs is not None and c.max_epochs < 1:
        raise UserError(f"cfg.max_epochs must be >= 1 (or null), got {c.max_epochs}")
    if c.min_lambdas < 0:
        raise UserError(f"cfg.min_lambdas must be >= 0, got {c.min_lambdas}")
    if c.num_workers < 0:
        raise UserError(f"cfg.num_workers must be >= 0, got {c.num_workers}")
    if d.split not in SPLITS:
        raise UserError(f"data.split must be {' or '.join(SPLITS)}, got '{d.split}'")
    from datamodels_ml.solvers.grid import GRIDS  # here, not at import: the solver needs torch

    if c.grid not in GRIDS:
        raise UserError(f"cfg.grid must be {' or '.join(GRIDS)}, got '{c.grid}'")
    if c.refit_standardization not in REFIT_STANDARDIZATIONS:
        raise UserError(f"cfg.refit_standardization must be {' or '.join(REFIT_STANDARDIZATIONS)}, "
                        f"got '{c.refit_standardization}'")
    if not c.tol > 0:
        raise UserError(f"cfg.tol must be > 0, got {c.tol}")
    if es.check_every < 1:
        raise UserError(f"early_stopping.check_every must be >= 1, got {es.check_every}")
    if es.eps is not None and not es.eps > 0:
        raise UserError(f"early_stopping.eps must be > 0, got {es.eps}")
    if d.num_train < 1:
        raise UserError(f"data.num_train must be >= 1, got {d.num_train}")
    if d.num_val < 1:
        raise UserError(f"data.num_val must be >= 1 (the validation models pick λ), got {d.num_val}")
    if c.target_block < 0:
        raise UserError(f"cfg.target_block must be >= 0 (0: automatic), got {c.target_block}")
    if cfg.gpus < 0:
        raise UserError(f"gpus must be >= 0, got {cfg.gpus}")


# -- the devices: checks against this machine -----------------------------------------------------
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"cfg.device={name} but no CUDA device is available (use cfg.device=cpu or auto)")
        if name.startswith("cuda:"):
            index = name[5:]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise UserError(f"cfg.device={name}: there are {torch.cuda.device_count()} CUDA devices")
        return name
    raise UserError(f"cfg.device must be auto, cpu, cuda or cuda:N, got '{name}'")


def regress_devices(cfg: RegressConfig) -> tuple[str, ...]:
    """``cfg.device`` alone, or the first ``gpus`` CUDA devices."""
    if cfg.gpus == 0:
        return (_device(cfg.cfg.device),)
    import torch

    if cfg.cfg.device not in ("auto", "cuda"):
        raise UserError(f"gpus={cfg.gpus} spreads the blocks over CUDA devices: leave cfg.device auto or cuda, "
                        f"not '{cfg.cfg.device}'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.gpus > count:
        raise UserError(f"gpus={cfg.gpus} but {count} CUDA devices are available")
    return tuple(f"cuda:{i}" for i in range(cfg.gpus))

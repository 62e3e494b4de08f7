"""The regression solver: lasso paths for datamodels, pure torch (CPU or CUDA), no I/O or MLflow.

Modules, one concept each: ``sources`` (batch sources), ``stats`` (sufficient statistics built
to scale), ``grid`` (λ_max and the path grid), ``fista`` (FISTA on a Gram), ``screening``
(strong rules + KKT check, Gram operators), ``saga`` (the streaming method), ``path`` (the path
driver: warm starts, early stop, validation selection), ``refit`` (the refit on train+val),
``restandardize`` (the train+val Gram with its own mean/std), ``relax`` (the relaxed lasso),
``result`` (:class:`LassoPath`), ``blas`` (CPU products through OpenBLAS), ``kernels`` (which of
equivalent exact kernels runs, by rates measured on this machine).
"""

from datamodels_ml.solvers.grid import lambda_grid, lambda_max
from datamodels_ml.solvers.path import METHODS, lasso_path
from datamodels_ml.solvers.result import LassoPath
from datamodels_ml.solvers.sources import BatchSource, ChainedSource, TensorBatches
from datamodels_ml.solvers.stats import FeatureStats, feature_stats

__all__ = ["BatchSource", "ChainedSource", "TensorBatches", "FeatureStats", "feature_stats", "LassoPath",
           "lasso_path", "lambda_max", "lambda_grid", "METHODS"]

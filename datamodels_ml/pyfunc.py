"""The datamodels as an MLflow pyfunc model: masks in, predicted outputs out.

``DatamodelsModel`` wraps ``Datamodels.predict``: the input is an array or DataFrame of masks
``[n, n_features]`` (one column per training example, bool or 0/1), the output the predicted
outputs ``[n, n_targets]``. ``log_datamodels_model`` logs it to the active MLflow run with a
signature and ``datamodels.pt`` as its one artifact, so

    mlflow.pyfunc.load_model(uri).predict(masks) == Datamodels.load(path).predict(masks)

and ``mlflow models serve -m URI --env-manager local`` serves it (the model class is pickled by
reference, so the serving environment needs this package installed, as ``make setup`` does).
"""

import logging
from pathlib import Path

import numpy as np

from datamodels_ml.tracking import runs as tracking  # sets MLflow's environment defaults before mlflow is imported
from datamodels_ml.datamodel import Datamodels

import mlflow.pyfunc  # noqa: E402  (only to subclass PythonModel; calls go through tracking)

ARTIFACT = "datamodels"


class DatamodelsModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: ``predict(masks [n, n_features]) -> outputs [n, n_targets]`` (float64)."""

    def load_context(self, context) -> None:
        self._dm = Datamodels.load(context.artifacts[ARTIFACT])

    # ``np.ndarray`` is a hint MLflow derives no schema from (any other hint, or none, makes it warn
    # or validate on its own); the logged signature does the validation. DataFrames work too.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        return self._dm.predict(x)


def requirements() -> list[str]:
    """What loading the model needs besides MLflow: numpy, torch (to read datamodels.pt), cloudpickle."""
    import cloudpickle
    import torch

    return [f"numpy=={np.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"cloudpickle=={cloudpickle.__version__}"]


def log_datamodels_model(datamodels_path: str | Path, name: str = "datamodels", *,
                         loaded: Datamodels | None = None) -> str | None:
    """Log ``datamodels.pt`` as a pyfunc model in the active run; return the model URI (None on failure).

    The signature is a bool tensor ``[-1, n_features]`` in, float64 ``[-1, n_targets]`` out.
    ``loaded``: the same file already loaded by the caller (not loaded a second time: at 50k features
    and 2000 targets each copy is over a gigabyte).
    """
    path = Path(datamodels_path)
    dm = loaded if loaded is not None else Datamodels.load(path)
    example = np.zeros((2, dm.n_features), dtype=bool)
    example[1, ::2] = True
    signature = tracking.infer_signature(example, dm.predict(example))
    # MLflow logs a caution about cloudpickled models and a line per input-example check: the class
    # is this package's own, so keep the console to what matters.
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        artifact = str(path if loaded is not None else dm.path or path)
        return tracking.log_pyfunc_model(DatamodelsModel(), name=name, artifacts={ARTIFACT: artifact},
                                         signature=signature, input_example=example[1:],
                                         pip_requirements=requirements())
    finally:
        logger.setLevel(level)


__all__ = ["DatamodelsModel", "log_datamodels_model"]

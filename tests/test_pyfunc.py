"""A pyfunc model logged by an earlier layout of the package still loads and predicts.

``tests/fixtures/pyfunc_model_main_9edca5f`` was logged by ``log_datamodels_model`` at main 9edca5f,
before the package was reorganized into one folder per stage: its ``python_model.pkl`` names the
class by reference (``datamodels_ml.pyfunc.DatamodelsModel``), so that name must keep resolving.
"""

import shutil

import numpy as np

from conftest import FIXTURES

FIXTURE = FIXTURES / "pyfunc_model_main_9edca5f"


def test_a_model_logged_before_the_reorganization_loads_and_predicts(tmp_path):
    import mlflow.pyfunc

    model_dir = shutil.copytree(FIXTURE, tmp_path / "model")
    assert b"datamodels_ml.pyfunc" in (model_dir / "python_model.pkl").read_bytes()
    model = mlflow.pyfunc.load_model(str(model_dir))
    masks = np.load(model_dir / "masks.npy")
    np.testing.assert_allclose(model.predict(masks), np.load(model_dir / "expected.npy"), rtol=1e-12, atol=1e-12)

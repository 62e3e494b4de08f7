"""datamodels_ml: compute datamodels as an MLflow project.

Train many models on random subsets of a training set, record their outputs in a memmapped store,
then fit one sparse linear model per target from the subset masks to those outputs.
"""

__version__ = "0.1.0"

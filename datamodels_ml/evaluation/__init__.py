"""The evaluation stage: ``evaluate`` (LDS, correlations on held-out models), its metrics, and ``budget``
(the model-budget curve)."""

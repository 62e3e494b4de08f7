"""Every MLflow call of the project: the tracking backend, runs, the child runs of ``train``, and what
``train`` recorded read back."""

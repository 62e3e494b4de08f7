"""The training stage: the ``train`` command and its back ends (local slots, Dask, cluster configs), the
parent and child sides of a runner process, running one model, and the ``worker`` command."""

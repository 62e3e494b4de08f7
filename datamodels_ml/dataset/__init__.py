"""The dataset stage: the ``.beton`` file format, writing a store's completed rows into one
(``write_dataset``), and reading it back as the solver's batches."""

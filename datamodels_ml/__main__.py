"""`python -m datamodels_ml <command> key=value ...`."""

from datamodels_ml.cli import main

raise SystemExit(main())

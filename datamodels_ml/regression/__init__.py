"""The regression stage: the ``regress`` command, its config (and the original tools' configs), the
memory plan, target blocks, and the output directory it writes."""

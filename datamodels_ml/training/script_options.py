"""The script's fastargs options, collected as the original MadryLab worker collects them.

The original worker imports the user's module (which declares its fastargs ``Section``s at import),
then builds an ``ArgumentParser``, lets fastargs add every declared option to it
(``augment_argparse``) and collects the command line into fastargs's global config
(``collect_argparse_args``), so a ``main`` whose arguments are ``@param``-decorated receives
``--exp.multiple=3`` without parsing anything itself. ``collect_declared`` does the same after
``worker.load_main`` has imported main, when fastargs is importable and the module declared at
least one section; fastargs then parses known arguments only (``worker.script_argv``).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any


def collect_declared(config: Any = None) -> bool:
    """Collect ``sys.argv`` into fastargs's config (``config``: its global one by default) when
    sections are declared; True when it did."""
    if config is None:
        if importlib.util.find_spec("fastargs") is None:
            return False
        from fastargs import get_current_config

        config = get_current_config()
    if not getattr(config, "sections", None):  # the script declared no section: not a fastargs script
        return False
    parser = argparse.ArgumentParser(description="options of the training script (fastargs)")
    config.augment_argparse(parser)
    config.collect_argparse_args(parser)
    return True


__all__ = ["collect_declared"]

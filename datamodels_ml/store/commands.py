"""The store commands: ``init`` (create a store from a spec) and ``status`` (completed, missing, failures).

The commands that fill a store, ``worker`` and ``train``, are the training stage's (``training.worker``,
``training.train``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import MISSING

from datamodels_ml.store.spec import load_spec
from datamodels_ml.store.store import Store, create_store, status_report
from datamodels_ml.store.layout import SPEC_FILE, is_store


@dataclass
class InitConfig:
    ALIASES = {"logging.spec": "spec", "logging.logdir": "store"}  # the original initialize_store's spelling

    spec: str = field(default=MISSING, metadata={"help": "spec JSON file (num_models, schema)"})
    store: str = field(default=MISSING, metadata={"help": "store directory to create"})
    force: bool = field(default=False, metadata={"help": "replace an existing store with another spec"})
    write_spec: bool = field(default=False, metadata={
        "help": "write spec.json into an existing store of the original layout (which has none)"})


def init(cfg: InitConfig) -> int:
    """Create the store's memmapped arrays from the spec (a no-op when it already exists)."""
    spec = load_spec(cfg.spec)
    existed = is_store(cfg.store)
    original = existed and not os.path.isfile(os.path.join(cfg.store, SPEC_FILE))
    if cfg.force and existed:  # replacing a store: not while a train or worker writes it
        from datamodels_ml.store.lock import store_lock

        with store_lock(cfg.store, "init force=true"):
            store = create_store(cfg.store, spec, force=True)
    else:
        store = create_store(cfg.store, spec, force=cfg.force, write_spec=cfg.write_spec)
    if existed and not cfg.force:
        if original:
            done = int(store.completed.sum())
            wrote = "wrote spec.json" if cfg.write_spec else "left as it is (write_spec=true adds spec.json)"
            print(f"store {store.path} (original layout, {done}/{spec.num_models} complete) already matches "
                  f"this spec: {wrote}")
        else:
            print(f"store {store.path} already exists with this spec: nothing to do")
    else:
        keys = ", ".join(f"{k} {list(f.shape)} {f.dtype}" for k, f in spec.schema.items())
        print(f"created store {store.path} for {spec.num_models} models: {keys}")
    return 0


@dataclass
class StatusConfig:
    store: str = field(default=MISSING, metadata={"help": "store directory"})


def status(cfg: StatusConfig) -> int:
    """Print completed/total, the missing indices and the last train's failures."""
    print(status_report(Store(cfg.store, writable=False)))
    return 0

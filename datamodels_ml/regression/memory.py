"""Sizing a regression to the memory it runs in: how many targets one block may hold.

The solver's memory (the sufficient-statistics solver, ``cfg.method`` other than ``saga``) is a
float32 ``p x p`` Gram (4 bytes per p², plus about 0.5 for the refit's validation part), shared by
every target block on a device, plus, per target of a block, a few ``p``-long weight and gradient
columns and the block's columns of a read batch and of the validation rows, in the working dtype.
``saga`` streams the rows instead of holding a Gram, but keeps one residual per training row per
target (and a second table for the refit). These are estimates with a safety margin
(``USABLE``), meant to refuse a hopeless run before it reads the data and to size blocks, not to
account for every byte.

Available memory: CPU RAM from ``psutil`` when installed, else ``MemAvailable`` of
``/proc/meminfo``; a CUDA device's free memory from ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodels_ml import heap
from datamodels_ml.errors import UserError
from datamodels_ml.procfs import kb_field
from datamodels_ml.store.layout import human_bytes as fmt_bytes  # one byte format for every message

USABLE = 0.8  # fraction of the available memory a plan may use
GRAM_BYTES_PER_P2 = 4.5  # float32 Gram + the refit's validation part
# p-long float32 columns per target at the peak of a path point: X'y (float64: 2), c, the weights,
# gradient, last solution and best weights (4), and the point's working copies (the warm start,
# solve_screened's weights, gradient, c and keep for the targets solved, the new weights and gradient,
# the validation product: about 12). Measured at p = 50k with 2000 targets: 4 MB per target.
WEIGHT_COLUMNS = 20
# while the heap keeps freed blocks for reuse (``datamodels_ml.heap``, CPU, fista): the blocks it
# holds free. Measured at p = 50k, 10k + 2k models: 3.1 MB per target at the peak without it
# (blocks of 1466), 5.66 MB with it (blocks of 1148): 2.5 MB, 12.7 columns, of which the margin
# of WEIGHT_COLUMNS covers about 5. At p = 50k, 90k + 10k models (blocks of 913, the AVX2 CPU),
# the later blocks' path peaks were 6.8 MB per target over the statistics: 13 columns
HEAP_COLUMNS = 13
ROW_COLUMNS = 3  # (batch + n_val)-long columns per target: read targets, predictions, residuals
SAGA_TABLES = 2  # saga: the path's residual table and the refit's
# the process itself, on the CPU: interpreter, torch, numpy, the MLflow client and the reader's
# buffers (a regress at p = 50k held 13.3 GB before its targets against 11.6 GB of statistics)
RUNTIME_BYTES = 10**9
VAL_MASK_COPIES = 2  # fista: the validation masks, 1 byte per entry, as read and transposed


@dataclass(frozen=True)
class MemoryPlan:
    """How a regression is laid out in memory: fixed statistics plus blocks of targets per device."""

    device: str
    devices: tuple[str, ...]
    dtype: str
    n_features: int
    n_targets: int
    fixed_bytes: int  # per device: the Gram (or nothing for saga) and one read batch
    per_target_bytes: int
    available_bytes: int | None  # per device (the smallest); None when unknown
    target_block: int
    n_blocks: int
    forced: bool  # target_block set by the user (not checked against the available memory)

    @property
    def block_bytes(self) -> int:
        return self.fixed_bytes + self.per_target_bytes * self.target_block

    def describe(self) -> str:
        where = self.device if len(self.devices) == 1 else f"{len(self.devices)} devices ({', '.join(self.devices)})"
        avail = "unknown" if self.available_bytes is None else fmt_bytes(self.available_bytes)
        how = "cfg.target_block" if self.forced else "automatic"
        return (f"memory plan: {self.n_features} features -> statistics {fmt_bytes(self.fixed_bytes)}, {self.dtype}; "
                f"{self.n_targets} targets in {self.n_blocks} block(s) of {self.target_block} ({how}, "
                f"{fmt_bytes(self.per_target_bytes)} per target); about {fmt_bytes(self.block_bytes)} on {where}, "
                f"{avail} available")


def cpu_available() -> int | None:
    """Bytes of RAM available to a new allocation (psutil, else /proc/meminfo), None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return kb_field("/proc/meminfo", "MemAvailable")


def device_available(device: str) -> int | None:
    """Free bytes on ``device`` ("cpu", "cuda", "cuda:N")."""
    if device == "cpu":
        return cpu_available()
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def estimate(*, n_features: int, n_train: int, n_val: int, batch_size: int, method: str,
             itemsize: int, binary: bool = False) -> tuple[int, int]:
    """``(fixed bytes per device, bytes per target)`` of the solver for one target block.
    ``binary``: 0/1 masks, read as bytes, whose products convert at most ``solvers.stats.FLOAT_BYTES``
    of a batch to floats (or, as int8 products, take a transposed copy of it)."""
    p = n_features
    batch = min(batch_size, n_train + n_val)
    if binary and method != "saga":  # the batch as read, a transposed copy, a float chunk (float64 refit)
        from datamodels_ml.solvers.stats import FLOAT_BYTES

        read = 2 * batch * p + min(batch * p * 8, FLOAT_BYTES)
    else:
        read = batch * p * (1 + itemsize)  # a batch of masks as read (bool) and as floats
    if method == "saga":
        fixed = read
        per_target = itemsize * (WEIGHT_COLUMNS * p + ROW_COLUMNS * (batch + n_val) + SAGA_TABLES * (n_train + n_val))
    else:
        fixed = int(GRAM_BYTES_PER_P2 * p * p) + read + VAL_MASK_COPIES * n_val * p
        per_target = itemsize * (WEIGHT_COLUMNS * p + ROW_COLUMNS * (batch + n_val))
    return fixed, per_target


def plan_memory(*, n_features: int, n_targets: int, n_train: int, n_val: int, batch_size: int, method: str,
                dtype: str, devices: list[str], target_block: int = 0,
                available: int | None = None, binary: bool = False) -> MemoryPlan:
    """Choose the target block (``target_block`` > 0 forces it) or raise ``UserError`` if none fits.

    ``available`` overrides the measured free memory per device (tests, what-if plans); ``binary``:
    0/1 masks (see :func:`estimate`).
    """
    itemsize = 8 if dtype == "float64" else 4
    fixed, per_target = estimate(n_features=n_features, n_train=n_train, n_val=n_val, batch_size=batch_size,
                                 method=method, itemsize=itemsize, binary=binary)
    if devices[0] == "cpu":  # the process lives in the same memory
        fixed += RUNTIME_BYTES
        if method != "saga" and heap.available():
            per_target += HEAP_COLUMNS * itemsize * n_features
    if available is None:
        known = [a for a in (device_available(d) for d in devices) if a is not None]
        available = min(known) if known else None
    if target_block > 0:
        block = min(target_block, n_targets)
    elif available is None:
        block = n_targets
    else:
        room = int(available * USABLE) - fixed
        if room < per_target:
            where = devices[0] if len(devices) == 1 else f"each of {', '.join(devices)}"
            raise UserError(
                f"not enough memory for one target block on {where}: about {fmt_bytes(fixed + per_target)} needed "
                f"({fmt_bytes(fixed)} of statistics for {n_features} features, {fmt_bytes(per_target)} per target), "
                f"{fmt_bytes(available)} available ({USABLE:.0%} of it usable); use a device with more memory (cfg.device=cuda:N), spread the "
                f"blocks over GPUs (gpus=N), use fewer features, or set cfg.target_block=N to skip this check")
        block = max(1, min(n_targets, room // per_target))
    n_blocks = -(-n_targets // block)
    return MemoryPlan(devices[0], tuple(devices), dtype, n_features, n_targets, fixed, per_target, available,
                      block, n_blocks, target_block > 0)


__all__ = ["MemoryPlan", "plan_memory", "estimate", "cpu_available", "device_available", "RUNTIME_BYTES"]

"""Target blocks: splitting the targets, keeping each finished block on disk, resuming, merging.

A regression solves its targets in blocks (``regression.memory`` sizes them). Each finished block is saved as
``out_dir/.blocks/<start>-<end>.pt`` (tensors only, loadable with ``torch.load(weights_only=True)``)
beside ``blocks.json``, the rerun key of the inputs (``output_dir.rerun_key``); each block also
holds that key's digest. A run that was killed resumes with the blocks already there,
provided the key is the same; blocks of a different config are never mixed in (refused, or
discarded with ``cfg.force=true``), and a block file that does not load as tensors, is not of these
inputs or has the wrong shapes (damaged, crafted) is named in a warning and fitted again. ``regress``
holds the output directory's lock while it uses the blocks, so two runs never share them. Blocks need not
have one size: a resumed run fills the gaps between saved blocks with blocks of its own size.
With several devices, one thread per device takes the next block from a shared queue.

Test hook: ``DATAMODELS_ML_KILL_AFTER_BLOCKS=N`` kills the process (SIGKILL) right after it has
saved its N-th block, as a crash or an out-of-memory kill would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from datamodels_ml.errors import UserError

BLOCKS_DIR = ".blocks"
MARK_FILE = "blocks.json"
MARK_KEY = "datamodels_ml_blocks"
DIGEST_KEY = "inputs_sha256"  # in each block: the digest of the inputs it was fitted with
KILL_AFTER_ENV = "DATAMODELS_ML_KILL_AFTER_BLOCKS"
_NAME = re.compile(r"^(\d+)-(\d+)\.pt$")
# keys of a block that hold one value per target (dim 0 for [T], dim 1 for [k, T] and [p, T])
PER_TARGET = {"weight": 1, "bias": 0, "lam": 0, "lam_path": 1, "best_index": 0, "val_mse": 1, "train_mse": 1,
              "nnz": 1, "val_var": 0, "phi": 0, "relax_val_mse": 1}
SHARED = ("mean", "std")  # the same in every block (statistics of the training rows)


class BlockStore:
    """The finished blocks of one regression in ``out_dir/.blocks``."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir) / BLOCKS_DIR
        self.digest: str | None = None  # of the inputs given to open

    def _mark(self) -> dict | None:
        try:
            doc = json.loads((self.dir / MARK_FILE).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get(MARK_KEY) == 1 else None

    def is_ours(self) -> bool:
        return self._mark() is not None

    def open(self, inputs: dict[str, Any], *, force: bool) -> list[tuple[int, int]]:
        """Start or resume: return the saved blocks of a run with the same ``inputs``.

        Blocks of other inputs raise a ``UserError`` naming ``cfg.force``, or are discarded with
        ``force`` (a run of other inputs that saved no block is simply replaced).
        """
        self.digest = _digest(inputs)
        mark = self._mark()
        if mark is not None and mark.get("inputs") != inputs:
            if not force and self.saved():
                raise UserError(f"{self.dir} holds target blocks of an unfinished regression with another config or "
                                "dataset: rerun that config to resume it, or use cfg.force=true to discard its blocks")
            self.clear()
            mark = None
        if self.dir.exists() and mark is None and any(self.dir.iterdir()):
            raise UserError(f"{self.dir} holds files that regress did not write; move them away")
        self.dir.mkdir(parents=True, exist_ok=True)
        if mark is None:
            from datamodels_ml.files import atomic_write_text

            atomic_write_text(self.dir / MARK_FILE, json.dumps({MARK_KEY: 1, "inputs": inputs}) + "\n")
        return self.saved()

    def saved(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every saved block, sorted."""
        if not self.dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted((int(m[1]), int(m[2])) for m in found if m and int(m[1]) < int(m[2]))

    def path(self, start: int, end: int) -> Path:
        return self.dir / f"{start}-{end}.pt"

    def save(self, start: int, end: int, block: dict[str, Any]) -> None:
        """Save a finished block with the digest of the inputs ``open`` was given; a failed write (a
        full disk) is a ``UserError``: the blocks saved before are kept for the rerun."""
        from datamodels_ml.files import torch_save

        final = self.path(start, end)
        tmp = self.dir / f".{final.stem}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            torch_save({**block, DIGEST_KEY: self.digest}, tmp)
            os.replace(tmp, final)
        except OSError as exc:
            raise UserError(f"cannot save the target block {final}: {exc.strerror or exc}; the blocks saved before "
                            "are kept: rerun the same command to resume from them") from None
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, start: int, end: int) -> dict[str, Any]:
        """A block this run saved (``usable`` checked the ones it resumes from), as tensors only."""
        import torch

        return torch.load(self.path(start, end), weights_only=True)

    def usable(self, start: int, end: int, n_features: int, n_lambdas: int) -> dict[tuple[int, int], dict[str, Any]]:
        """The saved blocks inside ``[start, end)`` that load as tensors only and hold what a block of
        these inputs holds (``n_features`` weights and ``n_lambdas`` λ per target); any other saved
        block (damaged, crafted, of other inputs) is named in a warning and fitted again."""
        found = {}
        for s, e in self.saved():
            if s < start or e > end:
                continue
            try:
                block = self.load(s, e)  # loads no code, whatever the file holds
                problem = _problem(block, e - s, n_features, n_lambdas, self.digest)
            except Exception as exc:  # noqa: BLE001 - any file torch cannot read is a block not saved
                problem = f"unreadable ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})"
            if problem:
                print(f"warning: {self.path(s, e)}: {problem}; fitting targets [{s}:{e}] again", file=sys.stderr)
            else:
                found[(s, e)] = block
        return found

    def clear(self) -> None:
        """Remove what we wrote here (our marker, our block files), then the directory if it is empty."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if _NAME.match(p.name) or p.name == MARK_FILE or re.match(r"^\.\d+-\d+\.tmp-", p.name):
                p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # something else is in there: leave it


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _problem(block: Any, targets: int, n_features: int, n_lambdas: int, digest: str) -> str | None:
    """What is wrong with a loaded block of ``targets`` targets (None: nothing)."""
    import torch

    if not isinstance(block, dict):
        return f"holds a {type(block).__name__}, not a block"
    if DIGEST_KEY not in block:
        return "has no record of the inputs it was fitted with"
    if block[DIGEST_KEY] != digest:
        return "was fitted with other inputs"
    shapes = {key: ((n_lambdas, targets) if dim else (targets,)) for key, dim in PER_TARGET.items()}
    shapes.update(weight=(n_features, targets), mean=(n_features,), std=(n_features,), active=(n_lambdas,),
                  epochs=(), seconds=())
    for key, shape in shapes.items():
        value = block.get(key)
        if not isinstance(value, torch.Tensor):
            return f"has no tensor '{key}'"
        if tuple(value.shape) != shape:
            return f"'{key}' has shape {list(value.shape)}, expected {list(shape)}"
    return None


def remaining(start: int, end: int, block: int, saved: list[tuple[int, int]]) -> tuple[list, list]:
    """``(reused, todo)``: saved blocks inside ``[start, end)`` that do not overlap, and the gaps as blocks."""
    reused: list[tuple[int, int]] = []
    at = start
    for s, e in sorted(saved):
        if s >= at and e <= end:
            reused.append((s, e))
            at = e
    todo: list[tuple[int, int]] = []
    at = start
    for s, e in reused + [(end, end)]:
        for b in range(at, s, block):
            todo.append((b, min(b + block, s)))
        at = e
    return reused, todo


def merge(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One block of the concatenated targets (``regression.target_blocks`` sorted by their first target)."""
    import torch

    sizes = [int(b["bias"].shape[0]) for b in blocks]
    out = {key: torch.cat([b[key] for b in blocks], dim=dim) for key, dim in PER_TARGET.items()
           if all(key in b for b in blocks)}  # phi/relax_val_mse: not in blocks saved before cfg.relax
    out.update({key: blocks[0][key] for key in SHARED})
    # fraction of targets still on the path at each λ index: weighted by the block sizes
    out["active"] = sum(b["active"].double() * n for b, n in zip(blocks, sizes)) / max(1, sum(sizes))
    out["epochs"] = sum(int(b["epochs"]) for b in blocks)
    out["seconds"] = sum(float(b["seconds"]) for b in blocks)
    return out


def run(todo: list[tuple[int, int]], devices: list[str], fit: Callable[[int, int, str], dict[str, Any]],
        done: Callable[[int, int, dict[str, Any]], None]) -> None:
    """Fit every block of ``todo``: ``fit(start, end, device)`` then ``done(start, end, block)``.

    One device: in this thread, in order. Several: one thread per device, each taking the next
    block; the first error stops the others after their current block and is raised here.
    """
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    count = [0]
    lock = threading.Lock()

    def finish(s: int, e: int, block: dict[str, Any]) -> None:
        with lock:
            done(s, e, block)
            count[0] += 1
            if kill_after and count[0] >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    if len(devices) == 1:
        for s, e in todo:
            finish(s, e, fit(s, e, devices[0]))
        return
    queue = list(reversed(todo))
    errors: list[BaseException] = []

    def worker(device: str) -> None:
        while True:
            with lock:
                if errors or not queue:
                    return
                s, e = queue.pop()
            try:
                finish(s, e, fit(s, e, device))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(d,), name=f"regress-{d}") for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


__all__ = ["BlockStore", "remaining", "merge", "run", "BLOCKS_DIR", "KILL_AFTER_ENV"]

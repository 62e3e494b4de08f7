"""Score matrices of any attribution method, read from the files other tools write.

A score matrix has one row per training example and one column per target (``[training examples,
targets]``): the prediction for a model trained on a subset is ``mask @ scores``, the sum of the
scores of the examples it saw (a datamodel's weights are such a matrix). Supported files:

* ``.npy`` (numpy), and ``.pt`` / ``.pth``: a torch tensor or a numpy array (dattri's attributors
  return a tensor ``[train, test]``), or a dict holding one (``key=``);
* ``.safetensors`` (kronfluence's ``pairwise_scores.safetensors``, key ``all_modules``, ``[query,
  train]``: give ``transpose=true``); read here without the safetensors package;
* TRAK: its ``save_dir`` (``metadata.json``, ``experiments.json``, ``scores/<experiment>.mmap``) or
  the ``.mmap`` itself: the finalized scores, checked against the shape TRAK records (``train set
  size`` x ``num_targets``), float16 or float32.

``transpose`` turns ``[targets, training examples]`` around; ``sign=-1`` flips scores of a loss (where
a positive score means the example *raises* the loss) into scores of the output.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

FORMATS = ("auto", "npy", "pt", "safetensors", "trak")


def _numpy_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must allow to rebuild a pickled numpy array (no code runs)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype] + [
        c for c in vars(np.dtypes).values() if inspect.isclass(c)]


def load_torch(path: str | os.PathLike, what: str) -> Any:
    """``torch.load`` of tensors, numbers, dicts, lists and numpy arrays only (kronfluence's and TRAK's
    examples save numpy arrays with ``torch.save``); anything else is refused without running it."""
    import torch

    from datamodels_ml.datamodel import load_tensors

    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return load_tensors(path, what=what)


def as_array(value: Any) -> np.ndarray:
    """A tensor (any dtype, bfloat16 included) or array as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _pick(tree: Any, key: str, path: Path) -> Any:
    """The array in a dict loaded from ``path``: ``key``, else ``all_modules`` (kronfluence), else the only one."""
    if not isinstance(tree, dict):
        return tree
    if key:
        if key not in tree:
            raise UserError(f"{path} has no key '{key}' (it has: {', '.join(map(str, tree))})")
        return tree[key]
    if "all_modules" in tree:
        return tree["all_modules"]
    arrays = [k for k, v in tree.items() if hasattr(v, "shape")]
    if len(arrays) != 1:
        raise UserError(f"{path} holds {len(arrays)} arrays ({', '.join(map(str, arrays))}): name one with key=NAME")
    return tree[arrays[0]]


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file (8-byte header length, JSON header, raw little-endian data)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{path}: cannot read as a safetensors file ({exc})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        chunk = raw[start:end]
        if info["dtype"] == "BF16":  # the upper half of a float32
            arr = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            arr = chunk.view(_SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise UserError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which is not read here")
        out[name] = arr.reshape(info["shape"])
    return out


def _trak_dir(path: Path) -> Path | None:
    """TRAK's save_dir for ``path`` (the directory, or a ``scores/*.mmap`` inside one), else None."""
    for cand in (path, path.parent.parent if path.suffix == ".mmap" else None):
        if cand is not None and (cand / "metadata.json").is_file() and (cand / "experiments.json").is_file():
            return cand
    return None


def read_trak(path: Path, experiment: str = "") -> np.ndarray:
    """TRAK's finalized scores ``[train set size, num_targets]`` as recorded in its save_dir."""
    save_dir = _trak_dir(path)
    if save_dir is None:
        raise UserError(f"{path} is not a TRAK save_dir (no metadata.json and experiments.json)")
    try:
        meta = json.loads((save_dir / "metadata.json").read_text())
        experiments = json.loads((save_dir / "experiments.json").read_text())
        n_train = int(meta["train set size"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{save_dir}: cannot read TRAK's metadata.json/experiments.json ({exc})") from None
    if path.suffix == ".mmap":
        experiment = experiment or path.stem
    if not experiment:
        done = [name for name, e in experiments.items() if e.get("scores_finalized")]
        if not done and len(experiments) == 1:  # the only one, refused below as not finalized
            done = list(experiments)
        if len(done) != 1:
            raise UserError(f"{save_dir} holds {len(done)} finalized TRAK experiments ({', '.join(done) or 'none'}): "
                            "name one with experiment=NAME")
        experiment = done[0]
    if experiment not in experiments:
        raise UserError(f"{save_dir} has no TRAK experiment '{experiment}' (it has: {', '.join(experiments) or 'none'})")
    exp = experiments[experiment]
    if not exp.get("scores_finalized"):
        raise UserError(f"TRAK experiment '{experiment}' in {save_dir} is not finalized (scores_finalized=0): "
                        "run traker.finalize_scores first")
    shape = (n_train, int(exp["num_targets"]))
    file = save_dir / "scores" / f"{experiment}.mmap"
    if not file.is_file():
        raise UserError(f"TRAK's scores file is missing: {file}")
    try:  # TRAK writes it with numpy's open_memmap: a .npy header
        arr = np.load(file, mmap_mode="r")
    except ValueError:  # a raw memmap: dtype from the size
        size = file.stat().st_size
        itemsize = size // max(1, shape[0] * shape[1])
        if itemsize not in (2, 4) or itemsize * shape[0] * shape[1] != size:
            raise UserError(f"{file}: {size} bytes is not TRAK's {shape[0]} x {shape[1]} scores in float16 or float32") from None
        arr = np.memmap(file, dtype=np.float16 if itemsize == 2 else np.float32, mode="r", shape=shape)
    if tuple(arr.shape) != shape:
        raise UserError(f"{file} has shape {list(arr.shape)} but TRAK records [{shape[0]}, {shape[1]}] "
                        "(train set size, num_targets) for it")
    return arr


def detect_format(path: Path) -> str:
    if _trak_dir(path) is not None:
        return "trak"
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in (".pt", ".pth"):
        return "pt"
    if suffix == ".safetensors":
        return "safetensors"
    raise UserError(f"cannot tell the format of {path} from its name: give scores_format="
                    f"{'|'.join(FORMATS[1:])}")


def read_scores(path: str | os.PathLike, *, fmt: str = "auto", key: str = "", experiment: str = "",
                transpose: bool = False, sign: float = 1.0) -> np.ndarray:
    """The score matrix in ``path`` as float64 ``[training examples, targets]`` (see the module docstring)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"scores_format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not path.exists():
        raise UserError(f"scores file not found: {path}")
    if sign not in (1.0, -1.0):
        raise UserError(f"sign must be 1 or -1, got {sign:g}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "trak":
        arr = read_trak(path, experiment)
    elif fmt == "npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read as a .npy file ({exc})") from None
        if isinstance(arr, np.lib.npyio.NpzFile):
            arr = _pick(dict(arr), key, path)
    elif fmt == "pt":
        arr = as_array(_pick(load_torch(path, "a score tensor"), key, path))
    else:
        arr = _pick(read_safetensors(path), key, path)
    arr = as_array(arr)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise UserError(f"{path} holds an array of shape {list(arr.shape)}: a score matrix is 2-D "
                        "[training examples, targets]")
    if not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path} holds {arr.dtype} values, not numbers")
    out = np.asarray(arr, dtype=np.float64)
    out = out.T if transpose else out
    if not np.isfinite(out).all():
        raise UserError(f"{path}: {int((~np.isfinite(out)).sum())} scores are NaN or inf")
    return sign * out


def check_shapes(scores: np.ndarray, masks_shape: tuple[int, ...], actual_shape: tuple[int, ...], *,
                 source: str, where: str, target_start: int = 0, all_targets: int = 0) -> np.ndarray:
    """The columns of ``scores`` for the held-out targets, or one line naming both shapes.

    ``scores`` may cover exactly the held-out targets, or all ``all_targets`` outputs of the store when
    the held-out targets are the slice starting at ``target_start``.
    """
    p, t = scores.shape
    n, p_masks = masks_shape
    t_actual = actual_shape[1]
    hint = " (transpose=true reads [targets, training examples])" if (t, p) == (p_masks, t_actual) else ""
    if p != p_masks:
        raise UserError(f"scores {source} have shape [{p}, {t}] ([training examples, targets]) but the masks of "
                        f"{where} have shape [{n}, {p_masks}] ([models, training examples]): the training examples "
                        f"differ{hint}")
    if t == t_actual:
        return scores
    if t == all_targets and target_start + t_actual <= t:
        return scores[:, target_start: target_start + t_actual]
    raise UserError(f"scores {source} have shape [{p}, {t}] ([training examples, targets]) but the outputs of "
                    f"{where} have shape [{n}, {t_actual}] ([models, targets]): the targets differ{hint}")


__all__ = ["FORMATS", "read_scores", "read_safetensors", "read_trak", "check_shapes", "load_torch", "as_array"]

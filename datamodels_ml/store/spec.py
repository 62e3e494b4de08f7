"""The spec: the JSON file that declares how many models there are and what each one records.

Format (the original library's): ``{"num_models": N, "schema": {key: {"shape": [...], "dtype": "float16"}}}``.
``parse_spec`` validates it and returns a ``Spec``; every error names the key and what was expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodels_ml.errors import UserError

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # whole key (fullmatch: '$' would let a final newline in)
_KEY_MAX = 200  # characters: '<key>.npy' and its temporary name stay within a file name's 255 bytes


@dataclass(frozen=True)
class Field:
    """One recorded array per model: its per-model shape and numpy dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Spec:
    """A validated spec: the number of models and the schema of what each model returns."""

    num_models: int
    schema: dict[str, Field]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_models": self.num_models,
            "schema": {k: {"shape": list(f.shape), "dtype": _dtype_name(f.dtype)} for k, f in self.schema.items()},
        }


def _dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    return "bool_" if name == "bool" else name


def _parse_dtype(key: str, value: Any) -> np.dtype:
    if not isinstance(value, str) or not value:
        raise UserError(f"spec key '{key}': dtype must be a numpy dtype name such as 'float32' or 'bool_', got {value!r}")
    attr = getattr(np, value, None)
    try:
        dtype = np.dtype(attr if isinstance(attr, type) else value)
    except TypeError:
        raise UserError(f"spec key '{key}': dtype '{value}' is not a numpy dtype name (e.g. 'float32', 'uint8', 'bool_')") from None
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise UserError(f"spec key '{key}': dtype '{value}' is not a fixed-size numeric or boolean dtype")
    return dtype


def _parse_shape(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise UserError(f"spec key '{key}': shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def check_key(key: Any) -> str:
    """A schema key becomes a file name ``<key>.npy``: it must be a safe identifier."""
    if not isinstance(key, str) or not key:
        raise UserError(f"spec key {key!r}: keys must be non-empty strings")
    if key.startswith("_"):
        raise UserError(f"spec key {key!r}: a leading underscore is reserved for internal arrays such as _completed")
    if ".." in key or not _KEY_RE.fullmatch(key):  # repr: a newline or control character shows, on one line
        raise UserError(f"spec key {key!r}: use letters, digits, '_', '-' and '.' only (no path separators, "
                        "no '..', no spaces or control characters)")
    if len(key) > _KEY_MAX:
        raise UserError(f"spec key '{key[:20]}...': {len(key)} characters, at most {_KEY_MAX} (it names a file)")
    return key


def parse_spec(data: Any, *, source: str = "spec") -> Spec:
    """Validate a spec given as a parsed JSON object."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with 'num_models' and 'schema'")
    unknown = sorted(set(data) - {"num_models", "schema"})
    if unknown:
        raise UserError(f"{source}: unknown top-level key '{unknown[0]}' (expected 'num_models' and 'schema')")
    if "num_models" not in data:
        raise UserError(f"{source}: missing 'num_models' (a positive integer)")
    n = data["num_models"]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise UserError(f"{source}: 'num_models' must be a positive integer, got {n!r}")
    schema = data.get("schema")
    if not isinstance(schema, dict) or not schema:
        raise UserError(f"{source}: 'schema' must be a non-empty object mapping keys to {{shape, dtype}}")
    fields: dict[str, Field] = {}
    for key, entry in schema.items():
        check_key(key)
        if not isinstance(entry, dict):
            raise UserError(f"spec key '{key}': expected an object with 'shape' and 'dtype'")
        extra = sorted(set(entry) - {"shape", "dtype"})
        if extra:
            raise UserError(f"spec key '{key}': unknown field '{extra[0]}' (expected 'shape' and 'dtype')")
        for needed in ("shape", "dtype"):
            if needed not in entry:
                raise UserError(f"spec key '{key}': missing '{needed}'")
        fields[key] = Field(shape=_parse_shape(key, entry["shape"]), dtype=_parse_dtype(key, entry["dtype"]))
    return Spec(num_models=n, schema=fields)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the spec file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "a spec is a JSON file in UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON for a spec (nested too deeply)") from None
    try:
        return parse_spec(data, source=str(path))
    except UserError as exc:  # name the file in every message
        msg = str(exc)
        raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None

"""Reading FFCV ``.beton`` files directly, without importing FFCV.

This module owns the byte layout of FFCV's file format (format version 2, as written by
``ffcv.writer.DatasetWriter``, which stays the writer): a header, one descriptor per field, one
metadata record per sample, the data pages, and the allocation table. The layout mirrors
``ffcv/types.py``, ``ffcv/reader.py`` and ``ffcv/fields/{basics,ndarray,bytes,json,rgb_image}.py``.

Why not FFCV's own ``Loader``: importing it compiles FFCV's JPEG decoder with numba (5 s or more)
although the regression reads only fixed-width fields (``mask``, ``targets``, ``idx``); and the
loader decodes whole rows, while a target block needs a few columns of ``targets``. Here a
fixed-width field (``NDArrayField``/``TorchTensorField``) of sample ``i`` is the contiguous run of
bytes at the file offset held in its metadata record, so columns ``[start:end)`` of row ``i`` are
read straight from a memory map; scalar fields (``IntField``/``FloatField``) live in the metadata.
The map's pages are released every 256 MB read (``mapped.PageRelease``), so that a regression
reading a 9 GB file once per target block does not carry it in its resident memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodels_ml.mapped import PageRelease

VERSION = 2  # ffcv.types.CURRENT_VERSION
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
NDARRAY_ARGS = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])
# FFCV's type ids and the metadata record each field type keeps per sample
_FLOAT, _INT, _RGB, _BYTES, _NDARRAY, _JSON, _TENSOR = range(7)
_BYTES_META = np.dtype([("ptr", "<u8"), ("size", "<u8")])
_METADATA = {
    _FLOAT: np.dtype("<f8"),
    _INT: np.dtype("<i8"),
    _RGB: np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]),
    _BYTES: _BYTES_META,
    _NDARRAY: np.dtype("<u8"),
    _JSON: _BYTES_META,
    _TENSOR: np.dtype("<u8"),
}
_TYPE_NAMES = {_FLOAT: "FloatField", _INT: "IntField", _RGB: "RGBImageField", _BYTES: "BytesField",
               _NDARRAY: "NDArrayField", _JSON: "JSONField", _TENSOR: "TorchTensorField"}


@dataclass(frozen=True)
class Field:
    """One field of a ``.beton``: its FFCV type and, for fixed-width arrays, dtype and shape."""

    name: str
    type_id: int
    dtype: np.dtype | None = None  # fixed-width array fields
    shape: tuple[int, ...] = ()

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.type_id]

    @property
    def is_array(self) -> bool:
        return self.type_id in (_NDARRAY, _TENSOR)

    @property
    def size(self) -> int:
        """Values per sample once flattened (1 for a scalar field)."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.is_array else 1


def _field(desc: np.void) -> Field:
    name = desc["name"].tobytes().decode("ascii", errors="replace").split("\x00")[0]
    type_id = int(desc["type_id"])
    if type_id not in _METADATA:
        raise ValueError(f"field '{name}' has unknown FFCV type id {type_id}")
    if type_id not in (_NDARRAY, _TENSOR):
        return Field(name, type_id)
    args = desc["arguments"]
    head = args[:NDARRAY_ARGS.itemsize].view(NDARRAY_ARGS)[0]
    length = int(head["type_length"])
    descr = json.loads(args[NDARRAY_ARGS.itemsize:NDARRAY_ARGS.itemsize + length].tobytes().decode("ascii"))
    dtype = np.dtype([tuple(x) for x in descr])["f0"]
    shape = [int(s) for s in head["shape"]]
    while shape and shape[-1] == 0:  # FFCV pads the shape with zeros up to 32 dimensions
        shape.pop()
    return Field(name, type_id, dtype, tuple(shape))


class BetonFile:
    """A read-only view of a ``.beton``: its fields, its scalar columns and row/column reads.

    ``ValueError`` when the file is not an FFCV file of the supported version (callers turn it into
    a user-facing message). The file is memory-mapped; reads copy into new arrays.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        if size < HEADER.itemsize:
            raise ValueError(f"{size} bytes is too short for an FFCV header")
        header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
        if int(header["version"]) != VERSION:
            raise ValueError(f"FFCV format version {int(header['version'])}, expected {VERSION}")
        self.num_rows = int(header["num_samples"])
        self.page_size = int(header["page_size"])
        num_fields = int(header["num_fields"])
        meta_start = HEADER.itemsize + num_fields * FIELD_DESC.itemsize
        descs = np.fromfile(self.path, dtype=FIELD_DESC, count=num_fields, offset=HEADER.itemsize)
        if len(descs) != num_fields:
            raise ValueError("the file ends inside its field descriptors")
        fields = [_field(d) for d in descs]
        self.fields = {f.name: f for f in fields}
        self._meta_type = np.dtype([("", _METADATA[f.type_id]) for f in fields], align=True)
        if meta_start + self.num_rows * self._meta_type.itemsize > size or int(header["alloc_table_ptr"]) > size:
            raise ValueError("the file is truncated (shorter than its header says)")
        self.metadata = np.fromfile(self.path, dtype=self._meta_type, count=self.num_rows, offset=meta_start)
        self._column = {f.name: f"f{i}" for i, f in enumerate(fields)}
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None
        self._buf = mapped.view(np.ndarray) if size else np.empty(0, np.uint8)
        self._pages = PageRelease(mapped)  # the pages read leave the resident set every 256 MB
        for f in fields:
            if f.is_array and self.num_rows:
                ptr = self.metadata[self._column[f.name]]
                end = int(ptr.max()) + f.size * f.dtype.itemsize
                if end > size:
                    raise ValueError(f"field '{f.name}' points past the end of the file")

    @property
    def field_names(self) -> list[str]:
        return list(self.fields)

    def scalar(self, name: str) -> np.ndarray:
        """A scalar field (``IntField`` int64, ``FloatField`` float64) for every row."""
        f = self.fields[name]
        if f.type_id not in (_INT, _FLOAT):
            raise ValueError(f"field '{name}' is a {f.type_name}, not a scalar field")
        return np.array(self.metadata[self._column[name]])

    def read(self, name: str, rows: Sequence[int] | np.ndarray, start: int = 0, end: int | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Columns ``[start:end)`` of the flattened array field ``name`` for ``rows``: ``[len(rows), end - start]``.

        Only those bytes are copied out of the file (one contiguous run per row).
        """
        f = self.fields[name]
        if not f.is_array:
            raise ValueError(f"field '{name}' is a {f.type_name}, not a fixed-width array field")
        end = f.size if end is None else end
        if not 0 <= start <= end <= f.size:
            raise ValueError(f"columns [{start}:{end}) are outside the {f.size} values of field '{name}'")
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((rows.size, end - start), dtype=f.dtype)
        if rows.size == 0 or end == start:
            return out
        width = (end - start) * f.dtype.itemsize
        dest = out.view(np.uint8).reshape(rows.size, width)
        offsets = self.metadata[self._column[name]][rows].astype(np.int64) + start * f.dtype.itemsize
        buf = self._buf
        steps = np.diff(offsets)
        if rows.size > 1 and (steps == steps[0]).all() and steps[0] >= width:
            # rows stored at a constant stride (consecutive samples of one page): one strided copy
            view = np.lib.stride_tricks.as_strided(buf[offsets[0]:], shape=(rows.size, width),
                                                   strides=(int(steps[0]), 1), writeable=False)
            dest[:] = view
        else:
            for j, o in enumerate(offsets.tolist()):
                dest[j] = buf[o:o + width]
        self._pages.read(rows.size * width)
        return out


__all__ = ["BetonFile", "Field", "VERSION"]

"""The direct .beton reader (``beton.BetonFile``) against FFCV's own writer and loader on real files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from datamodels_ml.dataset.beton import BetonFile
from datamodels_ml.dataset.reader import BetonBatches, beton_info
from datamodels_ml.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

MIN_PAGE = 1 << 21  # FFCV's smallest page: rows then span several pages, written by several workers


class _Rows:
    def __init__(self, x, y, score, blob):
        self.x, self.y, self.score, self.blob = x, y, score, blob

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.blob[i], self.x[i], self.score[i], self.y[i], 1000 + 3 * i


def _write(path, n, p, t, x_dtype, workers, seed=0):
    """A beton with our fields among foreign ones (bytes, float) that shift the metadata layout."""
    from ffcv.fields import BytesField, FloatField, IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    x = (rng.random((n, p)) < 0.5).astype(x_dtype)
    y = rng.normal(size=(n, t)).astype(np.float32)
    score = rng.normal(size=n)
    blob = [rng.integers(0, 255, size=int(rng.integers(1, 40)), dtype=np.uint8) for _ in range(n)]
    fields = {"blob": BytesField(), "mask": NDArrayField(dtype=np.dtype(x_dtype), shape=(p,)), "score": FloatField(),
              "targets": NDArrayField(dtype=np.dtype(np.float32), shape=(t,)), "idx": IntField()}
    DatasetWriter(str(path), fields, page_size=MIN_PAGE, num_workers=workers).from_indexed_dataset(
        _Rows(x, y, score, blob), chunksize=7)
    return x, y, score


def _ffcv_rows(path, indices):
    """Every row of ``indices`` through FFCV's Loader, in that (sorted) order."""
    from ffcv.fields.decoders import FloatDecoder, IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    pipelines = {"blob": None, "mask": [NDArrayDecoder(), ToTensor()], "score": [FloatDecoder(), ToTensor()],
                 "targets": [NDArrayDecoder(), ToTensor()], "idx": [IntDecoder(), ToTensor()]}
    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, indices=list(indices),
                    pipelines=pipelines, drop_last=False)
    parts = [[t.numpy().copy() for t in batch] for batch in loader]
    return [np.concatenate([b[i] for b in parts]) for i in range(4)]


@pytest.mark.parametrize("n, p, t, x_dtype, workers", [
    (1, 1, 1, np.bool_, 1),
    (13, 7, 3, np.uint8, 2),
    (700, 3001, 517, np.bool_, 2),  # ~3.5 MB: several 2 MB pages, interleaved by two writers
])
def test_reads_equal_ffcv_loader(tmp_path, n, p, t, x_dtype, workers):
    path = tmp_path / "data.beton"
    x, y, score = _write(path, n, p, t, x_dtype, workers)
    f = BetonFile(path)
    assert (f.num_rows, f.field_names) == (n, ["blob", "mask", "score", "targets", "idx"])
    assert (f.fields["mask"].dtype, f.fields["mask"].shape) == (np.dtype(x_dtype), (p,))
    rows = np.arange(n)
    mask, sc, targets, idx = _ffcv_rows(path, rows)
    np.testing.assert_array_equal(f.read("mask", rows), mask.reshape(n, p))
    np.testing.assert_array_equal(f.read("targets", rows), targets.reshape(n, t))
    np.testing.assert_array_equal(f.scalar("idx"), idx.reshape(-1))
    np.testing.assert_array_equal(f.scalar("score"), sc.reshape(-1))
    np.testing.assert_array_equal(f.read("mask", rows), x)  # and both equal what was written
    np.testing.assert_array_equal(f.read("targets", rows), y)

    rng = np.random.default_rng(1)
    subset = rng.permutation(n)[: max(1, n // 3)]
    for start, end in [(0, t), (t // 2, t), (t - 1, t), (0, 0), (min(2, t), min(5, t))]:
        np.testing.assert_array_equal(f.read("targets", subset, start, end), y[subset, start:end])


def test_batches_read_only_their_target_block(tmp_path):
    path = tmp_path / "data.beton"
    x, y, _ = _write(path, 50, 9, 11, np.bool_, 1)
    rows = np.array([40, 3, 17, 8, 29])
    for start, end in [(0, 11), (4, 7), (3, 3)]:
        source = BetonBatches(path, rows, batch_size=2, shuffle=True, seed=3, target_start=start, target_end=end)
        seen = []
        for xb, yb, rb in source:
            assert tuple(yb.shape) == (xb.shape[0], end - start)
            np.testing.assert_array_equal(xb.numpy(), x[rows[rb.numpy()]])
            np.testing.assert_array_equal(yb.numpy(), y[rows[rb.numpy()], start:end])
            seen += rb.tolist()
        assert sorted(seen) == list(range(rows.size))


@pytest.mark.parametrize("content, message", [
    (b"", "is not a readable FFCV file (0 bytes is too short for an FFCV header)"),
    (b"\x07\x00" + bytes(40), "is not a readable FFCV file (FFCV format version 7, expected 2)"),
])
def test_foreign_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.beton"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        beton_info(path)


def test_truncated_file_is_a_user_error(tmp_path):
    path = tmp_path / "data.beton"
    _write(path, 20, 5, 2, np.bool_, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-200_000] if len(data) > 300_000 else data[:3000])
    with pytest.raises(UserError, match="is not a readable FFCV file"):
        beton_info(path)


def test_reading_never_imports_ffcv(tmp_path):
    """The regression's read path costs no FFCV (or numba) import."""
    path = tmp_path / "data.beton"
    _write(path, 10, 4, 3, np.bool_, 1)
    code = ("import sys; from datamodels_ml.dataset.reader import BetonBatches, beton_info, read_beton; "
            f"info = beton_info({str(path)!r}); read_beton({str(path)!r}); "
            f"list(BetonBatches({str(path)!r}, batch_size=3)); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ffcv', 'numba')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident pages read from /proc")
def test_pages_read_leave_the_resident_set_and_reads_stay_right(tmp_path, monkeypatch):
    # a regression reads the whole .beton once per target block: the pages it touched must not pile
    # up in its resident memory (at 100k models x 50k features, 9 GB)
    from datamodels_ml import mapped

    if mapped.resident_file_bytes() is None:
        pytest.skip("no RssFile in /proc/self/status")
    x, y, _ = _write(tmp_path / "d.beton", 600, 40_000, 8, np.bool_, 1)  # 24 MB of masks
    for drop, most in ((1 << 40, None), (1 << 20, 8 << 10)):  # never released, then every MB
        monkeypatch.setattr(mapped, "EVERY", drop)
        f = BetonFile(tmp_path / "d.beton")
        before = mapped.resident_file_bytes() // 1024
        for s in range(0, 600, 50):
            rows = np.arange(s, s + 50)
            assert np.array_equal(f.read("mask", rows), x[rows])
        grown = mapped.resident_file_bytes() // 1024 - before
        if most is None:
            assert grown > 16 << 10  # the file's pages stay mapped: the measure sees them
        else:
            assert grown < most, f"{grown} kB of the file still resident"
        del f

"""compare: who is ahead at each compute; with the traker package installed (the [compare] extra, not in
CI), TRAK's real save_dir on the digits MLP is read back by ``scores.read_scores`` exactly."""

import numpy as np
import pytest

from datamodels_ml.compare import _wins
from datamodels_ml.evaluation.scores import read_scores


def _row(method, seconds, value, half=0.01):
    return {"method": method, "core_seconds": seconds, "lds": value, "lds_low": value - half,
            "lds_high": value + half}


def test_who_is_ahead_at_each_compute():
    rows = [_row("trak", 2, 0.30), _row("trak", 30, 0.40), _row("datamodels", 50, 0.58),
            _row("datamodels", 200, 0.42, half=0.05)]
    lines = _wins(rows)
    assert lines[0].endswith("trak 0.300 (the other has no point yet)")
    assert lines[2].endswith("datamodels 0.580 vs trak 0.400 -> datamodels ahead")
    assert lines[3].endswith("datamodels 0.420 vs trak 0.400 -> datamodels ahead (intervals overlap)")


def test_trak_save_dir_is_read_back_exactly(tmp_path):
    pytest.importorskip("trak")
    from datamodels_ml.compare import trak_scores

    [(k, seconds, scores)] = trak_scores([1], proj_dim=128, save_dir=tmp_path / "trak")
    assert k == 1 and seconds > 0 and scores.shape == (1000, 797)
    np.testing.assert_allclose(read_scores(tmp_path / "trak"), scores, rtol=1e-6)

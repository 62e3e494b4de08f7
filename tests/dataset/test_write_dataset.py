"""write_dataset and the FFCV reading side: real stores, real .beton files, the real CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import EXPERIMENT, run_cli, search_runs, tracking_client
from datamodels_ml.dataset.reader import BetonBatches, beton_info, read_beton, read_manifest
from datamodels_ml.dataset.write_dataset import indices_hash, write_beton
from datamodels_ml.errors import UserError
from datamodels_ml.store.spec import parse_spec
from datamodels_ml.store.store import create_store

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

N_MODELS = 12
P = 16
T = 5
INCOMPLETE = (3, 7)  # never written
NAN_ROW = 5  # its targets hold a NaN: left out
INF_ROW = 9  # its targets hold an inf: left out

SPEC = {
    "num_models": N_MODELS,
    "schema": {
        "masks": {"shape": [P], "dtype": "bool_"},
        "counts": {"shape": [P], "dtype": "uint8"},  # 0/1 masks in another dtype
        "weights": {"shape": [P], "dtype": "float32"},  # not 0/1: rejected as x
        "margins": {"shape": [T], "dtype": "float16"},
        "grid": {"shape": [2, 3], "dtype": "float32"},  # 2-D per model: flattened
        "acc": {"shape": [], "dtype": "float32"},
    },
}


def _make_store(path, rng_seed=0):
    store = create_store(path, parse_spec(SPEC))
    rng = np.random.default_rng(rng_seed)
    rows = {}
    for i in range(N_MODELS):
        if i in INCOMPLETE:
            continue
        mask = rng.random(P) < 0.5
        margins = rng.normal(size=T).astype(np.float16)
        if i == NAN_ROW:
            margins[2] = np.nan
        if i == INF_ROW:
            margins[0] = np.inf
        row = {"masks": mask, "counts": mask.astype(np.uint8), "weights": rng.random(P).astype(np.float32),
               "margins": margins, "grid": rng.normal(size=(2, 3)).astype(np.float32),
               "acc": np.float32(rng.random())}
        store.write_row(i, row)
        rows[i] = row
    return store, rows


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    return _make_store(path)


def _expected_indices():
    return [i for i in range(N_MODELS) if i not in INCOMPLETE and i not in (NAN_ROW, INF_ROW)]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("x_name, x_dtype", [("masks", np.bool_), ("counts", np.uint8)])
def test_written_beton_equals_completed_finite_rows(small_store, tmp_path, capsys, x_name, x_dtype):
    store, rows = small_store
    out = tmp_path / "sub" / "reg.beton"
    manifest = write_beton(store.path, out, x_name=x_name, y_name="margins", progress=False)
    assert "left out 2 of 10 completed models whose 'margins' holds NaN or inf" in capsys.readouterr().err

    x, y, idx = read_beton(out)
    expected = _expected_indices()
    assert idx.tolist() == expected  # incomplete and non-finite rows are skipped, order kept
    assert x.dtype == x_dtype and x.shape == (len(expected), P)
    assert y.dtype == np.float32 and y.shape == (len(expected), T)
    np.testing.assert_array_equal(x, np.stack([rows[i][x_name] for i in expected]))
    np.testing.assert_array_equal(y, np.stack([rows[i]["margins"].astype(np.float32) for i in expected]))

    info = beton_info(out)
    assert (info.num_rows, info.n_features, info.n_targets) == (len(expected), P, T)
    assert read_manifest(out) == manifest
    assert manifest["indices"] == expected and manifest["dropped"] == [NAN_ROW, INF_ROW]
    assert manifest["indices_hash"] == indices_hash(expected)
    assert (manifest["store"], manifest["x_name"], manifest["num_rows"]) == (str(store.path.resolve()), x_name, 8)


@pytest.mark.parametrize("y_name, n_targets", [("grid", 6), ("acc", 1)])
def test_y_not_one_dimensional_is_flattened(small_store, tmp_path, capsys, y_name, n_targets):
    store, rows = small_store
    out = tmp_path / "reg.beton"
    write_beton(store.path, out, y_name=y_name, progress=False)
    err = capsys.readouterr().err
    shape = list(np.shape(rows[0][y_name]))
    assert f"note: y '{y_name}' has per-model shape {shape}; flattened to [{n_targets}]" in err
    x, y, idx = read_beton(out)
    done = [i for i in range(N_MODELS) if i not in INCOMPLETE]  # every row's targets are finite
    assert idx.tolist() == done
    np.testing.assert_array_equal(y, np.stack([np.reshape(rows[i][y_name], -1) for i in done]))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 50])
def test_batches_cover_subset_once_per_epoch(small_store, tmp_path, shuffle, batch_size):
    store, rows = small_store
    out = tmp_path / "reg.beton"
    write_beton(store.path, out, progress=False)
    subset = np.array([6, 0, 2, 4])  # beton rows (positions), not store indices
    source = BetonBatches(out, subset, batch_size=batch_size, num_workers=1, shuffle=shuffle, seed=1,
                          target_start=1, target_end=4)
    assert (source.n_rows, source.n_features, source.n_targets) == (4, P, 3)
    store_idx = np.array(_expected_indices())[subset]
    assert source.store_indices.tolist() == store_idx.tolist()
    orders = []
    for _ in range(3):
        seen = []
        for xb, yb, rb in source:
            assert xb.shape[0] == yb.shape[0] == rb.shape[0] <= batch_size
            for xr, yr, r in zip(xb.numpy(), yb.numpy(), rb.numpy()):
                model = rows[int(store_idx[r])]
                np.testing.assert_array_equal(xr, model["masks"])
                np.testing.assert_array_equal(yr, model["margins"].astype(np.float32)[1:4])
                seen.append(int(r))
        assert sorted(seen) == [0, 1, 2, 3]
        orders.append(seen)
    if not shuffle:
        assert orders[0] == orders[1] == orders[2]
    elif batch_size == 1:
        assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def _fresh_store(tmp_path):
    return create_store(tmp_path / "empty_store", parse_spec(SPEC))


def _mismatched_store(tmp_path):
    store, _ = _make_store(tmp_path / "bad_store")
    bad = np.lib.format.open_memmap(store.path / "margins.npy", mode="w+", dtype=np.float16, shape=(N_MODELS - 2, T))
    del bad
    return store


# name -> (store factory, overrides, expected message with {store})
BAD_INPUTS = {
    "no completed model": (_fresh_store, {}, "no completed model in the store at {store}: train some models first"),
    "unknown x": (None, {"x_name": "mask"},
                  "key 'mask' is not in the store at {store} (keys: masks, counts, weights, margins, grid, acc)"),
    "unknown y": (None, {"y_name": "logits"},
                  "key 'logits' is not in the store at {store} (keys: masks, counts, weights, margins, grid, acc)"),
    "x not 0/1": (None, {"x_name": "weights"},
                  "x 'weights' must be boolean or hold only 0 and 1 (training-set masks), but model 0 holds "),
    "mismatched rows": (_mismatched_store, {},
                        "{store}/margins.npy: shape (10, 5) does not match the spec's (12, 5)"),
}


def _store_for(case, small_store, tmp_path):
    factory = BAD_INPUTS[case][0]
    return small_store[0] if factory is None else factory(tmp_path)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_and_keep_existing_out(small_store, tmp_path, case):
    store = _store_for(case, small_store, tmp_path)
    _, overrides, message = BAD_INPUTS[case]
    out = tmp_path / "reg.beton"
    out.write_bytes(b"an older dataset")
    with pytest.raises(UserError, match="^" + __import__("re").escape(message.format(store=store.path))):
        write_beton(store.path, out, force=True, progress=False, **overrides)
    assert out.read_bytes() == b"an older dataset"
    assert not read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


@pytest.mark.parametrize("case", list(BAD_INPUTS) + ["existing out"])
def test_bad_inputs_on_the_command_line(small_store, tmp_path, case):
    if case == "existing out":
        store, overrides, force = small_store[0], {}, "false"
        message = "{out} already exists; use force=true to overwrite it"
    else:
        store = _store_for(case, small_store, tmp_path)
        _, overrides, message = BAD_INPUTS[case]
        force = "true"  # even with force, a refused command keeps the old file
    out = tmp_path / "reg.beton"
    out.write_bytes(b"an older dataset")
    args = [f"store={store.path}", f"out={out}", f"force={force}"] + [f"{k}={v}" for k, v in overrides.items()]
    proc = run_cli("write_dataset", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: " + message.format(store=store.path, out=out))
    assert out.read_bytes() == b"an older dataset"


def test_write_dataset_cli_end_to_end(small_store, tmp_path):
    """The command: the file, its manifest, the MLflow run; a second run needs force=true."""
    store, rows = small_store
    out = tmp_path / "data" / "reg.beton"
    proc = run_cli("write_dataset", f"store={store.path}", f"out={out}", "progress=false", cwd=tmp_path, check=True)
    assert f"wrote 8 models to {out}" in proc.stdout
    assert "warning: left out 2 of 10 completed models" in proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr  # progress=false silences FFCV's bar too
    x, y, idx = read_beton(out)
    assert idx.tolist() == _expected_indices()
    np.testing.assert_array_equal(x, np.stack([rows[i]["masks"] for i in _expected_indices()]))
    manifest = json.loads((tmp_path / "data" / "reg.beton.json").read_text())
    assert manifest["num_rows"] == 8 and manifest["y_name"] == "margins"

    [run] = search_runs(tmp_path, training=False)
    assert run.info.run_name == "write_dataset-8" and run.info.status == "FINISHED"
    assert tracking_client(tmp_path).get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert (run.data.tags["datamodels.stage"], run.data.tags["rows"]) == ("write_dataset", "8")
    assert run.data.metrics == {"rows_written": 8.0, "rows_dropped": 2.0}
    assert run.data.params["x_name"] == "masks" and run.data.params["store"] == str(store.path)

    before = _digest(out)  # the same store again: kept as it is, no new run
    proc = run_cli("write_dataset", f"store={store.path}", f"out={out}", "progress=false", cwd=tmp_path, check=True)
    assert proc.stdout.strip() == (f"{out} already holds the completed models of {store.path} (8 rows) with these "
                                   "keys: kept, nothing written (force=true writes it again)")
    assert _digest(out) == before and len(search_runs(tmp_path, training=False)) == 1
    proc = run_cli("write_dataset", f"store={store.path}", f"out={out}", "y_name=acc", "progress=false",
                   cwd=tmp_path, check=False)  # other keys: refused, kept
    assert proc.returncode == 2 and _digest(out) == before


def test_an_existing_manifest_needs_force(small_store, tmp_path):
    """``out + ".json"`` is the manifest's name: a file there is kept unless force=true, as ``out`` is."""
    store = small_store[0]
    out = tmp_path / "reg.beton"
    manifest = tmp_path / "reg.beton.json"
    manifest.write_text("the user's own notes\n")
    message = (f"error: {manifest} (the manifest write_dataset writes beside reg.beton) already exists; "
               "use force=true to overwrite it")
    proc = run_cli("write_dataset", f"store={store.path}", f"out={out}", "progress=false", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == message, proc.stderr
    assert manifest.read_text() == "the user's own notes\n" and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".reg.beton")]
    write_beton(store.path, out, force=True, progress=False)
    assert read_manifest(out)["num_rows"] == len(_expected_indices())


# -- the original write_dataset's options: completed_name, ignore_completed, y_slice, --cfg.* -------------
def _stored(store, key):
    return np.load(store.path / f"{key}.npy")


@pytest.mark.parametrize("options, indices, y_of", [
    ({}, [0, 1, 2, 4, 6, 8, 10, 11], lambda g, m: m),
    # a per-model flag array of the store: its nonzero rows, completed or not (3 is not; 5 holds a NaN)
    ({"completed_name": "_chosen"}, [0, 3, 8], lambda g, m: m),
    # every row, completed or not; non-finite targets are still left out
    ({"ignore_completed": True}, [0, 1, 2, 3, 4, 6, 7, 8, 10, 11], lambda g, m: m),
    ({"ignore_completed": True, "completed_name": "_chosen"}, [0, 1, 2, 3, 4, 6, 7, 8, 10, 11], lambda g, m: m),
    # one index of y's first per-model axis: grid [2, 3] -> grid[:, 1] [3]; margins [5] -> margins[:, 4] [1]
    ({"y_name": "grid", "y_slice": 1}, [0, 1, 2, 4, 5, 6, 8, 9, 10, 11], lambda g, m: g[:, 1]),
    # the NaN/inf check looks at the kept targets only: rows 5 and 9 are finite in margins[:, 4]
    ({"y_slice": 4}, [0, 1, 2, 4, 5, 6, 8, 9, 10, 11], lambda g, m: m[:, 4:5]),
])
def test_row_and_target_selection(tmp_path, options, indices, y_of):
    store, _ = _make_store(tmp_path / "store")
    chosen = np.zeros(N_MODELS, dtype=np.uint8)
    chosen[[0, 3, 5, 8]] = 1
    np.save(store.path / "_chosen.npy", chosen)
    out = tmp_path / "reg.beton"
    manifest = write_beton(store.path, out, progress=False, **options)
    x, y, idx = read_beton(out)
    assert idx.tolist() == indices == manifest["indices"]
    np.testing.assert_array_equal(x, _stored(store, "masks")[indices])
    expected = y_of(_stored(store, "grid"), _stored(store, "margins")).astype(np.float32)[indices]
    np.testing.assert_array_equal(y, expected.reshape(len(indices), -1))
    for key, default in (("completed_name", "_completed"), ("ignore_completed", False), ("y_slice", -1)):
        assert manifest[key] == options.get(key, default)
    assert manifest["num_completed"] == N_MODELS - len(INCOMPLETE)


@pytest.mark.parametrize("options, message", [
    ({"y_slice": 5}, "y_slice=5 is outside y 'margins' (per-model shape [5]: give 0..4, or -1 for all of it)"),
    ({"y_slice": -2}, "y_slice=-2 is outside y 'margins' (per-model shape [5]: give 0..4, or -1 for all of it)"),
    ({"y_name": "grid", "y_slice": 2}, "y_slice=2 is outside y 'grid' (per-model shape [2, 3]: give 0..1"),
    ({"y_name": "acc", "y_slice": 0}, "y_slice=0: y 'acc' holds one value per model, there is nothing to slice"),
    ({"completed_name": "_nope"}, "completed_name '_nope': no file {store}/_nope.npy (give the name of a "
                                  "per-model array of the store, without .npy)"),
    ({"completed_name": "../store/_completed"}, "completed_name '../store/_completed': no file"),
    ({"completed_name": "grid"}, "completed_name 'grid': {store}/grid.npy must hold one boolean or 0/1 flag per "
                                 "model (shape [12]), found shape [12, 2, 3] float32"),
    ({"completed_name": "_none"}, "completed_name '_none': no model is flagged in {store}/_none.npy"),
    # an array of Python objects is refused from its header: nothing in it is unpickled
    ({"completed_name": "_objects"}, "completed_name '_objects': {store}/_objects.npy must hold one boolean or 0/1 "
                                     "flag per model (shape [12]), found shape [12] object"),
])
def test_selection_errors(small_store, tmp_path, options, message):
    store = small_store[0]
    np.save(store.path / "_none.npy", np.zeros(N_MODELS, dtype=bool))
    np.save(store.path / "_objects.npy", np.array([True] * N_MODELS, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="^" + __import__("re").escape(message.format(store=store.path))):
        write_beton(store.path, tmp_path / "reg.beton", progress=False, **options)
    assert not (tmp_path / "reg.beton").exists()


def test_write_dataset_with_the_original_spelling(tmp_path):
    store, _ = _make_store(tmp_path / "store")
    out = tmp_path / "orig.beton"
    proc = run_cli("write_dataset", f"--cfg.data_dir={store.path}", "--cfg.out_path", str(out), "--cfg.x_name=counts",
                   "--cfg.y_name=grid", "--cfg.y_slice=0", "--cfg.ignore_completed", "--cfg.completed_name=_completed",
                   "progress=false", cwd=tmp_path, check=True)
    assert f"wrote {N_MODELS} models to {out}" in proc.stdout
    x, y, idx = read_beton(out)
    assert idx.tolist() == list(range(N_MODELS))
    np.testing.assert_array_equal(x, _stored(store, "counts"))
    np.testing.assert_array_equal(y, _stored(store, "grid")[:, 0])
    [run] = search_runs(tmp_path, training=False)
    assert (run.data.params["store"], run.data.params["y_slice"], run.data.params["ignore_completed"]) == \
        (str(store.path), "0", "True")


@pytest.mark.parametrize("args, message", [
    (["store=S", "--cfg.data_dir=S", "out=o.beton"], "error: 'store' and 'cfg.data_dir' name the same setting: "
                                                     "give one of them"),
    (["--cfg.data_dir=S", "--cfg.out_path=o.beton", "--cfg.num_workers=2"],
     "error: unknown config key 'cfg.num_workers' (the original's spellings accepted here: cfg.data_dir, "
     "cfg.out_path, cfg.x_name, cfg.y_name, cfg.completed_name, cfg.ignore_completed, cfg.y_slice)"),
    (["--cfg.out_path=o.beton"], "error: missing required config key 'store'"),
])
def test_original_spelling_errors(tmp_path, args, message):
    proc = run_cli("write_dataset", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message

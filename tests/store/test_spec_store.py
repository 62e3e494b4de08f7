"""Spec validation, store creation and crash-safe row writes (in-process, real files)."""

import json

import numpy as np
import pytest

from datamodels_ml.errors import UserError
from datamodels_ml.store.spec import load_spec, parse_spec
from datamodels_ml.store.store import RowError, Store, compress_ranges, create_store, status_report

GOOD = {"num_models": 5, "schema": {"masks": {"shape": [4], "dtype": "bool_"},
                                    "margins": {"shape": [3], "dtype": "float16"},
                                    "acc": {"shape": [], "dtype": "float32"}}}


def spec_with(**changes):
    data = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return data


def test_good_spec_roundtrip():
    spec = parse_spec(GOOD)
    assert spec.num_models == 5
    assert spec.schema["masks"].dtype == np.dtype(bool) and spec.schema["masks"].shape == (4,)
    assert spec.schema["acc"].shape == ()
    assert spec.to_json() == GOOD


@pytest.mark.parametrize("data, message", [
    (spec_with(num_models=0), r"'num_models' must be a positive integer, got 0"),
    (spec_with(num_models=2.5), r"'num_models' must be a positive integer, got 2.5"),
    (spec_with(num_models=True), r"'num_models' must be a positive integer, got True"),
    (spec_with(num_models=KeyError), r"missing 'num_models'"),
    (spec_with(schema={}), r"'schema' must be a non-empty object"),
    (spec_with(extra=1), r"unknown top-level key 'extra'"),
    ({"num_models": 2, "schema": {"../evil": {"shape": [1], "dtype": "uint8"}}}, r"spec key '\.\./evil': use letters"),
    ({"num_models": 2, "schema": {"a/b": {"shape": [1], "dtype": "uint8"}}}, r"spec key 'a/b': use letters"),
    ({"num_models": 2, "schema": {"a..b": {"shape": [1], "dtype": "uint8"}}}, r"spec key 'a\.\.b': use letters"),
    ({"num_models": 2, "schema": {"_completed": {"shape": [1], "dtype": "uint8"}}}, r"leading underscore is reserved"),
    ({"num_models": 2, "schema": {"abc\n": {"shape": [1], "dtype": "uint8"}}}, r"spec key 'abc\\n': use letters"),
    ({"num_models": 2, "schema": {"a b": {"shape": [1], "dtype": "uint8"}}}, r"spec key 'a b': use letters"),
    ({"num_models": 2, "schema": {"x" * 201: {"shape": [1], "dtype": "uint8"}}}, r"201 characters, at most 200"),
    (spec_with(schema__masks__dtype="floaty"), r"spec key 'masks': dtype 'floaty' is not a numpy dtype name"),
    (spec_with(schema__masks__dtype="object"), r"spec key 'masks': dtype 'object' is not a fixed-size numeric"),
    (spec_with(schema__masks__shape=[-1]), r"spec key 'masks': shape must be a list of non-negative integers, got \[-1\]"),
    (spec_with(schema__masks__shape="4"), r"spec key 'masks': shape must be a list of non-negative integers, got '4'"),
    (spec_with(schema__masks__shape=KeyError), r"spec key 'masks': missing 'shape'"),
    (spec_with(schema__masks__units="cm"), r"spec key 'masks': unknown field 'units'"),
])
def test_bad_specs_name_the_key(data, message):
    with pytest.raises(UserError, match=message):
        parse_spec(data)


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"spec file not found: .*nope\.json"):
        load_spec(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON"):
        load_spec(bad)
    bad.write_bytes(b'{"num_models": 2, "schema": {"m\xe9": {"shape": [1], "dtype": "uint8"}}}')  # Latin-1
    with pytest.raises(UserError, match=r"bad\.json: not UTF-8 text \(byte 0xe9 at offset 31\)"):
        load_spec(bad)
    bad.write_text("[" * 100000)
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON for a spec \(nested too deeply\)"):
        load_spec(bad)


@pytest.mark.parametrize("dtype", ["bool_", "uint8", "float16", "float32", "int64"])
def test_create_store_layout(tmp_path, dtype):
    spec = parse_spec({"num_models": 3, "schema": {"x": {"shape": [2, 2], "dtype": dtype}}})
    store = create_store(tmp_path / "s", spec)
    arr = np.load(tmp_path / "s" / "x.npy")
    assert arr.shape == (3, 2, 2) and arr.dtype == spec.schema["x"].dtype
    assert np.load(tmp_path / "s" / "_completed.npy").tolist() == [False] * 3
    assert json.loads((tmp_path / "s" / "spec.json").read_text()) == spec.to_json()
    assert store.missing_indices().tolist() == [0, 1, 2]


def test_create_is_noop_with_same_spec_and_refuses_another(tmp_path):
    spec = parse_spec(GOOD)
    store = create_store(tmp_path, spec)
    store.write_row(1, {"masks": np.ones(4, bool), "margins": np.arange(3), "acc": 0.5})
    create_store(tmp_path, parse_spec(GOOD))  # no-op: the row survives
    assert Store(tmp_path).completed.tolist() == [False, True, False, False, False]
    other = parse_spec(spec_with(num_models=6))
    with pytest.raises(UserError, match=r"different spec already exists .*num_models 5 there, 6 requested.*force=true"):
        create_store(tmp_path, other)
    assert Store(tmp_path).completed[1]
    (tmp_path / "notes.txt").write_text("mine")
    create_store(tmp_path, other, force=True)
    assert Store(tmp_path).num_models == 6 and not Store(tmp_path).completed.any()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # force replaces only the store's files


def test_write_row_roundtrip_and_casts(tmp_path):
    store = create_store(tmp_path, parse_spec(GOOD))
    store.write_row(3, {"masks": [1, 0, 1, 1], "margins": [1.5, 2.0, 3.0], "acc": 0.25})
    fresh = Store(tmp_path, writable=False)
    assert fresh.array("masks")[3].tolist() == [True, False, True, True]
    assert fresh.array("margins")[3].tolist() == [1.5, 2, 3]
    assert fresh.array("acc")[3] == 0.25
    assert fresh.completed_indices().tolist() == [3]


@pytest.mark.parametrize("outputs, message", [
    ({"masks": np.ones(4, bool), "margins": np.zeros(3)}, r"missing key 'acc'"),
    ({"masks": np.ones(4, bool), "margins": np.zeros(3), "acc": 1.0, "extra": 1}, r"returned key 'extra', which is not in the spec"),
    ({"masks": np.ones(5, bool), "margins": np.zeros(3), "acc": 1.0}, r"key 'masks': shape \[5\] does not match the spec's \[4\]"),
    ({"masks": np.ones(4, bool), "margins": np.array([1.0, 1e6, 0.0]), "acc": 1.0}, r"key 'margins': dtype float64 cannot be stored as float16 without loss"),
    ({"masks": np.ones(4, bool), "margins": np.zeros(3), "acc": np.int64(2**40 + 1)}, r"key 'acc': dtype int64 cannot be stored as float32 without loss"),
    ({"masks": np.full(4, 2), "margins": np.zeros(3, np.float16), "acc": 1.0}, r"key 'masks': dtype int64 cannot be stored as bool"),
    ([1, 2], r"main must return a dict"),
])
def test_bad_rows_write_nothing(tmp_path, outputs, message):
    store = create_store(tmp_path, parse_spec(GOOD))
    with pytest.raises(RowError, match=message):
        store.write_row(0, outputs)
    fresh = Store(tmp_path)
    assert not fresh.completed.any()
    assert not fresh.array("masks").any() and not fresh.array("margins").any()


def test_index_out_of_range(tmp_path):
    store = create_store(tmp_path, parse_spec(GOOD))
    with pytest.raises(UserError, match=r"index 5 out of range: the store holds models 0\.\.4"):
        store.write_row(5, {})


def test_status_report_and_ranges(tmp_path):
    assert compress_ranges(np.array([0, 1, 2, 5, 7, 8])) == "0-2, 5, 7-8"
    store = create_store(tmp_path, parse_spec(GOOD))
    for i in (0, 1):
        store.write_row(i, {"masks": np.ones(4, bool), "margins": np.zeros(3, np.float16), "acc": 1.0})
    store.write_failures({4: "Traceback...\nValueError: boom"})
    report = status_report(Store(tmp_path))
    assert "completed: 2/5" in report and "missing (3): 2-4" in report
    assert "4: ValueError: boom" in report

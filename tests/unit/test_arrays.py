"""Deterministic array files: the same arrays give the same bytes (the car's and the operator's alike), nothing is
pickled, nothing is left half-written."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fleetlet_car.runtime import results as car_results

from fleetlet.arrays import NPY_NAME, arrays_bytes, load_arrays, results_match, sha256_file, write_arrays


def sample_outputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "logits": rng.standard_normal((5, 3)).astype(np.float32),
        "label": np.arange(5, dtype=np.int64),
        "ok": np.array([True, False, True, True, False]),
    }


@pytest.mark.parametrize("name", ["result.npy", "result.npz"])
def test_write_arrays_writes_the_same_bytes_as_the_cars_writer(tmp_path: Path, name: str) -> None:
    arrays = sample_outputs()
    if name.endswith(".npy"):
        arrays = {"logits": arrays["logits"]}
    (tmp_path / "car").mkdir()
    (tmp_path / "shared").mkdir()
    car = car_results.write_arrays(tmp_path / "car" / name, arrays)
    ours = write_arrays(tmp_path / "shared" / name, arrays)
    assert ours.read_bytes() == car.read_bytes()


@pytest.mark.parametrize("single", [True, False])
def test_arrays_bytes_equals_what_the_cars_write_arrays_writes(tmp_path: Path, single: bool) -> None:
    arrays = {"logits": sample_outputs()["logits"]} if single else sample_outputs()
    path = car_results.write_arrays(tmp_path / ("r.npy" if single else "r.npz"), arrays)
    assert arrays_bytes(arrays, single=single) == path.read_bytes()


def test_equal_arrays_give_equal_bytes_whatever_their_memory_layout() -> None:
    c = np.arange(24, dtype=np.float64).reshape(6, 4)
    fortran = np.asfortranarray(c)
    strided = np.concatenate([c, c], axis=1)[:, ::2]  # a non-contiguous view
    assert not strided.flags.c_contiguous and not fortran.flags.c_contiguous
    assert arrays_bytes({"x": fortran}, single=True) == arrays_bytes({"x": c}, single=True)
    assert arrays_bytes({"x": fortran}, single=False) == arrays_bytes({"x": c}, single=False)
    assert arrays_bytes({"x": strided}, single=False) == arrays_bytes(
        {"x": np.ascontiguousarray(strided)}, single=False
    )


def test_npz_entries_keep_the_given_order_with_fixed_timestamps_and_permissions(tmp_path: Path) -> None:
    arrays = {"z": np.zeros(2), "a": np.ones(2), "m": np.arange(2)}
    path = write_arrays(tmp_path / "r.npz", arrays)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["z.npy", "a.npy", "m.npy"]
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert {i.external_attr >> 16 for i in infos} == {0o644}
    assert list(load_arrays(path)) == ["z", "a", "m"]


def test_load_arrays_round_trips_npy_under_the_name_output_and_npz_by_name(tmp_path: Path) -> None:
    arrays = sample_outputs()
    single = write_arrays(tmp_path / "r.npy", {"whatever": arrays["label"]})
    loaded = load_arrays(single)
    assert list(loaded) == [NPY_NAME] == ["output"]
    np.testing.assert_array_equal(loaded["output"], arrays["label"])
    several = load_arrays(write_arrays(tmp_path / "r.npz", arrays))
    assert list(several) == list(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(several[k], v)
        assert several[k].dtype == v.dtype


def test_a_npy_holds_exactly_one_array(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one array"):
        write_arrays(tmp_path / "r.npy", sample_outputs())
    with pytest.raises(ValueError, match="exactly one array"):
        arrays_bytes({}, single=True)


def test_object_arrays_are_refused_and_leave_no_file_behind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_pickle"):
        write_arrays(tmp_path / "r.npz", {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        arrays_bytes({"x": np.array([None], dtype=object)}, single=True)
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "r.npy"
    write_arrays(path, {"x": np.zeros(3)})
    write_arrays(path, {"x": np.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["r.npy"]
    np.testing.assert_array_equal(load_arrays(path)["output"], np.ones(3))


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = write_arrays(tmp_path / "r.npz", sample_outputs())
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_results_match_compares_integers_exactly_and_floats_within_tolerance() -> None:
    a = sample_outputs()
    near = dict(a, logits=a["logits"] + np.float32(1e-7))
    assert results_match(a, near)
    assert not results_match(a, dict(a, logits=a["logits"] + np.float32(1e-2)))
    assert not results_match(a, dict(a, label=a["label"] + 1))
    assert not results_match(a, dict(a, ok=~a["ok"]))


def test_results_match_counts_nan_as_equal_and_refuses_other_names_shapes_or_dtypes(tmp_path: Path) -> None:
    x = {"y": np.array([1.0, np.nan])}
    assert results_match(x, {"y": np.array([1.0, np.nan])})
    assert not results_match(x, {"z": np.array([1.0, np.nan])})
    assert not results_match(x, {"y": np.array([1.0, np.nan, 2.0])})
    assert not results_match(x, {"y": np.array([1.0, np.nan], dtype=np.float32)})
    path = write_arrays(tmp_path / "r.npz", x)
    assert results_match(path, x)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(600_000, dtype=np.float32).reshape(-1, 3),  # over 1 MiB: written in several pieces
        np.arange(10, dtype=">i4"),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
        np.array(["a", "bcd"]),
        np.array([b"x", b"yz"]),
        np.zeros((0, 4), dtype=np.float16),
        np.ones((3, 0), dtype=np.int8),
    ],
    ids=["large-float32", "big-endian", "complex", "datetime", "unicode", "bytes", "no-items", "empty-rows"],
)
def test_every_plain_dtype_is_written_exactly_as_numpy_writes_it(tmp_path: Path, arr: np.ndarray) -> None:
    for single, name in [(True, "r.npy"), (False, "r.npz")]:
        car = car_results.write_arrays(tmp_path / name, {"x": arr})
        assert arrays_bytes({"x": arr}, single=single) == car.read_bytes(), name
        np.testing.assert_array_equal(load_arrays(car)["output" if single else "x"], arr)

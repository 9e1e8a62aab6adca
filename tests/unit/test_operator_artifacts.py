"""The operator's side of the artifact store: FleetJob URIs resolve to verified digests, inputs become
deterministic shard blobs, cars' results are checked, compared and merged — and a lying car's garbage is an
invalid result, never a crash."""

from __future__ import annotations

import asyncio
import io
import os
import tracemalloc
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleetlet_operator.artifacts import ArtifactProblem, InputInfo, JobArtifacts, ResultInfo

from fleetlet.arrays import arrays_bytes, load_arrays
from fleetlet.artifacts import BlobStore


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


@pytest.fixture
def arts(store: BlobStore) -> JobArtifacts:
    return JobArtifacts(store)


def put(store: BlobStore, arrays: Mapping[str, np.ndarray], single: bool | None = None) -> str:
    """Store arrays as a car or a user would: the deterministic encoding (npy for one array unless told)."""
    return store.put_bytes(arrays_bytes(arrays, single=len(arrays) == 1 if single is None else single))


def npz_bytes(arrays: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    save: Any = np.savez_compressed if compressed else np.savez
    save(buf, **arrays)
    return buf.getvalue()


def npy_bytes(arr: Any, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def load_blob(store: BlobStore, digest: str) -> dict[str, np.ndarray]:
    data = store.path(digest).read_bytes()
    suffix = ".npy" if data.startswith(b"\x93NUMPY") else ".npz"
    path = store.tmp_dir / f"check{suffix}"
    path.write_bytes(data)
    try:
        return load_arrays(path)
    finally:
        path.unlink()


def blobs(store: BlobStore) -> set[str]:
    return {p.name for p in store.blobs_dir.rglob("*") if p.is_file()}


def problem(exc: pytest.ExceptionInfo[ArtifactProblem]) -> tuple[str, str]:
    return exc.value.reason, exc.value.message


def tokens(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "input_ids": rng.integers(0, 30_000, size=(n, 16), dtype=np.int64),
        "attention_mask": (rng.random((n, 16)) > 0.2).astype(np.int8),
    }


# --- resolve ---------------------------------------------------------------------------------------------------


def test_resolve_returns_the_digest_of_a_blob_already_in_the_store(
    store: BlobStore, arts: JobArtifacts
) -> None:
    digest = store.put_bytes(b"model bytes")
    assert arts.resolve(f"fleetlet://sha256/{digest}", None) == digest
    assert arts.resolve(f"fleetlet://sha256/{digest}", digest) == digest


def test_resolve_of_a_blob_not_in_the_store_says_to_upload_it_first(arts: JobArtifacts) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve("fleetlet://sha256/" + "ab" * 32, None)
    reason, message = problem(e)
    assert reason == "ArtifactMissing"
    assert "upload it first with `fleetlet upload`" in message


def test_resolve_refuses_a_sha256_that_contradicts_the_blob_uri(store: BlobStore, arts: JobArtifacts) -> None:
    digest = store.put_bytes(b"model bytes")
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve(f"fleetlet://sha256/{digest}", "cd" * 32)
    assert e.value.reason == "DigestMismatch"


def test_resolve_ingests_a_local_file_hashing_it_on_the_way_in(tmp_path: Path, store: BlobStore) -> None:
    arts = JobArtifacts(store, file_roots=[tmp_path])
    src = tmp_path / "my inputs" / "x.npy"
    src.parent.mkdir()
    src.write_bytes(npy_bytes(np.arange(10)))
    uri = "file://" + str(src).replace(" ", "%20")
    digest = arts.resolve(uri, None)
    assert store.path(digest).read_bytes() == src.read_bytes()
    assert arts.resolve(f"file://localhost{src}", digest) == digest


def test_resolve_of_a_local_file_whose_bytes_do_not_match_stores_nothing(
    tmp_path: Path, store: BlobStore
) -> None:
    arts = JobArtifacts(store, file_roots=[tmp_path])
    src = tmp_path / "x.npy"
    src.write_bytes(b"tampered")
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve(f"file://{src}", "ab" * 32)
    reason, message = problem(e)
    assert reason == "DigestMismatch"
    assert str(src) in message
    assert blobs(store) == set()
    assert list(store.tmp_dir.iterdir()) == []


def test_resolve_of_a_missing_local_file_is_artifact_missing(tmp_path: Path, store: BlobStore) -> None:
    arts = JobArtifacts(store, file_roots=[tmp_path])
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve(f"file://{tmp_path}/nope.npy", None)
    assert e.value.reason == "ArtifactMissing"


def test_resolve_reads_local_files_only_under_the_configured_roots(tmp_path: Path, store: BlobStore) -> None:
    inputs, private = tmp_path / "inputs", tmp_path / "private"
    inputs.mkdir()
    private.mkdir()
    secret = private / "token"
    secret.write_bytes(b"service account token")
    (inputs / "link").symlink_to(secret)
    for arts, uri in [
        (JobArtifacts(store), f"file://{inputs}/x.npy"),  # no roots configured: file:// is off
        (JobArtifacts(store, file_roots=[inputs]), f"file://{secret}"),
        (JobArtifacts(store, file_roots=[inputs]), f"file://{inputs}/../private/token"),
        (JobArtifacts(store, file_roots=[inputs]), f"file://{inputs}/link"),
    ]:
        with pytest.raises(ArtifactProblem) as e:
            arts.resolve(uri, None)
        assert e.value.reason == "FileNotAllowed", uri
        assert "fleetlet upload" in e.value.message
    assert blobs(store) == set()


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/inputs/x.npy",
        "https://example.com/x.npy?X-Amz-Signature=secret-token",
        "http://example.com/x.npy",
        "fleetlet://artifacts/model.onnx",
        "fleetlet://sha256/" + "AB" * 32,
        "fleetlet://sha256/abc",
        "file://otherhost/data/x.npy",
        "file://relative/x.npy",
        "x.npy",
    ],
)
def test_resolve_refuses_what_is_not_supported_today_and_names_what_is(arts: JobArtifacts, uri: str) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve(uri, None)
    reason, message = problem(e)
    assert reason == "UnsupportedURI"
    assert "fleetlet://sha256/" in message and "file:///" in message
    assert "secret-token" not in message  # a presigned URL's credential is never echoed


def test_resolve_refuses_a_sha256_that_is_not_a_digest(arts: JobArtifacts) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.resolve("fleetlet://sha256/" + "ab" * 32, "not-a-digest")
    assert e.value.reason == "InvalidDigest"


# --- inputs ----------------------------------------------------------------------------------------------------


def test_describe_input_reads_items_dtypes_and_row_shapes(store: BlobStore, arts: JobArtifacts) -> None:
    npy = store.put_bytes(npy_bytes(np.zeros((7, 8, 8), dtype=np.float32)))
    assert arts.describe_input(npy, "npy") == InputInfo(items=7, arrays={"output": ("<f4", (8, 8))})
    npz = store.put_bytes(npz_bytes(tokens(5)))
    info = arts.describe_input(npz, "npz")
    assert info.items == 5
    assert info.arrays == {"input_ids": ("<i8", (16,)), "attention_mask": ("|i1", (16,))}


def sparse_npy_blob(store: BlobStore, shape: tuple[int, ...], dtype: str = "<f4") -> str:
    """A huge .npy placed straight into the store (a sparse file: only its header is on disk).

    It is put under a made-up digest: hashing gigabytes would make the test slow, and only reads are tested."""
    digest = "5e" * 32
    path = store.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.truncate(f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return digest


def test_a_huge_input_is_described_and_sharded_without_being_loaded(
    store: BlobStore, arts: JobArtifacts
) -> None:
    items = 1 << 28  # 4 GiB of float32 rows of 4
    digest = sparse_npy_blob(store, (items, 4))
    tracemalloc.start()
    try:
        assert arts.describe_input(digest, "npy").items == items
        shard = arts.shard_input(digest, "npy", items - 1000, items)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    np.testing.assert_array_equal(load_blob(store, shard)["output"], np.zeros((1000, 4), dtype=np.float32))


def test_an_input_in_the_other_format_than_the_spec_says_is_invalid(
    store: BlobStore, arts: JobArtifacts
) -> None:
    npz = store.put_bytes(npz_bytes(tokens(5)))
    with pytest.raises(ArtifactProblem) as e:
        arts.describe_input(npz, "npy")
    reason, message = problem(e)
    assert reason == "InputInvalid"
    assert "set format: npz" in message


@pytest.mark.parametrize(
    ("name", "data", "fmt"),
    [
        ("not an array file", b"hello, world", "npy"),
        ("truncated npy", npy_bytes(np.arange(100))[:-8], "npy"),
        ("pickled objects", npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True), "npy"),
        ("a 0-d array", npy_bytes(np.float32(1.0)), "npy"),
        ("npz arrays not sharing axis 0", npz_bytes({"a": np.zeros(3), "b": np.zeros(4)}), "npz"),
        ("npz with a stray file", b"", "npz"),
    ],
)
def test_a_malformed_input_is_input_invalid(
    store: BlobStore, arts: JobArtifacts, name: str, data: bytes, fmt: str
) -> None:
    if name == "npz with a stray file":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("x.npy", npy_bytes(np.arange(3)))
            zf.writestr("README.txt", "hi")
        data = buf.getvalue()
    digest = store.put_bytes(data)
    with pytest.raises(ArtifactProblem) as e:
        arts.describe_input(digest, fmt)  # type: ignore[arg-type]
    assert e.value.reason == "InputInvalid", name


def test_describing_an_input_not_in_the_store_is_artifact_missing(arts: JobArtifacts) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.describe_input("ab" * 32, "npy")
    assert e.value.reason == "ArtifactMissing"


def shard_ranges(items: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, items)) for s in range(0, items, size)]


def test_npy_shards_concatenate_back_to_the_input_exactly(store: BlobStore, arts: JobArtifacts) -> None:
    x = np.random.default_rng(1).standard_normal((103, 6)).astype(np.float32)
    digest = store.put_bytes(npy_bytes(x))
    parts = [
        load_blob(store, arts.shard_input(digest, "npy", s, e))["output"] for s, e in shard_ranges(103, 10)
    ]
    assert [len(p) for p in parts][-1] == 3
    np.testing.assert_array_equal(np.concatenate(parts), x)


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_npz_shards_concatenate_back_to_the_input_exactly(
    store: BlobStore, arts: JobArtifacts, compressed: bool
) -> None:
    x = tokens(57)
    digest = store.put_bytes(npz_bytes(x, compressed=compressed))
    parts = [load_blob(store, arts.shard_input(digest, "npz", s, e)) for s, e in shard_ranges(57, 8)]
    for name, arr in x.items():
        assert [list(p) for p in parts][0] == list(x)
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), arr)


def test_a_fortran_ordered_input_shards_to_the_same_blobs_as_its_c_ordered_twin(
    store: BlobStore, arts: JobArtifacts
) -> None:
    x = np.arange(60, dtype=np.int32).reshape(20, 3)
    c = store.put_bytes(npy_bytes(x))
    f = store.put_bytes(npy_bytes(np.asfortranarray(x)))
    fz = store.put_bytes(npz_bytes({"x": np.asfortranarray(x)}, compressed=True))
    cz = store.put_bytes(npz_bytes({"x": x}))
    assert c != f
    assert arts.shard_input(c, "npy", 5, 12) == arts.shard_input(f, "npy", 5, 12)
    assert arts.shard_input(cz, "npz", 5, 12) == arts.shard_input(fz, "npz", 5, 12)


def test_shard_blobs_are_the_deterministic_encoding_and_stable_across_instances_and_stores(
    tmp_path: Path, store: BlobStore
) -> None:
    x = tokens(40)
    data = npz_bytes(x, compressed=True)
    digest = store.put_bytes(data)
    first = JobArtifacts(store).shard_input(digest, "npz", 10, 30)
    again = JobArtifacts(store).shard_input(digest, "npz", 10, 30)
    elsewhere = BlobStore(tmp_path / "another-machine")
    assert elsewhere.put_bytes(data) == digest
    there = JobArtifacts(elsewhere).shard_input(digest, "npz", 10, 30)
    assert first == again == there
    expected = arrays_bytes({k: v[10:30] for k, v in x.items()}, single=False)
    assert store.path(first).read_bytes() == expected


def test_a_large_shard_goes_through_a_temporary_file_and_leaves_nothing_behind(
    store: BlobStore, arts: JobArtifacts
) -> None:
    x = np.arange(3 << 20, dtype=np.float32).reshape(-1, 8)  # 12 MiB: over the in-memory limit
    digest = store.put_bytes(npy_bytes(x))
    shard = arts.shard_input(digest, "npy", 0, len(x) - 1)
    assert store.path(shard).read_bytes() == arrays_bytes({"x": x[:-1]}, single=True)
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (5, 5), (6, 5), (0, 11)])
def test_a_shard_outside_the_input_is_refused(
    store: BlobStore, arts: JobArtifacts, start: int, end: int
) -> None:
    digest = store.put_bytes(npy_bytes(np.arange(10)))
    with pytest.raises(ArtifactProblem) as e:
        arts.shard_input(digest, "npy", start, end)
    assert e.value.reason == "InputInvalid"


def test_shard_digests_are_cached_in_a_bounded_lru(store: BlobStore) -> None:
    arts = JobArtifacts(store, cache_size=2)
    digest = store.put_bytes(npy_bytes(np.arange(30)))
    a = arts.shard_input(digest, "npy", 0, 10)
    b = arts.shard_input(digest, "npy", 10, 20)
    store.path(digest).unlink()  # the input is gone: only cached ranges can still be answered
    assert arts.shard_input(digest, "npy", 0, 10) == a
    assert arts.shard_input(digest, "npy", 10, 20) == b
    with pytest.raises(ArtifactProblem) as e:
        arts.shard_input(digest, "npy", 20, 30)
    assert e.value.reason == "ArtifactMissing"
    store.path(a).unlink()  # a cached digest whose blob vanished is not handed out
    with pytest.raises(ArtifactProblem):
        arts.shard_input(digest, "npy", 0, 10)


async def test_shards_cut_concurrently_through_to_thread_match_serial_ones(store: BlobStore) -> None:
    x = tokens(200)
    digest = store.put_bytes(npz_bytes(x))
    ranges = shard_ranges(200, 7) * 3
    arts = JobArtifacts(store, cache_size=8)
    parallel = await asyncio.gather(
        *(asyncio.to_thread(arts.shard_input, digest, "npz", s, e) for s, e in ranges)
    )
    serial = [JobArtifacts(store).shard_input(digest, "npz", s, e) for s, e in ranges]
    assert parallel == serial


# --- results ---------------------------------------------------------------------------------------------------


def test_result_info_reports_items_outputs_and_whether_they_are_all_integers(
    store: BlobStore, arts: JobArtifacts
) -> None:
    floats = put(store, {"embedding": np.zeros((4, 384), dtype=np.float32)})
    assert arts.result_info(floats) == ResultInfo(
        items=4, arrays={"output": ("<f4", (384,))}, integer=False, single=True
    )
    ints = put(store, {"label": np.zeros(4, dtype=np.int64), "ok": np.ones(4, dtype=bool)})
    assert arts.result_info(ints) == ResultInfo(
        items=4, arrays={"label": ("<i8", ()), "ok": ("|b1", ())}, integer=True, single=False
    )


def zip_of(entries: Mapping[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def huge_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 10**6)}
    )
    return buf.getvalue() + b"\0" * 64


INVALID_RESULTS = {
    "empty": b"",
    "garbage": b"I computed it, trust me",
    "truncated npy": npy_bytes(np.arange(10.0))[:-1],
    "trailing bytes": npy_bytes(np.arange(10.0)) + b"\0",
    "header promising a petabyte": huge_header(),
    "pickled objects": npy_bytes(np.array([1, "x"], dtype=object), allow_pickle=True),
    "structured dtype": npy_bytes(np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])),
    "0-d array": npy_bytes(np.float64(3.0)),
    "compressed npz": npz_bytes({"a": np.zeros(3)}, compressed=True),
    "npz with a non-array entry": zip_of({"a.npy": npy_bytes(np.zeros(3)), "notes.txt": b"x"}),
    "npz with a garbage entry": zip_of({"a.npy": b"not npy"}),
    "empty npz": zip_of({}),
    "npz outputs of different lengths": npz_bytes({"a": np.zeros(3), "b": np.zeros(2)}),
    "npz cut short": npz_bytes({"a": np.zeros(300)})[:-200],
    "npy magic then nothing": b"\x93NUMPY",
    "npz with too many arrays": zip_of({f"a{i}.npy": npy_bytes(np.zeros(1)) for i in range(257)}),
}


@pytest.mark.parametrize("name", INVALID_RESULTS)
def test_a_malformed_result_is_result_invalid_never_a_crash(
    store: BlobStore, arts: JobArtifacts, name: str
) -> None:
    digest = store.put_bytes(INVALID_RESULTS[name])
    good = put(store, {"a": np.zeros(3)})
    with pytest.raises(ArtifactProblem) as e:
        arts.result_info(digest)
    assert e.value.reason == "ResultInvalid", name
    assert digest in e.value.message
    with pytest.raises(ArtifactProblem) as e:
        arts.agree(digest, good, 1e-6)
    assert e.value.reason == "ResultInvalid", name


def test_a_result_not_in_the_store_is_missing_and_a_bad_digest_is_invalid(arts: JobArtifacts) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.result_info("ab" * 32)
    assert e.value.reason == "ArtifactMissing"
    with pytest.raises(ArtifactProblem) as e:
        arts.result_info("../../etc/passwd")
    assert e.value.reason == "InvalidDigest"


def test_agree_on_equal_digests_is_true_without_reading(arts: JobArtifacts) -> None:
    assert arts.agree("ab" * 32, "ab" * 32, 0.0)  # not even in the store


def test_agree_compares_integers_exactly(store: BlobStore, arts: JobArtifacts) -> None:
    labels = np.arange(50, dtype=np.int64) % 10
    a = put(store, {"label": labels})
    off_by_one = labels.copy()
    off_by_one[17] += 1
    assert not arts.agree(a, put(store, {"label": off_by_one}), tolerance=10.0)


def test_agree_compares_floats_item_by_item_within_the_tolerance(
    store: BlobStore, arts: JobArtifacts
) -> None:
    x = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)
    x[3, 3] = np.nan
    a = put(store, {"y": x})
    jitter = put(store, {"y": x + np.float32(1e-6)})
    one_item_off = x.copy()
    one_item_off[11, 5] += 0.5
    off = put(store, {"y": one_item_off})
    assert arts.agree(a, jitter, 1e-4)
    assert not arts.agree(a, jitter, 0.0)
    assert not arts.agree(a, off, 1e-4)


def test_agree_requires_the_same_outputs_dtypes_shapes_and_file_kind(
    store: BlobStore, arts: JobArtifacts
) -> None:
    x = np.zeros((4, 2), dtype=np.float32)
    a = put(store, {"y": x})
    assert not arts.agree(a, put(store, {"y": x.astype(np.float64)}), 1.0)
    assert not arts.agree(a, put(store, {"y": x[:3]}), 1.0)
    assert not arts.agree(a, put(store, {"y": x.reshape(4, 2, 1)}), 1.0)
    # the same array as a one-entry npz would not merge with npy results: it does not agree
    assert not arts.agree(a, put(store, {"output": x}, single=False), 1.0)
    b = put(store, {"y": x, "z": np.zeros(4)})
    assert not arts.agree(b, put(store, {"z": np.zeros(4), "y": x}), 1.0)


def test_agree_answers_are_cached_per_unordered_pair(store: BlobStore, arts: JobArtifacts) -> None:
    a = put(store, {"y": np.zeros(3)})
    b = put(store, {"y": np.full(3, 1e-9)})
    assert arts.agree(a, b, 1e-6)
    store.path(a).unlink()
    store.path(b).unlink()
    assert arts.agree(b, a, 1e-6)
    with pytest.raises(ArtifactProblem):
        arts.agree(a, b, 1e-12)  # another tolerance is another question


def test_a_negative_tolerance_is_refused(arts: JobArtifacts) -> None:
    with pytest.raises(ArtifactProblem) as e:
        arts.agree("ab" * 32, "cd" * 32, -1.0)
    assert e.value.reason == "InvalidArgument"


def test_classes_put_the_liar_alone_and_keep_first_appearance_order(
    store: BlobStore, arts: JobArtifacts
) -> None:
    x = np.random.default_rng(4).standard_normal((16, 4)).astype(np.float32)
    honest = put(store, {"y": x})
    other_chip = put(store, {"y": x * np.float32(1 + 1e-7)})
    liar = put(store, {"y": np.zeros_like(x)})
    classes = arts.classes([liar, honest, other_chip, honest, liar], tolerance=1e-5)
    assert [c.digests for c in classes] == [(liar, liar), (honest, other_chip, honest)]
    assert all(c.valid for c in classes)
    assert [len(c) for c in classes] == [2, 3]


def test_classes_flag_unreadable_results_in_classes_of_their_own(
    store: BlobStore, arts: JobArtifacts
) -> None:
    good = put(store, {"y": np.arange(4)})
    garbage = store.put_bytes(b"not a result")
    missing = "ef" * 32
    classes = arts.classes([garbage, good, missing, garbage, good], tolerance=0.0)
    assert [c.digests for c in classes] == [(garbage, garbage), (good, good), (missing,)]
    assert [c.valid for c in classes] == [False, True, False]
    assert classes[0].problem is not None and classes[0].problem.reason == "ResultInvalid"
    assert classes[2].problem is not None and classes[2].problem.reason == "ArtifactMissing"
    assert arts.classes([], 0.0) == []


# --- merge -----------------------------------------------------------------------------------------------------


def test_merge_of_a_thousand_shards_equals_concatenate_in_bounded_memory(
    store: BlobStore, arts: JobArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's durability is not under test here: skip its fsyncs to keep the test fast.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    rng = np.random.default_rng(5)
    shards: list[dict[str, np.ndarray]] = [
        {"embedding": rng.standard_normal((40, 128)).astype(np.float32), "label": rng.integers(0, 9, 40)}
        for _ in range(1000)
    ]
    digests = [put(store, s) for s in shards]
    expected = {k: np.concatenate([s[k] for s in shards]) for k in ("embedding", "label")}
    total = sum(a.nbytes for a in expected.values())  # ~20.8 MB
    tracemalloc.start()
    try:
        out = arts.merge(digests, 40_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 5  # about one shard plus 1 MiB I/O buffers, never the output
    merged = load_blob(store, out)
    assert list(merged) == ["embedding", "label"]  # the cars' order
    for k, v in expected.items():
        np.testing.assert_array_equal(merged[k], v)
    assert store.path(out).read_bytes() == arrays_bytes(expected, single=False)
    assert list(store.tmp_dir.iterdir()) == []


def test_merge_of_single_output_shards_is_the_canonical_npy(store: BlobStore, arts: JobArtifacts) -> None:
    parts = [np.arange(i, i + 7, dtype=np.float64).reshape(7, 1) for i in range(0, 35, 7)]
    out = arts.merge([put(store, {"y": p}) for p in parts], 35)
    assert store.path(out).read_bytes() == arrays_bytes({"y": np.concatenate(parts)}, single=True)
    assert arts.merge([put(store, {"y": p}) for p in parts], 35) == out


@pytest.mark.parametrize(
    ("name", "odd", "expected_items"),
    [
        ("another dtype", {"y": np.zeros((5, 2), dtype=np.float64)}, 15),
        ("another row shape", {"y": np.zeros((5, 3), dtype=np.float32)}, 15),
        ("another output name", {"z": np.zeros((5, 2), dtype=np.float32), "w": np.zeros(5)}, 15),
        ("npz among npy", {"y": np.zeros((5, 2), dtype=np.float32)}, 15),
        ("too few items", {"y": np.zeros((4, 2), dtype=np.float32)}, 15),
        ("too many items", {"y": np.zeros((6, 2), dtype=np.float32)}, 15),
        ("expected more", {"y": np.zeros((5, 2), dtype=np.float32)}, 16),
    ],
)
def test_merge_refuses_results_that_do_not_fit_together_and_leaves_nothing_behind(
    store: BlobStore, arts: JobArtifacts, name: str, odd: dict[str, np.ndarray], expected_items: int
) -> None:
    good = put(store, {"y": np.zeros((5, 2), dtype=np.float32)})
    odd_digest = put(store, odd, single=False if name == "npz among npy" else None)
    before = blobs(store)
    with pytest.raises(ArtifactProblem) as e:
        arts.merge([good, odd_digest, good], expected_items)
    assert e.value.reason == "MergeMismatch", name
    assert blobs(store) == before
    assert list(store.tmp_dir.iterdir()) == []


def test_merge_of_an_invalid_or_missing_result_names_it(store: BlobStore, arts: JobArtifacts) -> None:
    good = put(store, {"y": np.zeros(5)})
    garbage = store.put_bytes(b"junk")
    with pytest.raises(ArtifactProblem) as e:
        arts.merge([good, garbage], 10)
    assert e.value.reason == "ResultInvalid" and garbage in e.value.message
    with pytest.raises(ArtifactProblem) as e:
        arts.merge([good, "ef" * 32], 10)
    assert e.value.reason == "ArtifactMissing"
    with pytest.raises(ArtifactProblem) as e:
        arts.merge([], 10)
    assert e.value.reason == "MergeMismatch"
    assert list(store.tmp_dir.iterdir()) == []

"""Deterministic array files, shared by the car (its results and input shards) and the operator (shards, merges).

What it is for: two parties that hold the same arrays must produce byte-identical files, so that results can be
verified and shards addressed by digest. A `.npy` holds exactly one array; several arrays go in a `.npz` zip
whose entries are written uncompressed, in the given order, with fixed timestamps, permissions and creator
system (`numpy.savez` stamps the current time into each entry, so it cannot be used). `arrays_bytes` is the same
encoding in memory; the bytes equal what `write_arrays` writes.

Determinism caveat (read before verifying replicas by digest): ONNX Runtime's CPU kernels give bit-identical
float outputs for the same model and input when the build, the instruction set it dispatches to (AVX2 vs
AVX-512 vs NEON) and the intra-op thread count are the same. Across heterogeneous hardware, builds or execution
providers (CPU vs CUDA) the last bits may differ; compare those replicas with `results_match` and a tolerance.

What it must never do: pickle (every write and load uses allow_pickle=False) or write a file in place (writes
go to a temporary name, are fsynced and renamed). It imports only numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import numpy as np

CHUNK = 1 << 20
# The name `load_arrays` gives the one array of a .npy file (a .npy file stores no name).
NPY_NAME = "output"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_PLAIN_KINDS = "biufcmMSU"  # bool, integers, floats, complex, datetimes, bytes and str: raw bytes, no pickle
_ZIP_UNIX = 3  # "created on Unix": zipfile's default off Windows, fixed so Windows writes the same bytes


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_npy(f: IO[bytes], arr: np.ndarray) -> None:
    """What `numpy.lib.format.write_array(f, arr, allow_pickle=False)` writes, in 1 MiB pieces straight from the
    array's memory (numpy's own writer copies up to 16 MiB at a time into a zip entry, a whole memory-mapped
    output of a merge included)."""
    arr = np.asarray(arr, order="C")
    if arr.dtype.hasobject or arr.dtype.kind not in _PLAIN_KINDS or arr.dtype.itemsize == 0:
        np.lib.format.write_array(f, arr, allow_pickle=False)  # refuses whatever would need pickle
        return
    header = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB: write_array, too, falls back to format 2.0
        np.lib.format.write_array_header_2_0(f, header)
    flat = arr.reshape(-1).view(np.uint8)
    for i in range(0, flat.size, CHUNK):
        f.write(flat[i : i + CHUNK].data)


def _encode(f: IO[bytes], arrays: Mapping[str, np.ndarray], single: bool) -> None:
    """Write the deterministic encoding of `arrays` to `f` (writable, seekable, at position 0)."""
    if single:
        (arr,) = arrays.values()
        _write_npy(f, arr)
        return
    # A seekable target lets zipfile patch each local header after its data instead of writing data
    # descriptors, so files and BytesIO get the same bytes.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = _ZIP_UNIX
            with zf.open(info, "w", force_zip64=True) as m:
                _write_npy(m, arr)


def _check_single(label: str, arrays: Mapping[str, np.ndarray]) -> None:
    if len(arrays) != 1:
        raise ValueError(f"{label}: a .npy file holds exactly one array, got {len(arrays)}")


def arrays_bytes(arrays: Mapping[str, np.ndarray], single: bool) -> bytes:
    """The bytes `write_arrays` would write: a .npy if `single` (exactly one array), else a .npz."""
    if single:
        _check_single("arrays_bytes", arrays)
    buf = io.BytesIO()
    _encode(buf, arrays, single)
    return buf.getvalue()


def write_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` deterministically and atomically: .npy if `path` ends in .npy (exactly one array), else a
    zip (.npz) whose entries are in the given order with fixed timestamps and permissions."""
    final = Path(path)
    single = final.suffix == ".npy"
    if single:
        _check_single(final.name, arrays)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            _encode(f, arrays, single)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a .npy (as {"output": arr}) or .npz result into memory. Blobs in the content-addressed store have no
    suffix, so the format is read from the file's first bytes (the npy magic, or a zip's)."""
    p = Path(path)
    if p.suffix == ".npy" or (p.suffix != ".npz" and _starts_with(p, b"\x93NUMPY")):
        return {NPY_NAME: np.load(p, allow_pickle=False)}
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def results_match(
    a: str | os.PathLike[str] | Mapping[str, np.ndarray],
    b: str | os.PathLike[str] | Mapping[str, np.ndarray],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> bool:
    """Whether two results agree: same output names, shapes and dtypes; integers and booleans exactly equal,
    floats within `rtol`/`atol` (NaN equals NaN). Use when replicas ran on different hardware; on identical
    hardware and builds, equal digests are the cheaper and stricter check."""
    da = load_arrays(a) if isinstance(a, str | os.PathLike) else dict(a)
    db = load_arrays(b) if isinstance(b, str | os.PathLike) else dict(b)
    if list(da) != list(db):
        return False
    for name in da:
        x, y = da[name], db[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if np.issubdtype(x.dtype, np.inexact):
            if not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True

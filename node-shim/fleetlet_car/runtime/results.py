"""Result files of the car runtime: deterministic .npy/.npz writing, hashing, and comparison of replicas.

What it is for: two cars running the same shard must produce byte-identical result files whenever their outputs
are identical, so that the operator can verify replicas by digest. `numpy.savez` stamps the current time into
each zip entry, so it cannot be used; `write_result` writes a stored (uncompressed) zip with fixed metadata.

Determinism caveat (read before verifying replicas by digest): ONNX Runtime's CPU kernels give bit-identical
float outputs for the same model and input when the build, the instruction set it dispatches to (AVX2 vs
AVX-512 vs NEON) and the intra-op thread count are the same. Across heterogeneous hardware, builds or execution
providers (CPU vs CUDA) the last bits may differ; compare those replicas with `results_match` and a tolerance.

What it must never do: pickle (every load uses allow_pickle=False) or write a file in place (writes are atomic).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

CHUNK = 1 << 20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` deterministically and atomically: .npy if `path` ends in .npy (exactly one array), else a
    zip (.npz) whose entries are in the given order with fixed timestamps and permissions."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if final.suffix == ".npy":
        if len(arrays) != 1:
            raise ValueError(f"{final.name}: a .npy file holds exactly one array, got {len(arrays)}")
        (arr,) = arrays.values()
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.asarray(arr, order="C"), allow_pickle=False)
    else:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(arr, order="C"), allow_pickle=False)
    _fsync_replace(tmp, final)
    return final


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a .npy (as {"output": arr}) or .npz result into memory."""
    p = Path(path)
    if p.suffix == ".npy":
        return {"output": np.load(p, allow_pickle=False)}
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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

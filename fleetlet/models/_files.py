"""File helpers shared by the example-model builders: digests, atomic writes, the cache location.

Build-side only; nothing here runs on a car.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    """Where built models are cached: ``$FLEETLET_CACHE/models``, else ``~/.cache/fleetlet/models``."""
    root = os.environ.get("FLEETLET_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fleetlet") / "models"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file and a rename; returns the bytes' hex SHA-256.

    A crash, or a second process building the same cache entry, never leaves a half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` encoding of ``array`` (no pickles), deterministic for equal arrays."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()

"""The car's side of a shard's files: cut the items a shard names out of its input, read a checkpoint back.

What it is for: an assignment names items ``[start, end)`` of an input artifact; the runner (or the SIMULATED
compute) is given a file holding exactly those items, and the agent reads each checkpoint the runner leaves to
upload it and report how far it got.

What it must never do: unpickle (every load uses allow_pickle=False), write anywhere but the assignment's own
work dir, or change the input artifact in the cache (it is shared and verified by digest).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .results import load_arrays, write_arrays


class InputError(ValueError):
    """The input cannot give the items the assignment names; the message says why (pod reason InputError)."""


def read_checkpoint(path: Path) -> tuple[bytes, int]:
    """The checkpoint's bytes (one consistent version: the runner replaces it atomically) and items done."""
    data = path.read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return data, int(z["__done__"])


def slice_input(path: Path, fmt: str, start: int, end: int, work_dir: Path) -> Path:
    """The input file for items ``[start, end)``: the artifact itself when it is exactly that range."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if fmt == "npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            total = arr.shape[0] if arr.ndim else 0
            if start == 0 and end == total:
                return path
            if end > total:
                raise InputError(f"items {start}..{end} asked of an input of {total} items")
            out = work_dir / "input.npy"
            write_arrays(out, {"x": np.ascontiguousarray(arr[start:end])})
            return out
        arrays = load_arrays(path)
        totals = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(totals) != 1:
            raise InputError("the npz input's arrays do not share axis 0")
        (total,) = totals
        if start == 0 and end == total:
            return path
        if end > total:
            raise InputError(f"items {start}..{end} asked of an input of {total} items")
        out = work_dir / "input.npz"
        write_arrays(out, {k: a[start:end] for k, a in arrays.items()})
        return out
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the input: {e}") from None

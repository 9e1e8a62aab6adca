"""The operator's side of the artifact store: a FleetJob's input becomes shard blobs, and its cars' results become
agreement classes and one merged output.

What it is for: `JobArtifacts` resolves the artifacts a FleetJob names to digests in the embedded `BlobStore`,
describes the input from its headers, cuts it into one deterministic blob per shard (a car fetches only its own
shard's blob: that is the privacy boundary, a car sees nothing it was not assigned), checks and compares the
result files cars upload, and concatenates the accepted results, in input order, into the job's output blob.
Shard and output blobs use the deterministic encoding of `fleetlet.arrays`, so the same input and range give the
same bytes, hence the same digest, on any machine.

Every method blocks (file I/O, hashing, numpy): the controller calls them through `asyncio.to_thread`. They are
safe to call from several threads at once; the only state is two bounded LRU caches (and a small one of parsed
input headers) per instance, all of immutable, content-addressed facts. Every failure is an `ArtifactProblem`
whose CamelCase `reason` can go straight into a condition and whose message says what to fix. Result files come
from untrusted cars: whatever a car uploads is at worst an invalid result (`ResultInvalid`), never a crash.

What it must never do: unpickle (no object or structured dtypes are accepted, every load is allow_pickle=False),
load a whole large input into memory (npy and uncompressed npz members are memory-mapped and sliced, compressed
npz members are streamed), allocate what a file's header merely claims before checking it against the file's
size, leave a half-written blob (every blob goes through `BlobStore`, which verifies and renames atomically;
temporary files live under the store's tmp dir and are removed), or echo a URI it does not support (a presigned
URL carries a credential in its query).
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import threading
import urllib.parse
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from fleetlet.api.v1alpha1.fleetjob import InputFormat
from fleetlet.arrays import NPY_NAME, arrays_bytes, results_match, write_arrays
from fleetlet.artifacts import DIGEST_RE, BlobStore, DigestMismatch, InvalidDigest

__all__ = [
    "AgreementClass",
    "ArrayShape",
    "ArtifactProblem",
    "ArtifactReason",
    "InputInfo",
    "JobArtifacts",
    "ResultInfo",
]

CHUNK = 1 << 20
# Shard blobs up to this size are encoded in memory; larger ones go through a temporary file.
IN_MEMORY_LIMIT = 8 << 20
# Reads of plainly stored data up to this size are a read() into memory; larger ones are memory-mapped.
READ_LIMIT = 4 << 20
DEFAULT_CACHE_SIZE = 4096
MAX_ARRAYS = 256  # named arrays in one .npz: far more than any model's inputs or outputs
SUPPORTED = (
    "fleetlet://sha256/<digest> (a blob in Fleetlet's artifact store: upload it with `fleetlet upload`) "
    "or file:///absolute/path (a file on the operator's own filesystem)"
)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the fixed 30 bytes before a member's name and extra field

K = TypeVar("K")
V = TypeVar("V")

# (dtype string such as "<f4", row shape): what one named array holds per item.
ArrayShape = tuple[str, tuple[int, ...]]
Array = npt.NDArray[Any]
_Loaded = tuple[bool, dict[str, Array]]  # a result: (is .npy, its arrays as memory-mapped views)


class ArtifactReason(StrEnum):
    ARTIFACT_MISSING = "ArtifactMissing"
    DIGEST_MISMATCH = "DigestMismatch"
    UNSUPPORTED_URI = "UnsupportedURI"
    INVALID_DIGEST = "InvalidDigest"
    INPUT_INVALID = "InputInvalid"
    RESULT_INVALID = "ResultInvalid"
    MERGE_MISMATCH = "MergeMismatch"
    INVALID_ARGUMENT = "InvalidArgument"
    FILE_NOT_ALLOWED = "FileNotAllowed"
    STORE_ERROR = "StoreError"  # the store's own disk failed (full, unreadable): an operator problem


class ArtifactProblem(Exception):
    """Something about an artifact stops the job: `reason` is CamelCase, `message` says what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"ArtifactProblem({self.reason!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What a FleetJob's input holds: `items` along axis 0, and each array's dtype and row shape by name.

    A .npy input's one array is named `fleetlet.arrays.NPY_NAME` ("output", as `load_arrays` names it); the name
    means nothing for an input, whose single array feeds the model's single input."""

    items: int
    arrays: dict[str, ArrayShape]


@dataclass(frozen=True, slots=True)
class ResultInfo:
    """A well-formed result file: `items` along axis 0 and each output's dtype and row shape by name.

    `integer`: every output is integer or boolean, so replicas must agree exactly. `single`: a .npy (one output,
    named "output") rather than a .npz. Two results can agree, and merge, only if `single` and `arrays` are equal:
    compare an unreplicated shard's result against the job's first accepted one (and `items` against the shard's
    size) before accepting it."""

    items: int
    arrays: dict[str, ArrayShape]
    integer: bool
    single: bool


@dataclass(frozen=True, slots=True)
class AgreementClass:
    """Results that agree with the class's first member, in the order given (a digest may appear more than once).

    `problem` is set when these results could not be read (a malformed or missing file): such a class is never
    a quorum, whatever its size, and each of its cars delivered an invalid result."""

    digests: tuple[str, ...]
    problem: ArtifactProblem | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    def __len__(self) -> int:
        return len(self.digests)


class _Malformed(ValueError):
    """A file is not a well-formed npy/npz; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class _Array:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran: bool
    header_len: int  # bytes of npy header before the data, within the .npy file or zip member
    offset: int | None  # absolute offset of the data in the blob when it can be memory-mapped
    member: zipfile.ZipInfo | None  # the zip entry of an .npz member

    @property
    def row(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def spec(self) -> ArrayShape:
        return (self.dtype.str, self.row)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where each array of one npy/npz file lies, read from its headers only."""

    path: Path
    single: bool
    arrays: tuple[_Array, ...]
    items: int

    def specs(self) -> dict[str, ArrayShape]:
        return {a.name: a.spec for a in self.arrays}

    def signature(self) -> tuple[bool, tuple[tuple[str, str, tuple[int, ...]], ...]]:
        return self.single, tuple((a.name, *a.spec) for a in self.arrays)


class _LRU(Generic[K, V]):
    """A bounded, thread-safe least-recently-used map."""

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


class JobArtifacts:
    """A FleetJob's artifacts in one `BlobStore`. Blocking: call through `asyncio.to_thread`. Thread-safe."""

    def __init__(
        self,
        store: BlobStore,
        *,
        file_roots: Iterable[str | os.PathLike[str]] = (),
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """`file_roots`: the directories file:// URIs may read from (none by default). Without such a bound, whoever
        may create a FleetJob could have the operator ship any file it can read (its own service account
        token included) to a car as a "model"."""
        self._store = store
        self._file_roots = tuple(Path(r).resolve() for r in file_roots)
        self._shards: _LRU[tuple[str, str, int, int], str] = _LRU(cache_size)
        self._agreements: _LRU[tuple[str, str, float], bool] = _LRU(cache_size)
        self._inputs: _LRU[str, _Layout] = _LRU(64)

    # --- inputs and models -------------------------------------------------------------------------------------

    def resolve(self, uri: str, sha256: str | None = None) -> str:
        """The digest of the artifact `uri` names, in the store. `sha256`, if given, must match its content.

        `fleetlet://sha256/<hex>` must already be in the store; `file:///abs/path` (under one of `file_roots`) is
        read and ingested, hashed on the way in, so the digest is never taken on trust. Other schemes are refused
        (UnsupportedURI) without echoing the URI: a presigned URL carries a credential."""
        if sha256 is not None and not DIGEST_RE.match(sha256):
            raise ArtifactProblem(
                ArtifactReason.INVALID_DIGEST,
                f"sha256 {sha256!r} is not 64 lowercase hex characters; use what sha256sum prints",
            )
        scheme, sep, rest = uri.partition("://")
        if sep and scheme == "fleetlet" and rest.startswith("sha256/"):
            return self._resolve_blob(uri, rest[len("sha256/") :], sha256)
        if sep and scheme == "file":
            return self._resolve_file(uri, sha256)
        shown = f"{scheme}://" if sep and scheme.isalnum() else "this URI"
        raise ArtifactProblem(
            ArtifactReason.UNSUPPORTED_URI,
            f"{shown} artifacts are not supported yet; today Fleetlet reads {SUPPORTED}",
        )

    def _resolve_blob(self, uri: str, hexd: str, sha256: str | None) -> str:
        if not DIGEST_RE.match(hexd):
            raise ArtifactProblem(
                ArtifactReason.UNSUPPORTED_URI,
                f"a fleetlet:// URI must be fleetlet://sha256/<64 lowercase hex characters>; today Fleetlet reads "
                f"{SUPPORTED}",
            )
        if sha256 is not None and sha256 != hexd:
            raise ArtifactProblem(
                ArtifactReason.DIGEST_MISMATCH,
                f"the URI names sha256:{hexd} but sha256 says {sha256}; make them agree "
                "(or leave sha256 out: the URI already pins the content)",
            )
        if not self._store.has(hexd):
            raise ArtifactProblem(
                ArtifactReason.ARTIFACT_MISSING,
                f"sha256:{hexd} is not in Fleetlet's artifact store; upload it first with `fleetlet upload` "
                "and use the URI it prints",
            )
        return hexd

    def _resolve_file(self, uri: str, sha256: str | None) -> str:
        # Path.resolve and is_relative_to bound the path; a root writable by others could still race a symlink
        # in after the check, so roots are directories only the platform team writes.
        parts = urllib.parse.urlsplit(uri)
        if (
            parts.netloc not in ("", "localhost")
            or not parts.path.startswith("/")
            or parts.query
            or parts.fragment
        ):
            raise ArtifactProblem(
                ArtifactReason.UNSUPPORTED_URI,
                f"a file:// URI must be file:///absolute/path (no host, query or fragment); today Fleetlet reads "
                f"{SUPPORTED}",
            )
        path = Path(urllib.parse.unquote(parts.path)).resolve()  # symlinks and .. cannot leave the roots
        if not any(path.is_relative_to(root) for root in self._file_roots):
            roots = ", ".join(str(r) for r in self._file_roots) or "none are configured"
            raise ArtifactProblem(
                ArtifactReason.FILE_NOT_ALLOWED,
                f"the operator reads file:// artifacts only under its configured directories ({roots}); "
                "move the file there, or upload it with `fleetlet upload` and use the fleetlet:// URI it prints",
            )
        if not path.is_file():
            raise ArtifactProblem(
                ArtifactReason.ARTIFACT_MISSING,
                f"no file {path} on the operator's filesystem (file:// URIs are read by the operator itself); "
                "put it there, or upload it first with `fleetlet upload` and use the fleetlet:// URI it prints",
            )
        try:
            return self._store.put_file(path, expected=sha256)
        except DigestMismatch as e:
            raise ArtifactProblem(
                ArtifactReason.DIGEST_MISMATCH,
                f"{path} hashes to sha256:{e.actual}, not the sha256:{e.expected} the FleetJob gives; "
                "fix the digest in the spec or restore the original file",
            ) from None
        except OSError as e:
            raise ArtifactProblem(
                ArtifactReason.STORE_ERROR,
                f"could not copy {path} into the artifact store at {self._store.root}: {e}; "
                "check that the operator can read the file and that the store's disk has room",
            ) from None

    def describe_input(self, digest: str, fmt: InputFormat) -> InputInfo:
        """Items and arrays of the input blob, read from its headers only (inputs may be large)."""
        layout = self._input_layout(digest, fmt)
        return InputInfo(items=layout.items, arrays=layout.specs())

    def shard_input(self, digest: str, fmt: InputFormat, start: int, end: int) -> str:
        """The digest of a blob holding exactly items [start, end) of the input, in the input's format.

        Deterministic: the same input and range give the same bytes on any machine. A .npy input is memory-mapped
        and sliced; an .npz input is read array by array (mapped when stored uncompressed, streamed when
        compressed), so memory stays about one shard."""
        key = (digest, fmt, start, end)
        cached = self._shards.get(key)
        if cached is not None and self._store.has(cached):
            return cached
        layout = self._input_layout(digest, fmt)
        if not 0 <= start < end <= layout.items:
            raise ArtifactProblem(
                ArtifactReason.INPUT_INVALID,
                f"items [{start}, {end}) were asked of input sha256:{digest}, which holds {layout.items}; "
                "spec.input.items must not exceed the rows of the input",
            )
        with self._errors(f"input sha256:{digest}", ArtifactReason.INPUT_INVALID):
            shard = {a.name: _rows(layout, a, start, end) for a in layout.arrays}
            out = self._put_arrays(shard, layout.single)
        self._shards.put(key, out)
        return out

    def _input_layout(self, digest: str, fmt: InputFormat) -> _Layout:
        layout = self._inputs.get(digest)
        if layout is None:
            with self._errors(f"input sha256:{digest}", ArtifactReason.INPUT_INVALID):
                layout = _parse(self._store.path(digest), allow_compressed=True)
            self._inputs.put(digest, layout)
        if layout.single != (fmt == "npy"):
            actual = "npy" if layout.single else "npz"
            raise ArtifactProblem(
                ArtifactReason.INPUT_INVALID,
                f"input sha256:{digest} is an {actual} file but spec.input.format is {fmt}; "
                f"set format: {actual}",
            )
        return layout

    def _put_arrays(self, arrays: dict[str, Array], single: bool) -> str:
        if sum(a.nbytes for a in arrays.values()) <= IN_MEMORY_LIMIT:
            return self._store.put_bytes(arrays_bytes(arrays, single))
        with tempfile.TemporaryDirectory(dir=self._store.tmp_dir, prefix="arrays-") as tmp:
            path = write_arrays(Path(tmp) / ("blob.npy" if single else "blob.npz"), arrays)
            return self._store.put_file(path)

    # --- results -----------------------------------------------------------------------------------------------

    def result_info(self, digest: str) -> ResultInfo:
        """What a car's result file holds, from its headers; ResultInvalid for anything malformed."""
        layout = self._result_layout(digest)
        return ResultInfo(
            items=layout.items,
            arrays=layout.specs(),
            integer=all(a.dtype.kind in "biu" for a in layout.arrays),
            single=layout.single,
        )

    def agree(self, a: str, b: str, tolerance: float) -> bool:
        """Whether two results agree: equal digests at once; else same kind (npy/npz), names, shapes and dtypes,
        integers and booleans exactly, floats item by item within rtol=atol=`tolerance` (NaN equals NaN).
        Raises ResultInvalid if either is malformed."""
        _check_tolerance(tolerance)
        if a == b:
            return True
        key = (a, b, tolerance) if a < b else (b, a, tolerance)
        cached = self._agreements.get(key)
        if cached is not None:
            return cached
        return self._compare(key, self._load_result(a), self._load_result(b))

    def classes(self, digests: Sequence[str], tolerance: float) -> list[AgreementClass]:
        """Group results into agreement classes: each digest joins the first class whose first member it agrees
        with, else opens a new one. Classes come in order of first appearance, members in the order given.

        A digest that cannot be read (malformed, missing) forms a class of its own (all its occurrences) with
        `problem` set: it is never a quorum, and each car that sent it delivered an invalid result."""
        _check_tolerance(tolerance)
        groups: list[tuple[list[str], ArtifactProblem | None]] = []
        home: dict[str, int] = {}  # digest -> its group: equal digests agree without a look
        loaded: dict[str, _Loaded] = {}  # first member of each valid group -> its arrays
        for d in digests:
            if d in home:
                groups[home[d]][0].append(d)
                continue
            try:
                mine = self._load_result(d)
            except ArtifactProblem as p:
                home[d] = len(groups)
                groups.append(([d], p))
                continue
            for i, (members, problem) in enumerate(groups):
                if problem is None and self._agree_loaded(d, members[0], mine, loaded[members[0]], tolerance):
                    members.append(d)
                    home[d] = i
                    break
            else:
                home[d] = len(groups)
                loaded[d] = mine
                groups.append(([d], None))
        return [AgreementClass(tuple(members), problem) for members, problem in groups]

    def merge(self, digests_in_order: Sequence[str], expected_items: int) -> str:
        """The digest of the job's output: the accepted shard results concatenated along axis 0, in the order
        given, as one .npy (single output) or .npz (outputs in the cars' order). Every result must have the same
        kind, names, dtypes and row shapes, and together exactly `expected_items` items (else MergeMismatch).

        Streams: each output array is a memory-mapped file in the store's tmp dir, filled shard by shard, so
        memory stays about one shard whatever the number of shards."""
        if not digests_in_order or expected_items < 1:
            raise ArtifactProblem(
                ArtifactReason.MERGE_MISMATCH,
                f"nothing to merge: {len(digests_in_order)} results for {expected_items} items",
            )
        with (
            self._errors("the merged output", ArtifactReason.MERGE_MISMATCH),
            tempfile.TemporaryDirectory(dir=self._store.tmp_dir, prefix="merge-") as tmp,
        ):
            outs: dict[str, Array] = {}
            first: _Layout | None = None
            filled = 0
            for i, digest in enumerate(digests_in_order):
                layout = self._result_layout(digest)
                if first is None:
                    first = layout
                    for k, a in enumerate(layout.arrays):
                        outs[a.name] = _output_array(
                            Path(tmp) / f"{k}.npy", a.dtype, (expected_items, *a.row)
                        )
                elif layout.signature() != first.signature():
                    raise ArtifactProblem(
                        ArtifactReason.MERGE_MISMATCH,
                        f"result {i} (sha256:{digest}) holds {_describe(layout)} but result 0 "
                        f"(sha256:{digests_in_order[0]}) holds {_describe(first)}; every shard's result must have "
                        "the same outputs — reject the odd one and re-run its shard",
                    )
                if filled + layout.items > expected_items:
                    raise ArtifactProblem(
                        ArtifactReason.MERGE_MISMATCH,
                        f"the results hold more than the expected {expected_items} items (result {i}, "
                        f"sha256:{digest}, ends at item {filled + layout.items}); check each result's items "
                        "against its shard's size before accepting it",
                    )
                for a in layout.arrays:
                    outs[a.name][filled : filled + layout.items] = _rows(layout, a, 0, layout.items)
                filled += layout.items
            if filled != expected_items:
                raise ArtifactProblem(
                    ArtifactReason.MERGE_MISMATCH,
                    f"the results hold {filled} items, not the expected {expected_items}; "
                    "a shard's result is missing or short",
                )
            assert first is not None
            for out in outs.values():
                if isinstance(out, np.memmap):
                    out.flush()
            if first.single:
                (only,) = outs.values()
                if isinstance(only, np.memmap) and only.filename is not None:
                    # open_memmap writes the header write_array writes: the file already is the canonical .npy.
                    return self._store.put_file(only.filename)
            path = write_arrays(Path(tmp) / ("output.npy" if first.single else "output.npz"), outs)
            return self._store.put_file(path)

    def _result_layout(self, digest: str) -> _Layout:
        with self._errors(f"result sha256:{digest}", ArtifactReason.RESULT_INVALID):
            return _parse(self._store.path(digest), allow_compressed=False)

    def _load_result(self, digest: str) -> _Loaded:
        layout = self._result_layout(digest)
        with self._errors(f"result sha256:{digest}", ArtifactReason.RESULT_INVALID):
            return layout.single, {a.name: _rows(layout, a, 0, layout.items) for a in layout.arrays}

    def _agree_loaded(self, a: str, b: str, la: _Loaded, lb: _Loaded, tolerance: float) -> bool:
        key = (a, b, tolerance) if a < b else (b, a, tolerance)
        cached = self._agreements.get(key)
        if cached is not None:
            return cached
        return self._compare(key, la, lb)

    def _compare(self, key: tuple[str, str, float], la: _Loaded, lb: _Loaded) -> bool:
        # A .npy and a one-entry .npz of the same array are different results: they would not merge together.
        same = la[0] == lb[0] and results_match(la[1], lb[1], rtol=key[2], atol=key[2])
        self._agreements.put(key, same)
        return same

    @contextmanager
    def _errors(self, what: str, invalid: ArtifactReason) -> Iterator[None]:
        """Turn the store's and the parser's exceptions about `what` into ArtifactProblems that say what to do."""
        try:
            yield
        except ArtifactProblem:
            raise
        except InvalidDigest as e:
            raise ArtifactProblem(ArtifactReason.INVALID_DIGEST, str(e)) from None
        except _Malformed as e:
            if invalid is ArtifactReason.RESULT_INVALID:
                fix = (
                    "the car must upload result.npy or result.npz as fleetlet.arrays.write_arrays writes them"
                )
            else:
                fix = "write it with numpy.save (npy) or numpy.savez (npz), with plain numeric dtypes"
            raise ArtifactProblem(invalid, f"{what} is not a valid npy/npz: {e}; {fix}") from None
        except FileNotFoundError:
            if invalid is ArtifactReason.RESULT_INVALID:
                fix = "the car has not uploaded it (or it was deleted): re-run its shard"
            else:
                fix = "upload it first with `fleetlet upload`"
            raise ArtifactProblem(
                ArtifactReason.ARTIFACT_MISSING, f"{what} is not in Fleetlet's artifact store; {fix}"
            ) from None
        except OSError as e:
            raise ArtifactProblem(
                ArtifactReason.STORE_ERROR,
                f"the artifact store at {self._store.root} failed on {what}: {e}; check its disk (space, "
                "permissions)",
            ) from None


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ArtifactProblem(
            ArtifactReason.INVALID_ARGUMENT, f"tolerance must be a finite number >= 0, not {tolerance!r}"
        )


def _describe(layout: _Layout) -> str:
    kind = "npy" if layout.single else "npz"
    arrays = ", ".join(f"{a.name}: {a.dtype.str} x {a.row}" for a in layout.arrays)
    return f"{kind} [{arrays}]"


# --- reading npy/npz from their headers ------------------------------------------------------------------------


def _parse(path: Path, *, allow_compressed: bool) -> _Layout:
    """The layout of an .npy or .npz file from its headers, checked against the file's size. Raises `_Malformed`
    for anything that is not a well-formed npy/npz of plain arrays sharing axis 0, OSError for the disk's faults."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            f.seek(0)
            if magic == _NPY_MAGIC:
                single = True
                shape, fortran, dtype = _read_header(f)
                header_len = f.tell()
                arrays: tuple[_Array, ...] = (
                    _Array(NPY_NAME, dtype, shape, fortran, header_len, header_len, None),
                )
                if size != header_len + arrays[0].nbytes:
                    raise _Malformed(
                        f"its header promises {arrays[0].nbytes} bytes of data but it holds {size - header_len}"
                    )
            elif magic.startswith(_ZIP_MAGIC):
                single = False
                arrays = _parse_zip(f, size, allow_compressed)
            else:
                raise _Malformed("it is neither an .npy file nor an .npz archive")
    except (_Malformed, OSError):
        raise
    except Exception as e:  # whatever garbage makes zipfile or numpy raise is a malformed file, not a crash
        raise _Malformed(f"{type(e).__name__}: {e}") from None
    counts = {a.shape[0] for a in arrays}
    if len(counts) != 1:
        sizes = ", ".join(f"{a.name!r} has {a.shape[0]}" for a in arrays)
        raise _Malformed(f"its arrays do not share axis 0 ({sizes})")
    return _Layout(path, single, arrays, counts.pop())


def _parse_zip(f: IO[bytes], size: int, allow_compressed: bool) -> tuple[_Array, ...]:
    out: list[_Array] = []
    names: set[str] = set()
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.endswith(".npy"):
                raise _Malformed(f"entry {info.filename!r} is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in names:
                raise _Malformed(f"array {name!r} appears twice")
            if len(names) == MAX_ARRAYS:
                raise _Malformed(f"it holds more than {MAX_ARRAYS} arrays")
            names.add(name)
            stored = info.compress_type == zipfile.ZIP_STORED
            if not stored and not allow_compressed:
                raise _Malformed(f"entry {info.filename!r} is compressed; results are written uncompressed")
            with zf.open(info) as m:
                shape, fortran, dtype = _read_header(m)
                header_len = m.tell()
            a = _Array(name, dtype, shape, fortran, header_len, None, info)
            if info.file_size != header_len + a.nbytes:
                raise _Malformed(
                    f"array {name!r}: its header promises {a.nbytes} bytes of data "
                    f"but its entry holds {info.file_size - header_len}"
                )
            if stored:
                start = _member_data_start(f, info)
                if info.compress_size != info.file_size or start + info.compress_size > size:
                    raise _Malformed(f"entry {info.filename!r} runs past the end of the archive")
                a = _Array(name, dtype, shape, fortran, header_len, start + header_len, info)
            out.append(a)
    if not out:
        raise _Malformed("the archive holds no arrays")
    return tuple(out)


def _member_data_start(f: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where a zip member's bytes begin: after its local header, whose name and extra field vary in length."""
    f.seek(info.header_offset)
    raw = f.read(_ZIP_LOCAL_HEADER.size)
    if len(raw) != _ZIP_LOCAL_HEADER.size:
        raise _Malformed(f"entry {info.filename!r} has a truncated header")
    fields = _ZIP_LOCAL_HEADER.unpack(raw)
    if fields[0] != _ZIP_MAGIC:
        raise _Malformed(f"entry {info.filename!r} has a bad header")
    return int(info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1])


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise _Malformed(f"npy format version {version} is not supported (1.0 and 2.0 are)")
    if dtype.hasobject or dtype.kind in "OV":
        raise _Malformed(f"dtype {dtype} is refused: only plain (not object or structured) arrays are read")
    if not shape or any(n < 0 for n in shape):
        raise _Malformed(f"shape {shape} does not hold items along axis 0")
    return shape, fortran, dtype


def _rows(layout: _Layout, a: _Array, start: int, stop: int) -> Array:
    """Items [start, stop) of one array: a view of a memory map where the data is stored plainly, else read."""
    count = stop - start
    if count == 0 or a.nbytes == 0:
        return np.zeros((count, *a.row), dtype=a.dtype)
    row_bytes = a.nbytes // a.shape[0]
    if a.offset is not None:
        # Small reads (a car's result, a shard of a modest input) are one read(); large ones a memory map.
        if not a.fortran and count * row_bytes <= READ_LIMIT:
            n = count * math.prod(a.row)
            flat = np.fromfile(layout.path, dtype=a.dtype, count=n, offset=a.offset + start * row_bytes)
            return flat.reshape((count, *a.row))
        order: Literal["C", "F"] = "F" if a.fortran else "C"
        whole = np.memmap(layout.path, dtype=a.dtype, mode="r", offset=a.offset, shape=a.shape, order=order)
        return whole[start:stop]
    assert a.member is not None
    try:
        with zipfile.ZipFile(layout.path) as zf, zf.open(a.member) as m:
            if a.fortran:  # column-major: items are not contiguous, so the array is read whole
                _skip(m, a.header_len)
                data = np.frombuffer(_read_exact(m, a.nbytes), dtype=a.dtype)
                return data.reshape(a.shape, order="F")[start:stop]
            _skip(m, a.header_len + start * row_bytes)
            return np.frombuffer(_read_exact(m, count * row_bytes), dtype=a.dtype).reshape((count, *a.row))
    except (_Malformed, OSError):
        raise
    except Exception as e:  # a corrupt compressed stream (zlib, CRC) is a malformed file
        raise _Malformed(f"array {a.name!r}: {type(e).__name__}: {e}") from None


def _skip(m: IO[bytes], n: int) -> None:
    while n > 0:
        chunk = m.read(min(n, CHUNK))
        if not chunk:
            raise _Malformed("the archive ends early")
        n -= len(chunk)


def _read_exact(m: IO[bytes], n: int) -> bytearray:
    buf = bytearray(n)
    pos = 0
    while pos < n:
        chunk = m.read(min(n - pos, CHUNK))
        if not chunk:
            raise _Malformed("the archive ends early")
        buf[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return buf


def _output_array(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
    """A zero-filled output array: a memory-mapped .npy file under the store's tmp dir (empty ones in memory)."""
    if math.prod(shape) * dtype.itemsize == 0:
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(os.fspath(path), mode="w+", dtype=dtype, shape=shape)

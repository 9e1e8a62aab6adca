"""Fleetlet's embedded content-addressed artifact store and its per-assignment access grants.

What it is for: models, input shards and results are stored by the sha256 of their bytes in a plain directory
(`BlobStore`), and served over HTTP (`make_app`) to cars. A car may read only the digests its assignment names:
every request carries a short-lived HMAC-signed grant (`GrantSigner.issue_grant`) that lists those digests, an
expiry and, optionally, the permission to upload results. A result upload is accepted only when its bytes hash
to the digest in its path.

What it must never do: serve a blob to a request whose grant does not name that digest (a car sees nothing it was
not assigned), store a blob under a digest its bytes do not hash to, leave a half-written blob where a reader can
see it, or log a grant token (it is a bearer credential). It keeps no module-level state: the store, the signing
key and the clock are values passed in.

The production option is an S3-compatible store; this module is the default that Fleetlet serves itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web

logger = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^[a-f0-9]{64}$")
CHUNK = 1 << 20
GRANT_QUERY_PARAM = "grant"
_TOKEN_VERSION = 1
MAX_GRANT_TTL_SECONDS = 24 * 3600


class ArtifactError(Exception):
    """Base class of the artifact store's errors."""


class InvalidDigest(ArtifactError, ValueError):
    """A digest is not 64 lowercase hex characters."""


class DigestMismatch(ArtifactError):
    """Bytes do not hash to the digest they were offered under; nothing was stored."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"content hashes to sha256:{actual}, not the expected sha256:{expected}; "
            "the bytes were refused — re-upload the original artifact or fix the digest"
        )
        self.expected = expected
        self.actual = actual


class BlobNotFound(ArtifactError, FileNotFoundError):
    """The store holds no blob with that digest."""


class GrantError(ArtifactError, PermissionError):
    """A grant is missing, malformed, forged, expired or does not cover the request.

    `reason` is a CamelCase word suitable for an API error body.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_digest(digest: str) -> str:
    """Return `digest` if it is a sha256 hex digest (lowercase), else raise `InvalidDigest`."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidDigest(f"{digest!r} is not a sha256 digest: expected 64 lowercase hex characters")
    return digest


class _BlobWriter:
    """Writes one blob to a temporary file, hashing as it goes; `commit` verifies and renames atomically."""

    def __init__(self, store: BlobStore, expected: str | None) -> None:
        self._store = store
        self._expected = check_digest(expected) if expected is not None else None
        self._hash = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-", suffix=".part")
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "writer already closed"
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """Verify the digest, fsync and rename into place; return the digest. Raises `DigestMismatch`."""
        assert self._file is not None, "writer already closed"
        try:
            actual = self._hash.hexdigest()
            if self._expected is not None and actual != self._expected:
                raise DigestMismatch(self._expected, actual)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            final = self._store.path(actual)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Content-addressed: if the blob already exists its bytes are these bytes; replacing is harmless.
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, final)
            return actual
        finally:
            self.abort()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class BlobStore:
    """A directory of blobs named by their sha256: `<root>/sha256/<ab>/<digest>`.

    Writes go to `<root>/tmp/` and are renamed into place only after the digest is verified, so a reader never
    sees a partial or wrong blob. Methods block (file I/O); async callers use `asyncio.to_thread`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob with `digest` lives (whether or not it exists)."""
        check_digest(digest)
        return self.blobs_dir / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"no blob sha256:{digest} in {self.root}; upload it first") from None

    def open(self, digest: str) -> IO[bytes]:
        """Open the blob for reading (binary). Raises `BlobNotFound`."""
        try:
            return self.path(digest).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(f"no blob sha256:{digest} in {self.root}; upload it first") from None

    def writer(self, expected: str | None = None) -> _BlobWriter:
        """A streaming writer; call `write` repeatedly, then `commit` (or `abort`)."""
        return _BlobWriter(self, expected)

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        """Store `data`; return its sha256. Raises `DigestMismatch` if `expected` is given and differs."""
        w = self.writer(expected)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def put_file(self, src: str | os.PathLike[str], expected: str | None = None) -> str:
        """Copy the file at `src` into the store; return its sha256. Raises `DigestMismatch`."""
        w = self.writer(expected)
        try:
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def verify(self, digest: str) -> bool:
        """Re-hash a stored blob (e.g. after a disk fault); False if it no longer matches its name."""
        h = hashlib.sha256()
        with self.open(digest) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest() == digest


@dataclass(frozen=True)
class Grant:
    """What one assignment may do: read exactly `digests`, optionally upload results, until `expires_at`."""

    digests: frozenset[str]
    expires_at: float
    upload: bool = False
    subject: str = ""  # e.g. "<job>/<shard>/<car>", for logs and audit only
    max_upload_bytes: int = 0

    def allows_read(self, digest: str) -> bool:
        return digest in self.digests


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantSigner:
    """Issues and verifies grant tokens: `base64url(json payload) "." base64url(HMAC-SHA256(key, payload))`.

    The key is the store's secret (at least 32 bytes); rotating it revokes every outstanding grant.
    """

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("grant signing key must be at least 32 bytes; generate one with os.urandom(32)")
        self._key = key
        self._clock = clock

    def issue_grant(
        self,
        digests: Iterable[str],
        ttl: float,
        *,
        upload: bool = False,
        subject: str = "",
        max_upload_bytes: int = 1 << 30,
    ) -> str:
        """A token allowing reads of exactly `digests` for `ttl` seconds (and result uploads if `upload`)."""
        if not 0 < ttl <= MAX_GRANT_TTL_SECONDS:
            raise ValueError(
                f"grant ttl must be in (0, {MAX_GRANT_TTL_SECONDS}] seconds; grants are short-lived"
            )
        ds = sorted({check_digest(d) for d in digests})
        payload: dict[str, Any] = {
            "v": _TOKEN_VERSION,
            "d": ds,
            "exp": round(self._clock() + ttl, 3),
            "up": bool(upload),
            "sub": subject,
            "max": int(max_upload_bytes) if upload else 0,
        }
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(body)}.{_b64(self._sign(body))}"

    def verify(self, token: str | None) -> Grant:
        """The grant a token carries. Raises `GrantError` if it is missing, forged, malformed or expired."""
        if not token:
            raise GrantError(
                "GrantMissing", "no grant: pass the assignment's grant as ?grant=… or a Bearer token"
            )
        try:
            body_b64, sig_b64 = token.split(".", 1)
            body, sig = _unb64(body_b64), _unb64(sig_b64)
        except ValueError:
            raise GrantError(
                "GrantInvalid", "grant token is malformed; ask for a fresh assignment URL"
            ) from None
        if not hmac.compare_digest(sig, self._sign(body)):
            raise GrantError(
                "GrantInvalid", "grant signature does not verify; ask for a fresh assignment URL"
            )
        try:
            p = json.loads(body)
            if p.get("v") != _TOKEN_VERSION:
                raise ValueError("version")
            grant = Grant(
                digests=frozenset(check_digest(d) for d in p["d"]),
                expires_at=float(p["exp"]),
                upload=bool(p["up"]),
                subject=str(p.get("sub", "")),
                max_upload_bytes=int(p.get("max", 0)),
            )
        except (ValueError, KeyError, TypeError):
            raise GrantError(
                "GrantInvalid", "grant payload is malformed; ask for a fresh assignment URL"
            ) from None
        if self._clock() >= grant.expires_at:
            raise GrantError(
                "GrantExpired", "grant has expired; the assignment must be re-issued to continue"
            )
        return grant

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()


def blob_path(digest: str) -> str:
    """The URL path of a blob on the store's HTTP API."""
    return f"/v1/blobs/sha256/{check_digest(digest)}"


def blob_url(base_url: str, digest: str, token: str) -> str:
    """A per-assignment URL for one blob: `<base>/v1/blobs/sha256/<digest>?grant=<token>`."""
    return f"{base_url.rstrip('/')}{blob_path(digest)}?{GRANT_QUERY_PARAM}={token}"


STORE_KEY = web.AppKey("fleetlet_blob_store", BlobStore)
SIGNER_KEY = web.AppKey("fleetlet_grant_signer", GrantSigner)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


def _token_from(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer ") :].strip()
    return request.query.get(GRANT_QUERY_PARAM)


def _authorize(request: web.Request) -> tuple[str, Grant] | web.Response:
    digest = request.match_info["digest"]
    if not DIGEST_RE.match(digest):
        return _error(
            400, "InvalidDigest", f"{digest!r} is not a sha256 digest (64 lowercase hex characters)"
        )
    try:
        grant = request.app[SIGNER_KEY].verify(_token_from(request))
    except GrantError as e:
        return _error(403, e.reason, str(e))
    return digest, grant


async def _get_blob(request: web.Request) -> web.StreamResponse:
    auth = _authorize(request)
    if isinstance(auth, web.Response):
        return auth
    digest, grant = auth
    # Check the grant before existence: a car must not learn which digests the store holds.
    if not grant.allows_read(digest):
        logger.info("refused read of sha256:%s for %r: not in its grant", digest, grant.subject)
        return _error(
            403, "DigestNotGranted", f"this grant does not cover sha256:{digest}; it was not assigned"
        )
    store = request.app[STORE_KEY]
    path = store.path(digest)
    if not await asyncio.to_thread(path.is_file):
        return _error(404, "NotFound", f"no blob sha256:{digest} in the store")
    # FileResponse streams from disk (sendfile where possible) and answers HEAD and Range requests.
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/octet-stream",
            "Cache-Control": "private, no-store",
            "X-Content-SHA256": digest,
        },
    )


async def _put_blob(request: web.Request) -> web.StreamResponse:
    auth = _authorize(request)
    if isinstance(auth, web.Response):
        return auth
    digest, grant = auth
    if not grant.upload:
        return _error(
            403, "UploadNotGranted", "this grant does not allow uploads; results need an upload grant"
        )
    if request.content_length is not None and request.content_length > grant.max_upload_bytes:
        return _error(413, "TooLarge", f"upload exceeds the grant's limit of {grant.max_upload_bytes} bytes")
    store = request.app[STORE_KEY]
    writer = await asyncio.to_thread(store.writer, digest)
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            if writer.size + len(chunk) > grant.max_upload_bytes:
                await asyncio.to_thread(writer.abort)
                return _error(
                    413, "TooLarge", f"upload exceeds the grant's limit of {grant.max_upload_bytes} bytes"
                )
            await asyncio.to_thread(writer.write, chunk)
        await asyncio.to_thread(writer.commit)
    except DigestMismatch as e:
        logger.info("refused upload for %r: %s", grant.subject, e)
        return _error(400, "DigestMismatch", str(e))
    except BaseException:
        await asyncio.to_thread(writer.abort)
        raise
    logger.info("stored result sha256:%s (%d bytes) for %r", digest, writer.size, grant.subject)
    return web.json_response({"sha256": digest, "size": writer.size}, status=201)


def make_app(store: BlobStore, signer: GrantSigner) -> web.Application:
    """The blob API: `GET|HEAD|PUT /v1/blobs/sha256/{digest}`, every request under a grant."""
    app = web.Application()
    app[STORE_KEY] = store
    app[SIGNER_KEY] = signer
    # GET routes also answer HEAD in aiohttp.
    app.router.add_get("/v1/blobs/sha256/{digest}", _get_blob)
    app.router.add_put("/v1/blobs/sha256/{digest}", _put_blob)
    return app

"""Fetches an artifact (model, input shard, checkpoint) by digest into the car-local cache, verifying it.

What it is for: the agent gets a per-assignment grant URL for each digest its assignment names; `fetch_artifact`
downloads it into `<cache_dir>/<digest>`, hashing while it streams, and renames it into place only when the
bytes match. A file already in the cache was verified when it was written, so a cache hit downloads nothing.

What it must never do: leave a partial or mismatching file where the runtime could load it, follow a URL the
assignment did not give it, or log a grant URL (its query string is a bearer credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import ssl as ssl_module
import tempfile
from pathlib import Path
from typing import IO

import aiohttp

logger = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"^[a-f0-9]{64}$")
_CHUNK = 1 << 20


class FetchError(Exception):
    """The artifact could not be fetched (HTTP error, refused grant, network). Retry with a fresh grant URL."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DigestMismatch(FetchError):
    """The downloaded bytes do not hash to the assigned digest; they were deleted. Reason `DigestMismatch`."""

    reason = "DigestMismatch"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"downloaded bytes hash to sha256:{actual}, not the assigned sha256:{expected}; "
            "the artifact was discarded — the store or the path to it is corrupt"
        )
        self.expected = expected
        self.actual = actual


def cached_path(cache_dir: Path, digest: str) -> Path:
    return Path(cache_dir) / digest


async def fetch_artifact(
    url: str,
    digest: str,
    cache_dir: str | os.PathLike[str],
    *,
    session: aiohttp.ClientSession | None = None,
    http_timeout: aiohttp.ClientTimeout | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> Path:
    """Return the local path of the artifact `digest`, downloading it from the grant `url` unless cached.

    Raises `DigestMismatch` (partial file deleted) or `FetchError` (HTTP status in `.status`, e.g. 403 when
    the grant expired or does not cover the digest: ask the shim for a fresh assignment URL).
    """
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest (64 lowercase hex characters)")
    cache = Path(cache_dir)
    final = cached_path(cache, digest)
    if await asyncio.to_thread(final.is_file):
        logger.debug("sha256:%s is cached", digest)
        return final
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    fd, tmp_name = await asyncio.to_thread(
        tempfile.mkstemp, dir=cache, prefix=f".{digest[:12]}-", suffix=".part"
    )
    tmp = Path(tmp_name)
    f = os.fdopen(fd, "wb")
    h = hashlib.sha256()
    own_session = session is None
    client = session or aiohttp.ClientSession()
    try:
        try:
            async with client.get(
                url, timeout=http_timeout or aiohttp.ClientTimeout(total=600, sock_read=60),
                ssl=ssl if ssl is not None else True,  # True: the session's own TLS settings
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise FetchError(
                        f"fetching sha256:{digest} failed with HTTP {resp.status}: {detail}",
                        status=resp.status,
                    )
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FetchError(f"fetching sha256:{digest} failed: {type(e).__name__}: {e}; retry later") from e
        actual = h.hexdigest()
        if actual != digest:
            raise DigestMismatch(digest, actual)
        await asyncio.to_thread(_commit, f, tmp, final)
        logger.info("fetched sha256:%s into the cache", digest)
        return final
    finally:
        if not f.closed:
            f.close()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(tmp.unlink)
        if own_session:
            await client.close()


def _commit(f: IO[bytes], tmp: Path, final: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.chmod(tmp, 0o644)  # the runner may run as another uid; it only reads
    os.replace(tmp, final)

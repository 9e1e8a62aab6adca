"""The car's client of the artifact store: fetch what an assignment names by digest, upload what it produced.

What it is for: everything a shard needs (model, input, a checkpoint to resume from) is fetched through the
assignment's grant into the car's content-addressed cache and verified against its sha256 before anything may
load it (``runtime.fetch``); checkpoints and results are uploaded under the same grant, retried with backoff
when the failure may pass. When the store is the shim's own listener (the embedded store), the car presents
its own certificate, as on the link; another store (S3-compatible) gets the session's default TLS.

Failures become ``ArtifactFailure`` with a pod-status reason (``FetchFailed``, ``DigestMismatch``,
``UploadFailed``) and a message a person can act on.

What it must never do: log, or put in an error message, a grant token or a grant URL (bearer credentials:
every text that leaves this module is scrubbed of them), keep bytes that do not match their digest, or fetch
anything the assignment did not name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from fleetlet.artifacts import blob_url
from fleetlet.carlink.protocol import Grant

from .runtime import DigestMismatch, FetchError, fetch_artifact

log = logging.getLogger(__name__)

_URL = re.compile(r"https?://\S+")


class ArtifactFailure(Exception):
    """An artifact could not be fetched or stored; ``reason`` is the pod status reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ArtifactClient:
    """Fetches and uploads one car's artifacts. ``session`` is called for the aiohttp session to use (the
    agent's, possibly shared by a simulator's many cars)."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        cache_dir: Path,
        *,
        car_ssl: ssl.SSLContext,
        shim_url: str,
        timeout_seconds: float = 600.0,
        fetch_attempts: int = 2,
        upload_attempts: int = 3,
        retry_base_seconds: float = 1.0,
    ) -> None:
        self._session = session
        self.cache_dir = cache_dir
        self._car_ssl = car_ssl
        self._shim = urlsplit(shim_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, sock_read=60)
        self.fetch_attempts = max(1, fetch_attempts)
        self.upload_attempts = max(1, upload_attempts)
        self.retry_base_seconds = retry_base_seconds

    def _ssl_for(self, base_url: str) -> ssl.SSLContext | None:
        """The car's own mTLS context when the store is the shim's car listener (which demands a car
        certificate); None (the session's default) for another store."""
        store = urlsplit(base_url)
        return self._car_ssl if (store.hostname, store.port) == (self._shim.hostname, self._shim.port) else None

    async def fetch(self, grant: Grant, digest: str, what: str) -> Path:
        """The verified local copy of ``digest`` (from the cache, or fetched through ``grant``)."""
        url = blob_url(grant.base_url, digest, grant.token)
        problem = ""
        for attempt in range(self.fetch_attempts):
            if attempt:
                await asyncio.sleep(self.retry_base_seconds * 2 ** (attempt - 1))
            try:
                return await fetch_artifact(
                    url, digest, self.cache_dir, session=self._session(), ssl=self._ssl_for(grant.base_url),
                    http_timeout=self._timeout,
                )  # fmt: skip
            except DigestMismatch as e:
                raise ArtifactFailure("DigestMismatch", f"{what}: {_scrub(str(e), grant)}") from None
            except FetchError as e:
                problem = _scrub(str(e), grant)
                if e.status is not None and e.status < 500 and e.status != 429:
                    break  # refused, missing or not granted: asking again cannot help
        raise ArtifactFailure("FetchFailed", f"{what}: {problem}")

    async def upload(self, grant: Grant, digest: str, data: bytes) -> None:
        """Store ``data`` (which hashes to ``digest``) under ``grant``; retried while retrying may help."""
        url = blob_url(grant.base_url, digest, grant.token)
        ctx = self._ssl_for(grant.base_url)
        problem = ""
        for attempt in range(self.upload_attempts):
            if attempt:
                await asyncio.sleep(min(self.retry_base_seconds * 2**attempt, 10.0))
            try:
                # ssl=True: the session's own TLS settings (another store than the shim's listener)
                async with self._session().put(url, data=data, timeout=self._timeout, ssl=ctx or True) as resp:
                    if resp.status in (200, 201):
                        return
                    problem = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    if resp.status in (400, 403, 413):
                        break  # the grant or the bytes are wrong: retrying cannot help
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
        raise ArtifactFailure(
            "UploadFailed", f"uploading sha256:{digest} to the artifact store failed: {_scrub(problem, grant)}"
        )


def _scrub(text: str, grant: Grant) -> str:
    """``text`` with the grant's token and any URL (which may carry it) taken out."""
    return _URL.sub("<artifact-store-url>", text.replace(grant.token, "<grant>"))

"""An informer: list once, then watch from that resourceVersion, relisting only when the server says the
version is too old (410). Events go to one async callback in order. Never lists periodically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .client import ApiError, KubeClient, WatchEvent

log = logging.getLogger(__name__)

Handler = Callable[[WatchEvent], Awaitable[None]]


class Informer:
    """Keeps ``handler`` told about every object at ``path`` (list + watch), with reconnect backoff.

    ``synced`` is set once the initial list has been delivered (as ADDED events, then a SYNCED marker).
    """

    def __init__(self, kube: KubeClient, path: str, handler: Handler, *, page_size: int = 500, **params: Any):
        self.kube = kube
        self.path = path
        self.handler = handler
        self.params = params
        self.page_size = page_size
        self.synced = asyncio.Event()
        self.resource_version: str | None = None

    async def _list(self) -> None:
        cont: str | None = None
        seen: list[dict[str, Any]] = []
        while True:
            page = await self.kube.list(self.path, limit=self.page_size, **{"continue": cont}, **self.params)
            seen.extend(page.get("items", []))
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                self.resource_version = page["metadata"]["resourceVersion"]
                break
        for obj in seen:
            await self.handler(WatchEvent("ADDED", obj))
        await self.handler(WatchEvent("SYNCED", {}))
        self.synced.set()

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                async for event in self.kube.watch(self.path, self.resource_version, **self.params):
                    rv = event.object.get("metadata", {}).get("resourceVersion")
                    if rv:
                        self.resource_version = rv
                    if event.type != "BOOKMARK":
                        await self.handler(event)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.gone:
                    log.info("watch %s: resourceVersion too old, relisting", self.path)
                    self.resource_version = None
                    continue
                log.warning("watch %s failed: %s; retrying in %.1fs", self.path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
            except Exception as exc:  # transport errors: back off, keep the version, resume
                log.warning("watch %s interrupted: %r; retrying in %.1fs", self.path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)

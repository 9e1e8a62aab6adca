"""An informer: list, then watch from that resourceVersion, keeping a store of what the API server holds.

What it is for: a controller reads objects from the informer's store (never from the API server on its hot path)
and is told which keys changed. On every (re)list — the first start, and whenever the server says the watch's
resourceVersion is too old (410 Gone) — the new list is diffed against the store, so an object that was deleted
while the watch was down is reported DELETED instead of lingering forever. A ``transform`` trims each object
before it is stored (a shim serving 5,000 cars keeps a few fields of each pod, not the whole body) and a
``keep`` predicate drops objects the caller does not care about (treated as absent: if one stops matching, it
is reported DELETED). Secondary indexes (``add_index``) answer "the pods on this Node" without a scan.

Handlers are plain synchronous functions called in event order on the event loop. They should only enqueue
keys; one that raises is logged and the others still run, and the store is already up to date, so a controller
that re-reads the store loses nothing.

What it must never do: list periodically, hold an object the server no longer has after a relist, or let a
handler's failure stop the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from .client import ApiError, KubeClient

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]


def object_key(obj: Obj) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones (client-go's key)."""
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


def split_key(key: str) -> tuple[str | None, str]:
    ns, sep, name = key.rpartition("/")
    return (ns if sep else None), name


def drop_managed_fields(obj: Obj) -> Obj:
    """The default transform: managedFields are most of a small object and no controller reads them."""
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


@dataclass(frozen=True, slots=True)
class Change:
    """One change to the store. For DELETED, ``obj`` is the last state the informer knew."""

    type: ChangeType
    key: str
    obj: Obj
    old: Obj | None = None


Handler = Callable[[Change], None]
IndexFn = Callable[[Obj], Iterable[str]]


class Informer:
    """List + watch one resource path into a store; see the module docstring.

    ``path`` is a collection path (``resource_path(...)``); extra keyword arguments are list/watch query
    parameters (``labelSelector``, ``fieldSelector``).
    """

    def __init__(
        self,
        kube: KubeClient,
        path: str,
        *,
        name: str | None = None,
        transform: Callable[[Obj], Obj] = drop_managed_fields,
        keep: Callable[[Obj], bool] | None = None,
        page_size: int = 500,
        watch_timeout_s: int = 290,
        max_backoff_s: float = 30.0,
        **params: Any,
    ) -> None:
        self.kube = kube
        self.path = path
        self.name = name or path
        self.params = params
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.relists = 0  # lists after the first: each one a watch that could not resume
        self._transform = transform
        self._keep = keep
        self._store: dict[str, Obj] = {}
        self._handlers: list[Handler] = []
        self._index_fns: dict[str, IndexFn] = {}
        self._indexes: dict[str, dict[str, set[str]]] = {}
        self._indexed: dict[str, dict[str, tuple[str, ...]]] = {}

    # ---- reading -----------------------------------------------------------------------------------------

    def get(self, key: str) -> Obj | None:
        return self._store.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> Iterator[str]:
        return iter(list(self._store))

    def items(self) -> Iterator[tuple[str, Obj]]:
        return iter(list(self._store.items()))

    def add_index(self, name: str, fn: IndexFn) -> None:
        """Maintain ``by_index(name, value)``: the keys whose object ``fn`` maps to ``value``. Add before run()."""
        self._index_fns[name] = fn
        self._indexes[name] = {}
        self._indexed[name] = {}
        for key, obj in self._store.items():
            self._index(name, key, obj)

    def by_index(self, name: str, value: str) -> frozenset[str]:
        return frozenset(self._indexes[name].get(value, ()))

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    # ---- running -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled; transport errors back off and resume from the last version."""
        backoff = 0.5
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                async for event in self.kube.watch(
                    self.path, self.resource_version, timeout_s=self.watch_timeout_s, **self.params
                ):
                    rv = event.object.get("metadata", {}).get("resourceVersion")
                    if event.type == "BOOKMARK":
                        if rv:
                            self.resource_version = rv
                        continue
                    self._apply(event.type, event.object)
                    if rv:
                        self.resource_version = rv
                    backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.gone:
                    log.info("informer %s: resourceVersion too old, relisting", self.name)
                    self.resource_version = None
                    continue
                log.warning("informer %s: watch failed: %s; retrying in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception as exc:  # transport errors: keep the version and resume the watch
                log.warning("informer %s: watch interrupted: %r; retrying in %.1fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _relist(self) -> None:
        items: list[Obj] = []
        cont: str | None = None
        while True:
            try:
                page = await self.kube.list(self.path, limit=self.page_size, **{"continue": cont}, **self.params)
            except ApiError as exc:
                if exc.gone and cont is not None:  # the continue token expired mid-list: start over
                    items, cont = [], None
                    continue
                raise
            items.extend(page.get("items", []))
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                rv = page["metadata"]["resourceVersion"]
                break
        if self.synced.is_set():
            self.relists += 1
        seen: set[str] = set()
        for obj in items:
            seen.add(object_key(obj))
            self._apply("MODIFIED" if object_key(obj) in self._store else "ADDED", obj)
        for key in [k for k in self._store if k not in seen]:  # gone while we were not watching
            self._remove(key)
        self.resource_version = rv
        if not self.synced.is_set():
            log.info("informer %s: synced %d objects", self.name, len(self._store))
        self.synced.set()

    # ---- the store ---------------------------------------------------------------------------------------

    def _apply(self, kind: str, raw: Obj) -> None:
        key = object_key(raw)
        if kind == "DELETED":
            self._remove(key)
            return
        if self._keep is not None and not self._keep(raw):
            self._remove(key)
            return
        obj = self._transform(raw)
        old = self._store.get(key)
        if old is not None and _rv(old) == _rv(obj) and _rv(obj):
            return  # the relist repeats what the watch already delivered
        self._store[key] = obj
        for name in self._index_fns:
            self._index(name, key, obj)
        self._notify(Change("ADDED" if old is None else "MODIFIED", key, obj, old))

    def _remove(self, key: str) -> None:
        old = self._store.pop(key, None)
        if old is None:
            return
        for name in self._index_fns:
            self._unindex(name, key)
        self._notify(Change("DELETED", key, old, old))

    def _index(self, name: str, key: str, obj: Obj) -> None:
        values = tuple(self._index_fns[name](obj))
        if self._indexed[name].get(key) == values:
            return
        self._unindex(name, key)
        index = self._indexes[name]
        for value in values:
            index.setdefault(value, set()).add(key)
        self._indexed[name][key] = values

    def _unindex(self, name: str, key: str) -> None:
        index = self._indexes[name]
        for value in self._indexed[name].pop(key, ()):
            keys = index.get(value)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[value]

    def _notify(self, change: Change) -> None:
        for handler in self._handlers:
            try:
                handler(change)
            except Exception:  # one handler's bug must not starve the others or stop the watch
                log.exception("informer %s: a handler failed on %s %s", self.name, change.type, change.key)


def _rv(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion") or "")

"""A lean asyncio Kubernetes client on aiohttp and the controller toolkit built on it.

- ``client``: raw JSON in and out (no model objects on the hot path), server-side apply, status subresources,
  watches with bookmarks, retry as a value passed in. Why not the official client: it spends most of its time
  turning JSON into objects (kubernetes-client/python#1921) and is synchronous; a shim renewing thousands of
  Leases cannot afford either.
- ``informer``: list + watch into a store whose relist diffs old against new.
- ``workqueue`` and ``controller``: keyed work queue with per-key backoff, and workers running an idempotent
  ``sync(key)`` that says done, requeue, retry-later or give-up. The shim and the operator are built on these.
"""

from .client import ApiError, KubeClient, KubeConfig, RetryPolicy, WatchEvent, resource_path
from .controller import Controller, ControllerObserver, GiveUp, Requeue, Retry
from .informer import Change, Informer, object_key, split_key
from .workqueue import Backoff, WorkQueue

__all__ = [
    "ApiError",
    "Backoff",
    "Change",
    "Controller",
    "ControllerObserver",
    "GiveUp",
    "Informer",
    "KubeClient",
    "KubeConfig",
    "Requeue",
    "Retry",
    "RetryPolicy",
    "WatchEvent",
    "WorkQueue",
    "object_key",
    "resource_path",
    "split_key",
]

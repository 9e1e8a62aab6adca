"""A lean asyncio Kubernetes client on aiohttp: raw JSON in and out (no model objects on the hot path),
server-side apply, status subresources, watches with bookmarks, and retry as a value passed in.

Why not the official client: it spends most of its time turning JSON into objects
(kubernetes-client/python#1921) and is synchronous; a shim renewing thousands of Leases cannot afford either.
"""

from .client import ApiError, KubeClient, KubeConfig, RetryPolicy, WatchEvent

__all__ = ["ApiError", "KubeClient", "KubeConfig", "RetryPolicy", "WatchEvent"]

"""The shim's end of the car link: a TLS WebSocket server that cars dial, one named peer per car.

The shim implements ``LinkHandler`` and calls ``LinkServer.send``; everything about sockets, certificates,
refusals and heartbeats stays inside this package. It never talks to the Kubernetes API.
"""

from .credentials import CAR_ORGANIZATION, CarIdentity, CredentialError, Revocations, server_ssl_context
from .server import LinkConfig, LinkHandler, LinkMetrics, LinkServer

__all__ = [
    "CAR_ORGANIZATION",
    "CarIdentity",
    "CredentialError",
    "LinkConfig",
    "LinkHandler",
    "LinkMetrics",
    "LinkServer",
    "Revocations",
    "server_ssl_context",
]

"""The operator's lifecycle under kopf: settings, login, start and stop of the operator's own parts, probes."""

from __future__ import annotations

from typing import Any

import kopf

from ..settings import OperatorSettings


def configure(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf as it scales (OPERATOR.md): one standalone replica, a deliberate worker limit, timeouts on every call,
    no Event per log line."""
    settings.peering.standalone = True
    settings.peering.mandatory = False
    settings.scanning.disabled = True  # no CRD/namespace discovery watches: the resources are fixed
    settings.queueing.worker_limit = ours.kopf_workers
    settings.networking.request_timeout = ours.api_timeout_s
    settings.networking.connect_timeout = 10.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Events about FleetJobs are the operator's own (aggregated, rate-limited); kopf posts none.
    settings.posting.enabled = False
    settings.persistence.finalizer = "fleetlet.io/kopf"  # unused: no handler here needs one


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, memo.app.settings)
        await memo.app.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.app.stop()

    @kopf.on.login(registry=registry)
    def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
        return memo.app.connection_info()  # type: ignore[no-any-return]

    @kopf.on.probe(id="operator", registry=registry)
    def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        return memo.app.healthy()  # type: ignore[no-any-return]

"""FleetJobs, watched statelessly: ``on.event`` keeps no diff base and no progress in annotations or status (it
writes nothing at all); the controller behind it writes the job's status once per reconcile itself."""

from __future__ import annotations

from typing import Any

import kopf


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.event("fleetlet.io", "v1alpha1", "fleetjobs", registry=registry)
    async def fleetjob_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo.app.jobs.observe(event)

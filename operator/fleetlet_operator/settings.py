"""The operator's settings: one frozen value built from the command line and passed to every part."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .reconcile.shards import PlanSettings


@dataclass(frozen=True)
class OperatorSettings:
    artifact_dir: Path
    file_roots: tuple[Path, ...] = ()  # directories a FleetJob's file:// model or input may be read from
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9091
    job_workers: int = 4  # FleetJobs reconciled at once (each reconcile handles all of a job's shards)
    vehicle_workers: int = 4
    kopf_workers: int = 16  # kopf's per-object workers (settings.queueing.worker_limit)
    create_concurrency: int = 32  # pod creations in flight per job reconcile
    unreachable_toleration_s: int = 120  # how long a shard waits for a car whose link dropped
    api_timeout_s: float = 30.0
    plan: PlanSettings = field(default_factory=PlanSettings)

"""``fleetlet-operator``: FleetJobs become verified results on parked cars.

Run exactly one replica (a Deployment with strategy Recreate): kopf's peering is not leader election. Scale out
by sharding (``--namespace``), not by replicas.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import kopf

from . import handlers
from .app import OperatorApp
from .reconcile.shards import PlanSettings
from .settings import OperatorSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlet-operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    p.add_argument("--namespace", action="append", default=[],
                   help="watch FleetJobs in this namespace only (repeatable; default: every namespace)")
    p.add_argument("--artifact-dir", required=True, type=Path,
                   help="directory of the content-addressed artifact store (shared with the shim)")
    p.add_argument("--file-root", action="append", default=[], type=Path, metavar="DIR",
                   help="a directory whose files a FleetJob may name as file:// model or input (repeatable; "
                        "default none: only fleetlet://sha256/ artifacts already in the store)")
    p.add_argument("--metrics-address", default="127.0.0.1:9091", help="host:port of /metrics, /healthz, /readyz")
    p.add_argument("--job-workers", type=int, default=4, help="FleetJobs reconciled at once")
    p.add_argument("--kopf-workers", type=int, default=16, help="kopf's per-object worker limit")
    p.add_argument("--create-concurrency", type=int, default=32, help="pod creations in flight per reconcile")
    p.add_argument("--unreachable-toleration-seconds", type=int, default=120,
                   help="how long a shard waits for a car whose link dropped before it resumes elsewhere")
    p.add_argument("--lost-car-slack-seconds", type=int, default=60,
                   help="a shard on a car whose link has been down for the unreachable toleration plus this long "
                        "resumes elsewhere even if Kubernetes has not evicted it (the node lifecycle controller "
                        "stops evicting in a zone where most Nodes are NotReady); -1: rely on Kubernetes alone")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # kopf's per-object chatter
    host, _, port = args.metrics_address.rpartition(":")
    settings = OperatorSettings(
        artifact_dir=args.artifact_dir, file_roots=tuple(args.file_root), kubeconfig=args.kubeconfig or os.environ.get("KUBECONFIG"),
        namespaces=tuple(args.namespace), metrics_host=host or "127.0.0.1", metrics_port=int(port),
        job_workers=args.job_workers, kopf_workers=args.kopf_workers, create_concurrency=args.create_concurrency,
        unreachable_toleration_s=args.unreachable_toleration_seconds,
        plan=PlanSettings(lost_car_s=args.unreachable_toleration_seconds + args.lost_car_slack_seconds
                          if args.lost_car_slack_seconds >= 0 else None),
    )

    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    memo = kopf.Memo(app=OperatorApp(settings))
    kopf.run(registry=registry, memo=memo, standalone=True, clusterwide=not settings.namespaces,
             namespaces=settings.namespaces)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

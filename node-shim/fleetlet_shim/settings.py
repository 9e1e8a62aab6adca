"""The shim's settings: one frozen value built from the command line and passed to every part."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShimSettings:
    shim_id: str = "shim-0"
    replica: int = 0
    replicas: int = 1
    replica_urls: tuple[str, ...] = ()  # the car-link URL of every replica (index = replica), for redirects
    namespace: str = "fleetlet-system"  # where the shim's own objects live (the car revocation list)
    advertise_address: str = "127.0.0.1"  # the Nodes' InternalIP: where the API server reaches our kubelet API
    kubelet_port: int = 10250
    artifact_base_url: str = "https://127.0.0.1:8443"  # where cars fetch artifacts (the link listener)
    lease_duration_s: int = 40
    # The kubelet renews every 10 s (6 writes/min). 25 s keeps an idle car under 3 API writes a minute
    # while a node-monitor grace period of 50 s still tolerates one late renewal.
    lease_renew_interval_s: float = 25.0
    status_report_interval_s: float = 300.0  # kubelet's nodeStatusReportFrequency
    telemetry_min_interval_s: float = 60.0  # per car, unless a safety-relevant field or a condition changed
    pod_progress_interval_s: float = 30.0  # a running pod's progress is written at most this often
    max_pods_per_car: int = 4
    grant_ttl_s: float = 6 * 3600
    log_lines_per_pod: int = 5000
    reconnect_grace_s: float = 2.0  # a link that is back within this long is not reported NotReady
    stop_resend_s: float = 15.0  # a stop the car has not acted on is sent again after this long
    deletion_slack_s: float = 10.0  # after a deletion's grace, a car that never confirmed is not waited for
    workers: dict[str, int] = field(default_factory=lambda: {
        "leases": 48, "nodes": 32, "carstate": 64, "pods": 32, "telemetry": 8, "events": 2,
    })  # API writes in flight per controller; their sum bounds the connection pool

    @property
    def api_concurrency(self) -> int:
        return sum(self.workers.values())

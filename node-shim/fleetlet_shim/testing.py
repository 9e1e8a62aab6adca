"""Run a real fleetlet-shim process against a local control plane, for tests, benchmarks and the demo.

The shim runs as its own process under its own RBAC identity (CN=fleetlet-shim), exactly as deployed; cars get
real client certificates from a fleet CA made here. Never used in production paths.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlet_car.sim import make_vehicle_specs

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.localcluster import LocalCluster
from fleetlet.localcluster.cluster import free_port
from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority, KeyPair
from fleetlet_shim import rbac


@dataclass
class ShimHandle:
    link_url: str
    artifact_url: str
    metrics_url: str
    fleet_ca: CertificateAuthority
    fleet_ca_file: Path
    artifact_dir: Path
    grant_key: bytes
    process: subprocess.Popen[bytes]
    log_path: Path
    cert_dir: Path
    args: list[str]

    def car_cert(self, name: str) -> tuple[Path, Path]:
        pair = self.fleet_ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True)
        return pair.write(self.cert_dir, name)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> None:
        """SIGTERM the shim and wait (SIGKILL after 15 s)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> None:
        """Stop the shim and start a new process with the same flags (ports, certificates, store)."""
        self.stop()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(self)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def vehiclenodes(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """VehicleNode bodies for ``n`` simulated cars named ``<prefix>-NNNNNN``."""
    bodies = []
    for i, spec in enumerate(make_vehicle_specs(n, seed)):
        name = f"{prefix}-{i:06d}"
        spec = spec.model_copy(update={"vehicle_id": name})
        vn = VehicleNode(metadata={"name": name}, spec=spec)  # type: ignore[arg-type]
        bodies.append(vn.wire(exclude={"status"}))
    return bodies


def apply_objects(cluster: Any, objects: list[dict[str, Any]]) -> None:
    """``kubectl apply --server-side`` of ``objects`` through ``cluster.kubectl`` (LocalCluster or a test's)."""
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": objects}))


def start_shim(
    cluster: Any, work: Path, lease_renew_s: float = 5.0, local: LocalCluster | None = None,
    extra_args: list[str] | None = None, heartbeat_s: float = 5.0, dead_after_s: float = 12.0,
) -> Iterator[ShimHandle]:
    """Start the shim (a generator: the shim stops when it is closed). ``cluster`` has ``kubectl(*args, input=)``;
    ``local`` is the LocalCluster whose CA signs the kubelet API certificate (default ``cluster.local``)."""
    handle = launch_shim(cluster, work, lease_renew_s, local, extra_args, heartbeat_s, dead_after_s)
    try:
        yield handle
    finally:
        handle.stop()


def launch_shim(
    cluster: Any, work: Path, lease_renew_s: float = 5.0, local: LocalCluster | None = None,
    extra_args: list[str] | None = None, heartbeat_s: float = 5.0, dead_after_s: float = 12.0,
) -> ShimHandle:
    """Start the shim as its own process (a new session: it outlives the caller unless stopped)."""
    local = local or getattr(cluster, "local", None)
    if local is None:
        raise RuntimeError(
            "the shim integration tests run fleetlet-shim on this machine, which a kind cluster's API server "
            "cannot reach for kubectl logs; run them against the embedded control plane (unset "
            "FLEETLET_TEST_KUBECONFIG)"
        )
    work.mkdir(parents=True, exist_ok=True)
    apply_objects(cluster, rbac.manifests())
    kubeconfig = local.user_kubeconfig("fleetlet-shim")
    # Cars trust the fleet CA; the shim's link cert comes from it too.
    fleet_ca = CertificateAuthority.create("fleetlet-fleet-ca")
    fleet_ca_file, _ = fleet_ca.pair.write(work, "fleet-ca")
    fleet_ca.issue("fleetlet-shim", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",)).write(
        work, "link"
    )
    # The kubelet API's serving cert must be signed by the cluster CA (--kubelet-certificate-authority).
    cluster_ca = CertificateAuthority(KeyPair.read(local.pki_dir, "ca"))
    cluster_ca.issue("fleetlet-shim-kubelet", server=True, ip_addresses=("127.0.0.1",)).write(work, "kubelet")
    grant_key = os.urandom(32)
    (work / "grant.key").write_bytes(grant_key)
    link_port, kubelet_port, metrics_port = free_port(), free_port(), free_port()
    log_path = work / "shim.log"
    args = [
        sys.executable, "-m", "fleetlet_shim",
        "--kubeconfig", str(kubeconfig),
        "--shim-id", "shim-test",
        "--advertise-address", "127.0.0.1",
        "--link-address", f"127.0.0.1:{link_port}",
        "--link-cert", str(work / "link.crt"), "--link-key", str(work / "link.key"),
        "--car-ca", str(fleet_ca_file),
        "--kubelet-port", str(kubelet_port),
        "--kubelet-cert", str(work / "kubelet.crt"), "--kubelet-key", str(work / "kubelet.key"),
        "--kubelet-client-ca", str(local.pki_dir / "ca.crt"),
        "--artifact-dir", str(work / "artifacts"),
        "--grant-key-file", str(work / "grant.key"),
        "--metrics-address", f"127.0.0.1:{metrics_port}",
        "--lease-renew-seconds", str(lease_renew_s),
        "--link-heartbeat-seconds", str(heartbeat_s), "--link-dead-after-seconds", str(dead_after_s),
        *(extra_args or []),
    ]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    handle = ShimHandle(
        link_url=f"wss://127.0.0.1:{link_port}/v1/link",
        artifact_url=f"https://127.0.0.1:{link_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        fleet_ca=fleet_ca,
        fleet_ca_file=fleet_ca_file,
        artifact_dir=work / "artifacts",
        grant_key=grant_key,
        process=proc,
        log_path=log_path,
        cert_dir=work / "cars",
        args=args,
    )
    try:
        _wait_ready(handle)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: ShimHandle, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if handle.process.poll() is not None:
            raise RuntimeError(f"fleetlet-shim exited with {handle.process.returncode}:\n{handle.log_tail()}")
        try:
            handle.metrics()
            return
        except OSError:
            if time.monotonic() > deadline:
                handle.process.kill()
                raise RuntimeError(f"fleetlet-shim did not start:\n{handle.log_tail()}") from None
            time.sleep(0.2)

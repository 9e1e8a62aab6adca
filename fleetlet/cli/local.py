"""Fleetlet's components as local processes next to a local control plane: what ``fleetlet demo`` runs, and what
the integration tests and benchmarks start.

Each component runs as its own process under its own RBAC identity (a client certificate from the local
cluster's CA: CN=fleetlet-shim), exactly as deployed; every listener binds to 127.0.0.1; cars get real client
certificates from a fleet CA made here. This is the CLI layer's: it may import every component.
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
from fleetlet_shim import rbac

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.localcluster import LocalCluster
from fleetlet.localcluster.cluster import free_port
from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority, KeyPair

SHIM_NAMESPACE = "fleetlet-system"


@dataclass
class ComponentHandle:
    """A Fleetlet component running as its own process (a new session), with its metrics/health endpoint."""

    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str
    args: list[str]

    def metrics(self, timeout_s: float = 5.0) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=timeout_s).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def healthy(self, path: str = "/readyz") -> bool:
        try:
            return bool(urllib.request.urlopen(self.metrics_url.replace("/metrics", path), timeout=5).status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the process and wait (SIGKILL after 15 s)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL the process at once: no shutdown code runs (a crash, an OOM kill, a lost machine)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def start_again(self) -> None:
        """Start a new process with the same flags after stop() or kill()."""
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(self)

    def restart(self) -> None:
        """Stop gracefully and start again."""
        self.stop()
        self.start_again()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class ShimHandle(ComponentHandle):
    link_url: str = ""
    artifact_url: str = ""
    fleet_ca: CertificateAuthority | None = None
    fleet_ca_file: Path = Path()
    artifact_dir: Path = Path()
    grant_key: bytes = b""
    cert_dir: Path = Path()

    def car_cert(self, name: str) -> tuple[Path, Path]:
        assert self.fleet_ca is not None
        pair = self.fleet_ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True)
        return pair.write(self.cert_dir, name)


@dataclass
class FleetCredentials:
    """The fleet CA (cars trust it for the shim; it signs every car's client certificate) and the grant key:
    shared by every replica of one fleet."""

    ca: CertificateAuthority
    ca_file: Path
    grant_key: bytes

    @classmethod
    def create(cls, directory: Path) -> FleetCredentials:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("fleetlet-fleet-ca")
        ca_file, _ = ca.pair.write(directory, "fleet-ca")
        return cls(ca, ca_file, os.urandom(32))


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


def ensure_namespace(cluster: Any, name: str) -> None:
    apply_objects(cluster, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}])


def start_shim(cluster: Any, work: Path, **kwargs: Any) -> Iterator[ShimHandle]:
    """``launch_shim`` as a generator (pytest fixtures): the shim stops when it is closed."""
    handle = launch_shim(cluster, work, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


def launch_shim(
    cluster: Any, work: Path, *, lease_renew_s: float = 5.0, local: LocalCluster | None = None,
    extra_args: list[str] | None = None, heartbeat_s: float = 5.0, dead_after_s: float = 12.0,
    credentials: FleetCredentials | None = None, artifact_dir: Path | None = None, kubeconfig: Path | None = None,
    replica: int = 0, replicas: int = 1, link_ports: list[int] | None = None, user: str = "fleetlet-shim",
    rbac_drop: tuple[tuple[str, str], ...] = (), shim_id: str | None = None,
) -> ShimHandle:
    """Start ``fleetlet-shim`` as its own process (a new session: it outlives the caller unless stopped).

    ``cluster`` has ``kubectl(*args, input=)``; ``local`` is the LocalCluster whose CA signs the kubelet API
    certificate and the shim's user (default ``cluster.local``). Replicas of one fleet share ``credentials``,
    ``artifact_dir`` and ``link_ports`` (one port per replica: each is told where the others are, to redirect
    cars). ``kubeconfig`` points the shim elsewhere (a fault-injecting proxy); ``rbac_drop`` withholds verbs.
    """
    local = local or getattr(cluster, "local", None)
    if local is None:
        raise RuntimeError(
            "the shim integration tests run fleetlet-shim on this machine, which a kind cluster's API server "
            "cannot reach for kubectl logs; run them against the embedded control plane (unset "
            "FLEETLET_TEST_KUBECONFIG)"
        )
    work.mkdir(parents=True, exist_ok=True)
    ensure_namespace(cluster, SHIM_NAMESPACE)
    apply_objects(cluster, rbac.manifests(subject_name=user, namespace=SHIM_NAMESPACE, drop=rbac_drop,
                                          role_name=user))
    kubeconfig = kubeconfig or local.user_kubeconfig(user)
    creds = credentials or FleetCredentials.create(work)
    creds.ca.issue("fleetlet-shim", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",)).write(
        work, "link"
    )
    # The kubelet API's serving cert must be signed by the cluster CA (--kubelet-certificate-authority).
    cluster_ca = CertificateAuthority(KeyPair.read(local.pki_dir, "ca"))
    cluster_ca.issue("fleetlet-shim-kubelet", server=True, ip_addresses=("127.0.0.1",)).write(work, "kubelet")
    (work / "grant.key").write_bytes(creds.grant_key)
    ports = link_ports or [free_port() for _ in range(replicas)]
    link_port, kubelet_port, metrics_port = ports[replica], free_port(), free_port()
    urls = ",".join(f"wss://127.0.0.1:{p}/v1/link" for p in ports)
    log_path = work / "shim.log"
    store = artifact_dir or work / "artifacts"
    args = [
        sys.executable, "-m", "fleetlet_shim",
        "--kubeconfig", str(kubeconfig),
        "--shim-id", shim_id or f"shim-test-{replica}",
        "--namespace", SHIM_NAMESPACE,
        "--replica", str(replica), "--replicas", str(replicas), "--replica-urls", urls,
        "--advertise-address", "127.0.0.1",
        "--link-address", f"127.0.0.1:{link_port}",
        "--link-cert", str(work / "link.crt"), "--link-key", str(work / "link.key"),
        "--car-ca", str(creds.ca_file),
        "--kubelet-address", f"127.0.0.1:{kubelet_port}",
        "--kubelet-cert", str(work / "kubelet.crt"), "--kubelet-key", str(work / "kubelet.key"),
        "--kubelet-client-ca", str(local.pki_dir / "ca.crt"),
        "--artifact-dir", str(store),
        "--grant-key-file", str(work / "grant.key"),
        "--metrics-address", f"127.0.0.1:{metrics_port}",
        "--lease-renew-seconds", str(lease_renew_s),
        "--link-heartbeat-seconds", str(heartbeat_s), "--link-dead-after-seconds", str(dead_after_s),
        *(extra_args or []),
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    handle = ShimHandle(
        process=proc,
        log_path=log_path,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        args=args,
        link_url=f"wss://127.0.0.1:{link_port}/v1/link",
        artifact_url=f"https://127.0.0.1:{link_port}",
        fleet_ca=creds.ca,
        fleet_ca_file=creds.ca_file,
        artifact_dir=store,
        grant_key=creds.grant_key,
        cert_dir=work / "cars",
    )
    try:
        _wait_ready(handle)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(handle: ComponentHandle, timeout_s: float = 120.0) -> None:
    name = Path(handle.args[2]).name if len(handle.args) > 2 else "component"
    deadline = time.monotonic() + timeout_s
    while True:
        if handle.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {handle.process.returncode}:\n{handle.log_tail()}")
        if handle.healthy("/readyz"):
            return
        if time.monotonic() > deadline:
            handle.process.kill()
            raise RuntimeError(f"{name} did not become ready:\n{handle.log_tail()}")
        time.sleep(0.2)


def launch_operator(cluster: Any, work: Path, *, artifact_dir: Path, local: LocalCluster | None = None,
                    extra_args: list[str] | None = None, user: str = "fleetlet-operator") -> ComponentHandle:
    """Start ``fleetlet-operator`` as its own process under its own RBAC identity, sharing the shim's store."""
    from fleetlet_operator import rbac as operator_rbac

    local = local or getattr(cluster, "local", None)
    if local is None:
        raise RuntimeError("the operator runs against the embedded control plane here (unset FLEETLET_TEST_KUBECONFIG)")
    work.mkdir(parents=True, exist_ok=True)
    apply_objects(cluster, operator_rbac.manifests(subject_name=user))
    kubeconfig = local.user_kubeconfig(user)
    metrics_port = free_port()
    args = [
        sys.executable, "-m", "fleetlet_operator",
        "--kubeconfig", str(kubeconfig),
        "--artifact-dir", str(artifact_dir),
        "--metrics-address", f"127.0.0.1:{metrics_port}",
        *(extra_args or []),
    ]
    log_path = work / "operator.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    handle = ComponentHandle(proc, log_path, f"http://127.0.0.1:{metrics_port}/metrics", args)
    try:
        _wait_ready(handle)
    except BaseException:
        handle.stop()
        raise
    return handle

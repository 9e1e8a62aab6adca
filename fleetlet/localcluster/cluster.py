"""Start and stop a real control plane on loopback with free ports, generated certificates and
service-account keys; write an admin kubeconfig; leave no stray processes and no leftover ports.

What it must never do: listen on anything but 127.0.0.1, or leave a process running after ``stop()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetlet.pki import CertificateAuthority, KeyPair, rsa_keypair_pem

from .binaries import Binaries, find_binaries

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
# Identity the API server presents to kubelets (the shim): the shim authorizes kubectl logs for this CN.
APISERVER_KUBELET_CLIENT_CN = "kube-apiserver-kubelet-client"
_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """The control plane could not start or answer; the message says which component and where its log is."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Children of a test run must not outlive it, even if pytest is killed: ask the kernel for SIGTERM.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Component:
    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalCluster:
    """A control plane in ``state_dir``. Use as a context manager, or ``start()`` / ``stop()``.

    ``detach=True`` starts processes that outlive this Python process (``fleetlet up``); their pids are kept
    in ``state_dir/pids.json`` so ``LocalCluster.stop_detached`` can end them later.
    """

    state_dir: Path
    binaries: Binaries | None = None
    node_monitor_grace_period_s: int = 50
    node_monitor_period_s: int = 5
    detach: bool = False
    # Client-side rate limits of the scheduler and the controller-manager (their defaults are 50 and 20 QPS).
    # Every placement is one binding call, so the scheduler's default caps a FleetJob at ~50 shards/s; every
    # NoExecute eviction of a driving car's pod is one delete by the controller-manager. A fleet's control plane
    # raises both, as large clusters do; the API server's priority and fairness still bounds what they get.
    scheduler_api_qps: int = 500
    controller_manager_api_qps: int = 200
    extra_apiserver_args: list[str] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    # ---------------------------------------------------------------- paths
    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.ports['apiserver']}"

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        self.binaries = self.binaries or find_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        self.ports = {
            name: free_port()
            for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        }
        self._write_kubeconfigs()
        deadline = time.monotonic() + timeout_s
        try:
            self._start_etcd()
            self._wait(lambda: self._http_ok(f"http://{LOOPBACK}:{self.ports['etcd']}/health"), "etcd", deadline)
            self._start_apiserver()
            self._wait(lambda: self._https_ok(f"{self.server}/readyz", client=True), "kube-apiserver", deadline)
            self._start_controller_manager()
            self._start_scheduler()
            self._wait(
                lambda: self._https_ok(f"https://{LOOPBACK}:{self.ports['controller-manager']}/healthz"),
                "kube-controller-manager",
                deadline,
            )
            self._wait(
                lambda: self._https_ok(f"https://{LOOPBACK}:{self.ports['scheduler']}/healthz"),
                "kube-scheduler",
                deadline,
            )
        except BaseException:
            self.stop()
            raise
        if self.detach:
            (self.state_dir / "pids.json").write_text(
                json.dumps({c.name: c.process.pid for c in self.components if c.process})
            )
            (self.state_dir / "ports.json").write_text(json.dumps(self.ports))
        log.info("control plane ready at %s (kubeconfig %s)", self.server, self.kubeconfig)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every component, newest first; SIGKILL what does not exit within ``grace_s``."""
        for comp in reversed(self.components):
            proc = comp.process
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for comp in reversed(self.components):
            proc = comp.process
            if proc is None:
                continue
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.components.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "pids.json").unlink()

    @classmethod
    def attach(cls, state_dir: Path) -> LocalCluster:
        """A handle on a control plane started with ``detach=True`` (``fleetlet up``), to use, not to stop."""
        if not (state_dir / "pids.json").exists():
            raise ClusterError(f"no local control plane is running from {state_dir}; run `fleetlet up`")
        cluster = cls(state_dir=state_dir, binaries=find_binaries(build=False), detach=True)
        cluster.ports = json.loads((state_dir / "ports.json").read_text())
        return cluster

    @staticmethod
    def stop_detached(state_dir: Path, grace_s: float = 10.0) -> bool:
        """End a control plane started with ``detach=True`` (``fleetlet down``). False if none was running."""
        pid_file = state_dir / "pids.json"
        if not pid_file.exists():
            return False
        pids: dict[str, int] = json.loads(pid_file.read_text())
        for pid in reversed(list(pids.values())):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for pid in pids.values():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()
        return True

    def is_running(self) -> bool:
        return bool(self.components) and all(c.process and c.process.poll() is None for c in self.components)

    # ---------------------------------------------------------------- users
    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = (), name: str | None = None) -> Path:
        """A kubeconfig for a client-certificate user (CN=user, O=groups), so components run under RBAC."""
        ca = CertificateAuthority(KeyPair.read(self.pki_dir, "ca"))
        stem = name or user.replace(":", "-")
        pair = ca.issue(user, organizations=groups, client=True)
        crt, key = pair.write(self.pki_dir, stem)
        path = self.state_dir / f"{stem}.kubeconfig"
        self._kubeconfig_file(path, crt, key)
        return path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.binaries is not None
        return subprocess.run(
            [self.binaries.kubectl, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
            timeout=120,
        )

    # ---------------------------------------------------------------- internals
    def _write_pki(self) -> None:
        pki = self.pki_dir
        if (pki / "ca.crt").exists():
            return  # reuse on restart: kubeconfigs handed out stay valid
        ca = CertificateAuthority.create("fleetlet-local-ca")
        ca.pair.write(pki, "ca")
        ca.issue(
            "kube-apiserver",
            server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ip_addresses=(LOOPBACK, "10.0.0.1"),
        ).write(pki, "apiserver")
        ca.issue(APISERVER_KUBELET_CLIENT_CN, organizations=("system:masters",), client=True).write(
            pki, "apiserver-kubelet-client"
        )
        ca.issue("fleetlet-admin", organizations=("system:masters",), client=True).write(pki, "admin")
        ca.issue("system:kube-controller-manager", client=True).write(pki, "controller-manager")
        ca.issue("system:kube-scheduler", client=True).write(pki, "scheduler")
        private, public = rsa_keypair_pem()
        (pki / "sa.key").write_bytes(private)
        (pki / "sa.key").chmod(0o600)
        (pki / "sa.pub").write_bytes(public)

    def _kubeconfig_file(self, path: Path, crt: Path, key: Path) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fleetlet-local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki_dir / "ca.crt")},
                }
            ],
            "users": [{"name": path.stem, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "fleetlet-local", "context": {"cluster": "fleetlet-local", "user": path.stem}}],
            "current-context": "fleetlet-local",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _write_kubeconfigs(self) -> None:
        pki = self.pki_dir
        self._kubeconfig_file(self.kubeconfig, pki / "admin.crt", pki / "admin.key")
        for comp in ("controller-manager", "scheduler"):
            self._kubeconfig_file(self.state_dir / f"{comp}.kubeconfig", pki / f"{comp}.crt", pki / f"{comp}.key")

    def _spawn(self, name: str, args: list[str]) -> None:
        log_path = self.state_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        comp = Component(name, args, log_path)
        with open(log_path, "ab") as out:
            comp.process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=None if self.detach else _die_with_parent,
                cwd=self.state_dir,
            )
        self.components.append(comp)
        log.debug("started %s pid %d: %s", name, comp.process.pid, " ".join(args))

    def _start_etcd(self) -> None:
        assert self.binaries
        data = self.state_dir / "etcd"
        peer = f"http://{LOOPBACK}:{self.ports['etcd-peer']}"
        client = f"http://{LOOPBACK}:{self.ports['etcd']}"
        self._spawn(
            "etcd",
            [
                self.binaries["etcd"],
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",  # loopback test/demo cluster: speed over crash durability
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> None:
        assert self.binaries
        pki = self.pki_dir
        self._spawn(
            "kube-apiserver",
            [
                self.binaries["kube-apiserver"],
                f"--etcd-servers=http://{LOOPBACK}:{self.ports['etcd']}",
                f"--secure-port={self.ports['apiserver']}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                # A loopback advertise address is refused by the default (lease) endpoint reconciler.
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true",
                # kubectl logs/exec: the API server dials the Node's daemonEndpoint (the shim) over TLS.
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--event-ttl=1h",
                *self.extra_apiserver_args,
            ],
        )

    def _component_common(self, name: str) -> list[str]:
        kubeconfig = self.state_dir / f"{name}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.ports[name]}",
            f"--cert-dir={self.state_dir / name}",
            "--leader-elect=false",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        ]

    def _start_controller_manager(self) -> None:
        assert self.binaries
        pki = self.pki_dir
        self._spawn(
            "kube-controller-manager",
            [
                self.binaries["kube-controller-manager"],
                *self._component_common("controller-manager"),
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--node-monitor-period={self.node_monitor_period_s}s",
                f"--node-monitor-grace-period={self.node_monitor_grace_period_s}s",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kube-api-qps={self.controller_manager_api_qps}",
                f"--kube-api-burst={2 * self.controller_manager_api_qps}",
            ],
        )

    def _start_scheduler(self) -> None:
        assert self.binaries
        self._spawn(
            "kube-scheduler",
            [
                self.binaries["kube-scheduler"],
                *self._component_common("scheduler"),
                f"--kube-api-qps={self.scheduler_api_qps}",
                f"--kube-api-burst={2 * self.scheduler_api_qps}",
            ],
        )

    def _wait(self, probe: object, name: str, deadline: float) -> None:
        assert callable(probe)
        while time.monotonic() < deadline:
            for comp in self.components:
                if comp.process and comp.process.poll() is not None:
                    raise ClusterError(
                        f"{comp.name} exited with status {comp.process.returncode} while waiting for {name}; "
                        f"its log ({comp.log_path}) ends with:\n{comp.tail()}"
                    )
            if probe():
                return
            time.sleep(0.2)
        found = next((c for c in self.components if c.name == name), None)
        raise ClusterError(
            f"{name} did not become ready in time; its log ({found.log_path if found else '?'}) ends with:\n"
            f"{found.tail() if found else ''}"
        )

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _ssl_context(self, client: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        if client:
            ctx.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        else:
            # scheduler / controller-manager serve a self-signed cert from --cert-dir.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _https_ok(self, url: str, client: bool = False) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=self._ssl_context(client)) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.split(")")[-1].split()[0] == "Z":
            return False
    return True


@contextlib.contextmanager
def running_cluster(state_dir: Path, **kwargs: object) -> Iterator[LocalCluster]:
    cluster = LocalCluster(state_dir=state_dir, **kwargs)  # type: ignore[arg-type]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("FLEETLET_KEEP_STATE") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)

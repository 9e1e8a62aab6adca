"""The Helm chart against a real kube-apiserver (v1.37.2 and its admission chain, or kind):

- every object of every ci/ scenario is accepted (server-side dry run), and Pod Security's restricted profile
  has nothing to say about the operator and the shim;
- installed for real (all but the workloads), its ServiceAccounts may do exactly what the code declares, as the
  real authorizer decides (SubjectAccessReviews);
- ``components``: the operator, the shim and the simulated fleet run here as processes with the command lines,
  environment, Secrets and ServiceAccount tokens the chart gives their pods (a small kubelet stand-in: no
  container runtime here), and the simulated cars become Ready Nodes. Needs the embedded control plane (it
  starts car Nodes named car-000000...); ``make kind-test`` deselects it;
- helm itself installs, upgrades and uninstalls the chart: the CA the cars trust, the kubelet certificate and the
  grant key survive upgrades, the link certificate is re-issued by the same CA when its names change.

What only a real cluster shows (kind: ``make kind-up``): the image, pod networking, DNS names, the kubelet's
probes, volumes and security contexts, the API server dialling the shim for ``kubectl logs``.
"""

from __future__ import annotations

import base64
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

import pytest

from fleetlet.kube import KubeConfig
from fleetlet.localcluster.cluster import free_port
from tests.integration.conftest import Cluster
from tests.unit.test_chart import CHART, SCENARIOS, container, expand, find, render

pytestmark = pytest.mark.integration

NS = "fleetlet-chart-test"
RELEASE = "fleetlet-it"
WORKLOADS = ("Deployment", "StatefulSet")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _list(objects: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})


def _apply(cluster: Cluster, objects: list[dict[str, Any]], *extra: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=fleetlet-chart-test",
                           *extra, "-f", "-", input=_list(objects))


@pytest.fixture(scope="module")
def namespace(crds_installed: Cluster) -> Iterator[Cluster]:
    """The release's namespace, warning on anything Pod Security's restricted profile would refuse."""
    crds_installed.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"pod-security.kubernetes.io/warn": "restricted",
                                            "pod-security.kubernetes.io/warn-version": "latest"}},
    }))
    yield crds_installed
    for kind in ("clusterrole", "clusterrolebinding"):
        crds_installed.kubectl("delete", kind, "-l", f"app.kubernetes.io/instance={RELEASE}", "--ignore-not-found",
                               check=False)
    for ns in ("default", "kube-node-lease"):
        crds_installed.kubectl("delete", "role,rolebinding", "-n", ns, "-l", f"app.kubernetes.io/instance={RELEASE}",
                               "--ignore-not-found", check=False)
    crds_installed.kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found", check=False)


# ---- every scenario, dry run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["(defaults)", *SCENARIOS])
def test_every_object_of_every_scenario_is_accepted_by_the_api_server(namespace: Cluster, values: str) -> None:
    objects = render(*([] if values == "(defaults)" else [values]), namespace=NS)
    # cert-manager's kinds need cert-manager's CRDs, which this control plane does not have: the unit tests check
    # those objects; every other object of that scenario is applied here.
    plain = [o for o in objects if not o["apiVersion"].startswith("cert-manager.io/")]
    rest = [o for o in plain if o["kind"] not in WORKLOADS]
    _apply(namespace, rest, "--dry-run=server")
    for workload in (o for o in plain if o["kind"] in WORKLOADS):
        # One at a time, so that a Pod Security warning names its workload.
        warnings = _apply(namespace, [workload], "--dry-run=server").stderr
        name = workload["metadata"]["name"]
        sim_netns = name.endswith("-sim") and "SYS_ADMIN" in json.dumps(workload)
        if sim_netns:  # root with CAP_SYS_ADMIN for unshare(CLONE_NEWNET): documented, not restricted
            assert 'would violate PodSecurity "restricted:latest"' in warnings and "SYS_ADMIN" in warnings
        else:
            assert "PodSecurity" not in warnings, f"{values}: {name}: {warnings}"


# ---- installed for real (all but the workloads) ---------------------------------------------------------------


@dataclass
class Installed:
    cluster: Cluster
    objects: list[dict[str, Any]]
    ports: dict[str, int]


@pytest.fixture(scope="module")
def installed(namespace: Cluster) -> Installed:
    """kind-values.yaml installed in NS, laid out so that its pods can run as processes on this machine: every
    port free here, the link certificate also naming localhost (pods would dial the link Service's name)."""
    ports = {k: free_port() for k in ("link", "kubelet", "shim-metrics", "operator-metrics")}
    objects = render("kind-values.yaml", release=RELEASE, namespace=NS, sets=(
        f"shim.link.port={ports['link']}", f"shim.kubeletApi.port={ports['kubelet']}",
        f"shim.metricsPort={ports['shim-metrics']}", f"operator.metricsPort={ports['operator-metrics']}",
        "certificates.link.dnsNames={localhost}", f"shim.link.artifactUrl=https://localhost:{ports['link']}",
        "simFleet.cars=2", "simFleet.networkIsolation=fallback",
        f"simFleet.extraArgs={{--shim-url=wss://localhost:{ports['link']}/v1/link,--status-every=2}}",
    ))
    keep = [o for o in objects if o["kind"] not in (*WORKLOADS, "CustomResourceDefinition", "RuntimeClass")]
    _apply(namespace, keep)
    return Installed(namespace, objects, ports)


def _reviews(installed: Installed, sa: str, asks: list[tuple[str, str, str, str | None, str | None]]) -> list[bool]:
    """SubjectAccessReviews for the ServiceAccount: (group, resource, verb, subresource, namespace) each."""
    user = f"system:serviceaccount:{NS}:{sa}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"]
    reviews = [{
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": {
            "group": g, "resource": r, "verb": v, **({"subresource": s} if s else {}), **({"namespace": n} if n else {}),
        }},
    } for g, r, v, s, n in asks]
    text = installed.cluster.kubectl("create", "-o", "json", "-f", "-", input=_list(reviews)).stdout
    items, at, decoder = [], 0, json.JSONDecoder()
    while text[at:].strip():  # kubectl prints one JSON document per object created
        item, at = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        items.append(item)
    assert len(items) == len(reviews)
    return [bool(i["status"].get("allowed")) for i in items]


def _asks(rules: list[dict[str, Any]], namespace: str | None) -> list[tuple[str, str, str, str | None, str | None]]:
    out = []
    for rule in rules:
        for resource in rule["resources"]:
            base, _, sub = resource.partition("/")
            out += [(rule["apiGroups"][0], base, verb, sub or None, namespace) for verb in rule["verbs"]]
    return out


def test_the_service_accounts_may_do_exactly_what_the_code_declares(installed: Installed) -> None:
    from fleetlet_operator import rbac as operator_rbac
    from fleetlet_shim import rbac as shim_rbac

    shim_sa = find(installed.objects, "StatefulSet", "-shim")["spec"]["template"]["spec"]["serviceAccountName"]
    op_sa = find(installed.objects, "Deployment", "-operator")["spec"]["template"]["spec"]["serviceAccountName"]
    sim_sa = find(installed.objects, "Deployment", "-sim")["spec"]["template"]["spec"]["serviceAccountName"]

    granted = _asks(shim_rbac.cluster_rules(), None)
    for ns, rules in shim_rbac.namespaced_rules(NS).items():
        granted += _asks(rules, ns)
    refused = [("", "nodes", "delete", None, None), ("", "secrets", "get", None, NS), ("", "pods", "create", None, "x"),
               ("coordination.k8s.io", "leases", "create", None, NS), ("", "configmaps", "list", None, "default")]
    answers = _reviews(installed, shim_sa, granted + refused)
    assert answers == [True] * len(granted) + [False] * len(refused), list(zip(granted + refused, answers, strict=True))

    granted = _asks(operator_rbac.rules(), "team-a")
    refused = [("", "nodes", "patch", None, None), ("", "secrets", "get", None, NS), ("", "pods", "update", None, "x")]
    answers = _reviews(installed, op_sa, granted + refused)
    assert answers == [True] * len(granted) + [False] * len(refused), list(zip(granted + refused, answers, strict=True))

    granted = [("fleetlet.io", "vehiclenodes", v, None, None) for v in ("get", "create", "patch")]
    refused = [("fleetlet.io", "vehiclenodes", "delete", None, None), ("", "pods", "list", None, NS),
               ("fleetlet.io", "vehiclenodes", "patch", "status", None)]
    answers = _reviews(installed, sim_sa, granted + refused)
    assert answers == [True] * len(granted) + [False] * len(refused)


# ---- the pods' containers as processes --------------------------------------------------------------------------


class Pods:
    """Runs a pod's container the way the kubelet would, minus the container: its volumes written to disk (the
    chart's Secrets and ConfigMaps read back from the API server, a token of its ServiceAccount), its command
    line with $(VAR) expanded from the downward API, the console script from this environment. Every process is
    its own session and is stopped at the end. Pods share this machine's network: 0.0.0.0 becomes 127.0.0.1."""

    def __init__(self, installed: Installed, work: Path) -> None:
        self.installed = installed
        self.cluster = installed.cluster
        self.work = work
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        cfg = KubeConfig.from_file(installed.cluster.kubeconfig)
        self.server = cfg.server
        self.ca = Path(cfg.ca_file or "").read_bytes()

    def _get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.cluster.kubectl("get", kind, name, "-n", NS, "-o", "json").stdout)

    def _token(self, sa: str) -> str:
        return self.cluster.kubectl("create", "token", sa, "-n", NS, "--duration=1h").stdout.strip()

    def _volumes(self, pod: str, spec: dict[str, Any]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for volume in spec["volumes"]:
            d = self.work / pod / "volumes" / volume["name"]
            d.mkdir(parents=True, exist_ok=True)
            if "persistentVolumeClaim" in volume:  # one directory per claim: the pods that mount it share it
                d = self.work / "claims" / volume["persistentVolumeClaim"]["claimName"]
                d.mkdir(parents=True, exist_ok=True)
            sources = volume.get("projected", {}).get("sources") or [volume]
            for source in sources:
                for kind in ("secret", "configMap"):
                    if kind not in source:
                        continue
                    ref = source[kind]
                    obj = self._get(kind.lower(), ref.get("secretName") or ref["name"])
                    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} if kind == "secret" \
                        else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                    for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
                        (d / item["path"]).write_bytes(data[item["key"]])
                if "serviceAccountToken" in source:
                    (d / source["serviceAccountToken"]["path"]).write_text(self._token(spec["serviceAccountName"]))
                for item in source.get("downwardAPI", {}).get("items", []):
                    assert item["fieldRef"]["fieldPath"] == "metadata.namespace"
                    (d / item["path"]).write_text(NS)
            out[volume["name"]] = d
        return out

    def _automount(self, pod: str, sa: str) -> Path:
        d = self.work / pod / "serviceaccount"
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(self._token(sa))
        (d / "ca.crt").write_bytes(self.ca)
        (d / "namespace").write_text(NS)
        return d

    def _kubeconfig(self, pod: str, token_file: Path) -> Path:
        path = self.work / pod / "kubeconfig"
        (self.work / pod / "cluster-ca.crt").write_bytes(self.ca)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "c", "cluster": {"server": self.server,
                                                   "certificate-authority": str(self.work / pod / "cluster-ca.crt")}}],
            "users": [{"name": "u", "user": {"tokenFile": str(token_file)}}],
            "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
        }))
        return path

    def start(self, workload: dict[str, Any], name: str, pod: str, init: bool = False) -> subprocess.Popen[bytes]:
        spec = workload["spec"]["template"]["spec"]
        c = container(workload, name, init=init)
        volumes = self._volumes(pod, spec)
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
        if spec.get("automountServiceAccountToken", True):
            mounts.setdefault(SA_DIR, self._automount(pod, spec["serviceAccountName"]))
        fields = {"metadata.name": pod, "metadata.namespace": NS, "status.podIP": "127.0.0.1",
                  "metadata.labels['apps.kubernetes.io/pod-index']": "0"}
        env = {e["name"]: e.get("value") or fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c.get("env", [])}
        argv = expand(c["command"] + c.get("args", []), env)
        argv = [self._local(a, mounts) for a in argv]
        argv = [a.replace("0.0.0.0:", "127.0.0.1:") for a in argv]
        binary = Path(sys.executable).parent / argv[0]
        argv[0] = sys.executable if argv[0] == "python" else str(binary)
        log = self.work / f"{pod}-{name}.log"
        proc_env = {"PATH": os.environ["PATH"], "HOME": str(self.work), **env,
                    **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}  # the code under test
        if SA_DIR in mounts:  # in a pod: the in-cluster config; here, the same token through a kubeconfig
            proc_env["KUBECONFIG"] = str(self._kubeconfig(pod, mounts[SA_DIR] / "token"))
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=proc_env,
                                    cwd=self.work, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    @staticmethod
    def _local(arg: str, mounts: dict[str, Path]) -> str:
        """``arg`` with the container path it names (``/path`` or ``--flag=/path``) moved to its volume here."""
        flag, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
        for path in sorted(mounts, key=len, reverse=True):  # the deepest mount holds the file
            if value == path or value.startswith(path + "/"):
                return f"{flag}{eq}{mounts[path]}{value[len(path):]}"
        return arg

    def wait_ready(self, proc: subprocess.Popen[bytes], port: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}:\n{self.log_of(proc)}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {timeout_s}s:\n{self.log_of(proc)}")
            time.sleep(0.3)

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        log = next(p for q, p in self.procs if q is proc)
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])

    def stop_all(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def pods(installed: Installed, tmp_path: Path) -> Iterator[Pods]:
    if installed.cluster.local is None:
        raise RuntimeError("the components test starts car Nodes named car-000000...: run it against the "
                           "embedded control plane (unset FLEETLET_TEST_KUBECONFIG), or deselect it (-k 'not components')")
    p = Pods(installed, tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
        c = installed.cluster
        c.kubectl("delete", "vehiclenodes", "-l", f"app.kubernetes.io/instance={RELEASE}", "--ignore-not-found",
                  "--wait=false", check=False)
        c.kubectl("delete", "nodes", "car-000000", "car-000001", "--ignore-not-found", check=False)
        c.kubectl("delete", "leases", "-n", "kube-node-lease", "car-000000", "car-000001", "--ignore-not-found",
                  check=False)


def test_the_components_start_with_the_charts_command_lines_identities_and_secrets(pods: Pods) -> None:
    objects, ports = pods.installed.objects, pods.installed.ports
    shim = find(objects, "StatefulSet", "-shim")
    shim_proc = pods.start(shim, "shim", f"{shim['metadata']['name']}-0")
    operator = find(objects, "Deployment", "-operator")
    operator_proc = pods.start(operator, "operator", f"{operator['metadata']['name']}-7d9f8-x2k4q")
    pods.wait_ready(shim_proc, ports["shim-metrics"])  # its informers synced under its ServiceAccount's RBAC
    pods.wait_ready(operator_proc, ports["operator-metrics"])

    sim = find(objects, "Deployment", "-sim")
    pod = f"{sim['metadata']['name']}-5c6b7-q8w2e"
    init = pods.start(sim, "vehiclenodes", pod, init=True)
    assert init.wait(timeout=120) == 0, pods.log_of(init)
    vns = json.loads(pods.cluster.kubectl("get", "vehiclenodes", "-l", f"app.kubernetes.io/instance={RELEASE}",
                                          "-o", "json").stdout)["items"]
    assert sorted(v["metadata"]["name"] for v in vns) == ["car-000000", "car-000001"]
    cars = pods.start(sim, "sim", pod)

    deadline = time.monotonic() + 60  # they connect within seconds
    while True:  # the cars dialled the link with certificates from the chart's fleet CA; the shim made them Nodes
        nodes = json.loads(pods.cluster.kubectl("get", "nodes", "-l", "fleetlet.io/vehicle=true", "-o", "json").stdout)
        ready = {n["metadata"]["name"] for n in nodes["items"]
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))}
        if {"car-000000", "car-000001"} <= ready:
            break
        assert cars.poll() is None and shim_proc.poll() is None, pods.log_of(cars) + pods.log_of(shim_proc)
        assert time.monotonic() < deadline, f"cars not Ready: {ready}\n{pods.log_of(cars)}\n{pods.log_of(shim_proc)}"
        time.sleep(1)
    node = next(n for n in nodes["items"] if n["metadata"]["name"] == "car-000000")
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]  # the pod IP, here
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == ports["kubelet"]
    assert operator_proc.poll() is None, pods.log_of(operator_proc)


# ---- helm install and upgrade against the API server ------------------------------------------------------------


def test_helm_upgrades_keep_the_fleet_ca_and_keys_and_uninstall_keeps_the_ca_and_store(namespace: Cluster) -> None:
    """The chart's own certificates are looked up in the cluster: an upgrade keeps the CA the cars trust and the
    grant key, re-issues the link certificate only when its names change, and `helm uninstall` leaves the CA and
    the artifact store. (The CRDs are the session's own here: crds.enabled=false.)"""
    from tests.unit.test_chart import cert_of, helm

    ns, release = "fleetlet-helm-test", "upgrades"

    def run(*args: str, check: bool = True) -> None:
        proc = subprocess.run([helm(), "--kubeconfig", str(namespace.kubeconfig), "-n", ns, *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 or not check, proc.stdout + proc.stderr

    def upgrade(*sets: str) -> None:
        run("upgrade", "--install", release, str(CHART), "--create-namespace", "--set", "crds.enabled=false",
            *[a for s in sets for a in ("--set", s)])

    def secrets() -> dict[str, dict[str, Any]]:
        out = json.loads(namespace.kubectl("get", "secrets", "-n", ns, "-l", f"app.kubernetes.io/instance={release}",
                                           "-o", "json").stdout)
        return {s["metadata"]["name"].removeprefix(f"{release}-fleetlet-"): s for s in out["items"]}

    try:
        upgrade()
        first = secrets()
        assert set(first) == {"fleet-ca", "link-tls", "kubelet-tls", "grant-key"}
        upgrade("certificates.link.dnsNames={cars.example.com}")
        second = secrets()
        for name in ("fleet-ca", "kubelet-tls", "grant-key"):
            assert second[name]["data"] == first[name]["data"], f"{name} changed on upgrade"
        assert second["link-tls"]["data"] != first["link-tls"]["data"]  # new names, new certificate...
        cert_of(second["link-tls"]).verify_directly_issued_by(cert_of(first["fleet-ca"]))  # ...from the same CA
        upgrade("certificates.link.dnsNames={cars.example.com}")
        assert secrets()["link-tls"]["data"] == second["link-tls"]["data"]  # same names: kept
        run("uninstall", release)
        assert set(secrets()) == {"fleet-ca"}
        pvcs = namespace.kubectl("get", "pvc", "-n", ns, "-o", "name").stdout.split()
        assert pvcs == [f"persistentvolumeclaim/{release}-fleetlet-artifacts"]
    finally:
        run("uninstall", release, "--ignore-not-found", check=False)
        namespace.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)

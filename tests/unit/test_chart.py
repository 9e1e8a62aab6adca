"""The Helm chart (charts/fleetlet), rendered by a real helm: lint clean for the defaults and every ci/ scenario,
a strict values schema, and objects that are what the code needs — one operator replica with Recreate, the shim's
replica flags from its ordinal, RBAC equal to the verbs the code declares, CRDs identical to crds/, command lines
that the components' own parsers accept, certificates whose names cover every address cars dial.

helm is built from the Go module proxy into ~/.cache/fleetlet (``make helm``); without it these tests fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from base64 import b64decode
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.conftest import CRDS, ROOT

CHART = ROOT / "charts" / "fleetlet"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
NS = "fleetlet-system"
KUBE_VERSION = "1.37.2"  # the control plane the integration tests run


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


chartgen = _load("fleetlet_chartgen", CHART / "hack" / "chartgen.py")


@functools.cache
def helm() -> str:
    proc = subprocess.run(["bash", str(ROOT / "fleetlet" / "localcluster" / "build_helm.sh"), "--check"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"helm is not built: {proc.stderr.strip()} (`make helm` builds it from the Go module proxy "
                    "into ~/.cache/fleetlet; `make test` does it first)", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


@functools.cache
def _render(files: tuple[str, ...], sets: tuple[str, ...], release: str, namespace: str) -> str:
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for f in files:
        args += ["-f", str(CHART / "ci" / f)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(*args)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return proc.stdout


@functools.cache
def _parsed(files: tuple[str, ...], sets: tuple[str, ...], release: str, namespace: str) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs make the output long
    return [d for d in yaml.load_all(_render(files, sets, release, namespace), Loader=loader) if d]


def render(*files: str, sets: tuple[str, ...] = (), release: str = "fleetlet", namespace: str = NS) -> list[dict[str, Any]]:
    """The chart's objects, as the API server would receive them (shared between tests: do not change them)."""
    return _parsed(files, sets, release, namespace)


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    return next(c for c in workload["spec"]["template"]["spec"][key] if c["name"] == name)


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert values, f"--{name} missing from {args}"
    return values[-1]


def cert_of(secret: dict[str, Any], key: str = "tls.crt") -> x509.Certificate:
    return x509.load_pem_x509_certificate(b64decode(secret["data"][key]))


def covers(cert: x509.Certificate, host: str) -> bool:
    """Whether TLS hostname verification of ``host`` would pass (one leftmost wildcard label, as OpenSSL)."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        ip = ipaddress.ip_address(host)
        return ip in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    for name in san.get_values_for_type(x509.DNSName):
        if name == host or (name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]):
            return True
    return False


def host_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]


# ---- the chart's generated parts and values -------------------------------------------------------------------


def test_generated_crds_rbac_and_schema_match_the_code() -> None:
    problems = chartgen.check()
    assert not problems, "charts/fleetlet drifted from the code; run `make chart`:\n" + "\n".join(problems)


def test_values_yaml_holds_exactly_the_models_defaults() -> None:
    assert yaml.safe_load((CHART / "values.yaml").read_text()) == chartgen.default_values()


def test_every_object_in_the_schema_refuses_unknown_keys() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("properties"):
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}/{key}")
        for child in node.get("anyOf", []):
            walk(child, path)

    walk(json.loads((CHART / "values.schema.json").read_text()), "")


def test_the_chart_versions_follow_the_python_distribution() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version and chart["version"] == version


# ---- helm lint and the schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["(defaults)", *SCENARIOS])
def test_helm_lint_is_clean(values: str) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    if values != "(defaults)":
        args += ["-f", str(CHART / "ci" / values)]
    proc = run_helm(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("setting", "refusal"), [
    ("shim.replica=3", "additional properties 'replica' not allowed"),  # a typo of shim.replicas
    ("operator.replicas=2", "additional properties 'replicas' not allowed"),  # the operator is always 1
    ("shim.link.service.type=Ingress", "value must be one of"),
    ("shim.replicas=0", "minimum"),
    ("simFleet.networkIsolation=none", "value must be one of"),
    ("image.digest=latest", "does not match pattern"),
    ("certificates.source=vault", "value must be one of"),
    ("colour=blue", "additional properties 'colour' not allowed"),
])
def test_the_schema_refuses_values_that_do_not_exist_or_fit(setting: str, refusal: str) -> None:
    proc = run_helm("template", "x", str(CHART), "--set", setting)
    assert proc.returncode != 0 and refusal in proc.stderr, proc.stderr


def test_replica_urls_must_name_one_url_per_replica() -> None:
    proc = run_helm("template", "x", str(CHART), "--set", "shim.replicas=3",
                    "--set", "shim.link.replicaUrls={wss://a:8443/v1/link}", "--set", "shim.link.artifactUrl=https://a")
    assert proc.returncode != 0 and "names 1 URLs for 3 replicas" in proc.stderr


# ---- what is rendered ------------------------------------------------------------------------------------------


def test_the_operator_runs_exactly_one_replica_recreated_never_rolled() -> None:
    for values in ([], *[[s] for s in SCENARIOS]):
        operator = find(render(*values), "Deployment", "-operator")
        assert operator["spec"]["replicas"] == 1
        assert operator["spec"]["strategy"] == {"type": "Recreate"}


def test_the_operators_command_line_is_accepted_by_its_parser_and_its_probes_hit_its_health_endpoints() -> None:
    from fleetlet_operator.__main__ import parser

    operator = find(render("replicas-values.yaml"), "Deployment", "-operator")
    c = container(operator, "operator")
    args = parser().parse_args(c["args"])
    assert args.namespace == ["team-a", "team-b"] and args.job_workers == 8
    host, _, port = args.metrics_address.rpartition(":")
    assert host == "0.0.0.0"  # reachable by the kubelet's probes and Prometheus, not 127.0.0.1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == int(port)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[str(args.artifact_dir)] == "artifacts"


def test_each_shim_replica_gets_its_index_from_its_ordinal_and_every_replicas_url() -> None:
    from fleetlet_shim.__main__ import parser, split_address

    objects = render("replicas-values.yaml")
    sts = find(objects, "StatefulSet", "-shim")
    c = container(sts, "shim")
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
                   "SHIM_REPLICA": "metadata.labels['apps.kubernetes.io/pod-index']"}
    headless = find(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["replicas"] == 3
    name = sts["metadata"]["name"]
    for i in range(3):
        pod = f"{name}-{i}"  # what the StatefulSet controller names replica i, and labels pod-index=i
        args = parser().parse_args(expand(c["args"], {
            "POD_NAME": pod, "POD_NAMESPACE": NS, "POD_IP": "10.244.1.7", "SHIM_REPLICA": str(i)}))
        assert (args.replica, args.replicas, args.shim_id, args.namespace) == (i, 3, pod, NS)
        urls = args.replica_urls.split(",")
        own = f"{pod}.{headless['metadata']['name']}.{NS}.svc.cluster.local"
        assert len(urls) == 3 and host_of(urls[i]) == own  # a redirect to replica i reaches this very pod
        assert host_of(args.artifact_url) == own
        assert args.advertise_address == "10.244.1.7"  # the car Nodes' InternalIP: the API server dials it
        for address in (args.link_address, args.kubelet_address, args.metrics_address):
            assert split_address(address)[0] == "0.0.0.0"  # explicit, and reachable from outside the pod
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"link": 8443, "kubelet-api": 10250, "metrics": 9090}
    link = find(objects, "Service", "-shim")
    assert link["spec"]["type"] == "NodePort" and link["spec"]["ports"][0]["nodePort"] == 30443
    assert link["spec"]["ports"][0]["targetPort"] == "link"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_every_file_a_command_line_names_is_mounted_from_a_volume_that_holds_it() -> None:
    for values in ([], ["kind-values.yaml"], ["existing-secrets-values.yaml"], ["restricted-sim-values.yaml"]):
        objects = render(*values)
        for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
            spec = workload["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"] + spec.get("initContainers", []):
                mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
                for arg in c["args"] + c["command"]:
                    path = arg.split("=", 1)[-1]
                    if not path.startswith(("/etc/", "/opt/", "/var/")):
                        continue
                    directory, _, key = path.rpartition("/")
                    if path in mounts:  # a directory (the artifact store, a work dir)
                        continue
                    if directory == "/var/run/secrets/kubernetes.io/serviceaccount":
                        assert spec.get("automountServiceAccountToken", True), f"{workload['metadata']['name']}"
                        continue
                    assert directory in mounts, f"{path} ({c['name']}) is not mounted"
                    volume = mounts[directory]
                    source = volume.get("secret") or volume.get("configMap")
                    if source and "items" in source:
                        assert key in [i["path"] for i in source["items"]], f"{path} is not projected"


def test_rbac_grants_exactly_the_verbs_the_code_declares() -> None:
    from fleetlet_operator import rbac as operator_rbac
    from fleetlet_shim import rbac as shim_rbac

    objects = render()
    shim_sa = find(objects, "StatefulSet", "-shim")["spec"]["template"]["spec"]["serviceAccountName"]
    operator_sa = find(objects, "Deployment", "-operator")["spec"]["template"]["spec"]["serviceAccountName"]

    def bound_rules(sa: str) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        cluster: list[dict[str, Any]] = []
        by_ns: dict[str, list[dict[str, Any]]] = {}
        for b in (o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
            if b["subjects"] != [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]:
                continue
            ns = b["metadata"].get("namespace")
            role = next(o for o in objects if o["kind"] == b["roleRef"]["kind"]
                        and o["metadata"]["name"] == b["roleRef"]["name"] and o["metadata"].get("namespace") == ns)
            if ns is None:
                cluster += role["rules"]
            else:
                by_ns.setdefault(ns, []).extend(role["rules"])
        return cluster, by_ns

    cluster, by_ns = bound_rules(shim_sa)
    assert cluster == shim_rbac.cluster_rules()
    assert by_ns == shim_rbac.namespaced_rules(NS)
    cluster, by_ns = bound_rules(operator_sa)
    assert cluster == operator_rbac.rules() and by_ns == {}
    # One RBAC file per component.
    sources = re.findall(r"# Source: fleetlet/templates/(rbac-[a-z]+\.yaml)", _render((), (), "fleetlet", NS))
    assert sorted(set(sources)) == ["rbac-operator.yaml", "rbac-shim.yaml"]


def test_the_chart_ships_the_crds_and_runtimeclass_of_crds_byte_for_byte() -> None:
    kustomization = yaml.safe_load((CRDS / "kustomization.yaml").read_text())
    want = {(d["kind"], d["metadata"]["name"]): d
            for name in kustomization["resources"] for d in yaml.safe_load_all((CRDS / name).read_text())}

    def shipped(*sets: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in render(sets=sets)
                if o["kind"] in ("CustomResourceDefinition", "RuntimeClass")}

    assert shipped("crds.keep=false") == want
    kept = shipped()
    for doc in kept.values():
        assert doc["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert kept == want
    assert shipped("crds.enabled=false") == {}


def test_names_fit_in_63_characters_and_the_shims_in_52_for_a_long_release_name() -> None:
    release = "a-release-name-of-53-characters-the-most-helm-accepts"
    assert len(release) == 53
    objects = render("kind-values.yaml", "replicas-values.yaml", release=release)
    for o in objects:
        assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
        for value in o["metadata"].get("labels", {}).values():
            assert len(value) <= 63
    sts = find(objects, "StatefulSet", "-shim")
    assert len(sts["metadata"]["name"]) <= 52  # its pods' controller-revision-hash label is name-<10 chars>
    assert {o["metadata"]["name"].rsplit("-", 1)[-1] for o in objects if o["kind"] == "ServiceAccount"} == {
        "operator", "shim", "sim"}  # component suffixes survive the truncation


def test_selector_labels_are_a_stable_subset_of_the_labels() -> None:
    for o in (o for o in render("kind-values.yaml") if o["kind"] in ("Deployment", "StatefulSet")):
        selector = o["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
        assert selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector


def test_the_operator_and_shim_run_non_root_read_only_without_capabilities() -> None:
    objects = render()
    for workload in (find(objects, "Deployment", "-operator"), find(objects, "StatefulSet", "-shim")):
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}


# ---- certificates and keys -------------------------------------------------------------------------------------


def test_helm_made_certificates_chain_to_the_fleet_ca_and_name_every_address_cars_dial() -> None:
    objects = render("kind-values.yaml", "replicas-values.yaml")
    secrets = {o["metadata"]["name"].removeprefix("fleetlet-"): o for o in objects if o["kind"] == "Secret"}
    assert set(secrets) == {"fleet-ca", "link-tls", "kubelet-tls", "grant-key"}
    ca = cert_of(secrets["fleet-ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    link, kubelet = cert_of(secrets["link-tls"]), cert_of(secrets["kubelet-tls"])
    link.verify_directly_issued_by(ca)
    kubelet.verify_directly_issued_by(ca)
    shim = container(find(objects, "StatefulSet", "-shim"), "shim")
    hosts = {host_of(u) for u in flag(shim["args"], "replica-urls").split(",")}
    sim = container(find(objects, "Deployment", "-sim"), "sim")
    hosts.add(host_of(flag(sim["args"], "shim-url")))
    hosts |= {"cars.example.com", "192.0.2.10"}  # replicas-values.yaml: certificates.link
    for i in range(3):
        artifact = flag(expand(shim["args"], {"POD_NAME": f"fleetlet-shim-{i}"}), "artifact-url")
        hosts.add(host_of(artifact))
    for host in hosts:
        assert covers(link, host), f"the link certificate does not name {host}"
    assert len(b64decode(secrets["grant-key"]["data"]["grant.key"])) >= 32


def test_a_car_certified_by_the_charts_fleet_ca_and_the_shim_complete_the_links_tls_handshake(tmp_path: Path) -> None:
    """What fleetlet-sim and the shim do with the chart's Secrets: the sim issues each car a certificate from the
    fleet CA's key (fleetlet.pki), the shim serves the link certificate and demands a car certificate."""
    from fleetlet_car.link import car_ssl_context
    from fleetlet_shim.link.credentials import identity_from_peercert, server_ssl_context

    from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority, KeyPair

    objects = render("kind-values.yaml")
    for secret in (find(objects, "Secret", "-fleet-ca"), find(objects, "Secret", "-link-tls")):
        for key in ("tls.crt", "tls.key"):
            (tmp_path / f"{secret['metadata']['name']}-{key}").write_bytes(b64decode(secret["data"][key]))
    ca_crt, ca_key = tmp_path / "fleetlet-fleet-ca-tls.crt", tmp_path / "fleetlet-fleet-ca-tls.key"
    ca = CertificateAuthority(KeyPair(ca_crt.read_bytes(), ca_key.read_bytes()))
    car_crt, car_key = ca.issue("car-000000", organizations=(CAR_ORGANIZATION,), client=True).write(tmp_path, "car")
    server = server_ssl_context(ca_crt, tmp_path / "fleetlet-link-tls-tls.crt", tmp_path / "fleetlet-link-tls-tls.key")
    client = car_ssl_context(ca_crt, car_crt, car_key)
    link_host = host_of(flag(container(find(objects, "Deployment", "-sim"), "sim")["args"], "shim-url"))

    a, b = socket.socketpair()
    peer: list[Any] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                peer.append(tls.getpeercert())
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            peer.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=link_host) as tls:
            tls.sendall(b"x")
    except (ssl.SSLError, OSError):
        pass
    thread.join(10)
    assert isinstance(peer[0], dict), (
        f"the shim refused a car certificate that fleetlet.pki issued from the chart's fleet CA: {peer[0]}. "
        "fleetlet.pki must take the AuthorityKeyIdentifier from the CA's SubjectKeyIdentifier (a CA made by Go "
        ">= 1.25, as helm's genCA, uses truncated SHA-256 key ids, not the SHA-1 of the key)")
    assert identity_from_peercert(peer[0]).car == "car-000000"


def test_cert_manager_issues_the_same_names_from_the_fleet_ca() -> None:
    objects = render("cert-manager-values.yaml", "replicas-values.yaml")
    assert not [o for o in objects if o["kind"] == "Secret" and "grant" not in o["metadata"]["name"]]
    certs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    ca = certs["fleetlet-fleet-ca"]["spec"]
    assert ca["isCA"] and ca["issuerRef"] == {"name": "corporate-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    issuer = find(objects, "Issuer", "-fleet-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca["secretName"]
    link = certs["fleetlet-link-tls"]["spec"]
    assert link["issuerRef"]["name"] == issuer["metadata"]["name"]
    helm_made = cert_of(find(render("replicas-values.yaml"), "Secret", "-link-tls"))
    san = helm_made.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert link["dnsNames"] == san.get_values_for_type(x509.DNSName)
    shim = find(objects, "StatefulSet", "-shim")["spec"]["template"]["spec"]
    secret_names = {v["secret"]["secretName"] for v in shim["volumes"] if "secret" in v}
    assert {ca["secretName"], link["secretName"], certs["fleetlet-kubelet-tls"]["spec"]["secretName"]} <= secret_names


def test_existing_secrets_and_claim_are_used_and_nothing_is_made_in_their_place() -> None:
    objects = render("existing-secrets-values.yaml")
    assert not [o for o in objects if o["kind"] in ("Secret", "PersistentVolumeClaim", "CustomResourceDefinition",
                                                    "Certificate", "Issuer")]
    shim = find(objects, "StatefulSet", "fleetlet-shim")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in shim["volumes"]}
    assert volumes["fleet-ca"]["secret"]["secretName"] == "fleet-ca"
    assert volumes["link-tls"]["secret"]["secretName"] == "fleet-link-tls"
    assert volumes["kubelet-tls"]["secret"]["secretName"] == "fleet-kubelet-tls"
    assert volumes["grant-key"]["secret"]["secretName"] == "fleet-grant-key"
    assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "fleet-artifacts"
    assert shim["containers"][0]["image"] == (
        "registry.example.com/fleetlet@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert shim["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_cars_outside_the_cluster_are_redirected_to_public_per_replica_urls() -> None:
    from fleetlet_shim.__main__ import parser

    objects = render("external-cars-values.yaml")
    c = container(find(objects, "StatefulSet", "-shim"), "shim")
    args = parser().parse_args(expand(c["args"], {"POD_NAME": "fleetlet-shim-1", "SHIM_REPLICA": "1"}))
    assert args.replica_urls == "wss://shim-0.cars.example.com:8443/v1/link,wss://shim-1.cars.example.com:8443/v1/link"
    assert args.artifact_url == "https://shim-1.cars.example.com:8443"
    link = cert_of(find(objects, "Secret", "-link-tls"))
    assert covers(link, "shim-1.cars.example.com")
    service = find(objects, "Service", "fleetlet-shim")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]


# ---- the simulated fleet ---------------------------------------------------------------------------------------


def test_no_simulated_fleet_unless_asked() -> None:
    assert not [o for o in render() if o["metadata"]["name"].endswith("-sim")]


def test_the_simulated_fleet_dials_the_link_service_and_its_cars_hold_no_api_token() -> None:
    from fleetlet_car.sim.runner import _parser as sim_parser

    objects = render("kind-values.yaml")
    sim = find(objects, "Deployment", "-sim")
    spec = sim["spec"]["template"]["spec"]
    assert sim["spec"]["replicas"] == 1 and sim["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["automountServiceAccountToken"] is False
    c = container(sim, "sim")
    assert "api-token" not in {m["name"] for m in c["volumeMounts"]}
    args = sim_parser().parse_args(c["args"])
    link = find(objects, "Service", "fleetlet-shim")
    assert args.shim_url == f"wss://{link['metadata']['name']}.{NS}.svc.cluster.local:8443/v1/link"
    assert (args.cars, args.seed, args.allow_network_fallback) == (12, 42, False)
    # netns isolation: unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN, effective only for uid 0 in Kubernetes.
    assert spec["securityContext"]["runAsUser"] == 0
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    init = container(sim, "vehiclenodes", init=True)
    assert {m["name"] for m in init["volumeMounts"]} >= {"api-token", "script"}
    assert init["securityContext"]["runAsUser"] == 10001
    script = _load("apply_vehiclenodes", CHART / "files" / "apply_vehiclenodes.py")
    init_args = script.parser().parse_args(init["args"])
    assert (init_args.cars, init_args.seed, init_args.instance) == (args.cars, args.seed, "fleetlet")
    bodies = script.bodies(init_args.cars, init_args.seed, init_args.instance)
    assert [b["metadata"]["name"] for b in bodies] == [f"car-{i:06d}" for i in range(12)]
    configmap = find(objects, "ConfigMap", "-sim")
    assert configmap["data"]["apply_vehiclenodes.py"] == (CHART / "files" / "apply_vehiclenodes.py").read_text().rstrip("\n")


def test_the_restricted_simulated_fleet_uses_the_seccomp_fallback_without_privileges() -> None:
    from fleetlet_car.sim.runner import _parser as sim_parser

    sim = find(render("restricted-sim-values.yaml"), "Deployment", "-sim")
    spec = sim["spec"]["template"]["spec"]
    c = container(sim, "sim")
    args = sim_parser().parse_args(c["args"])
    assert args.allow_network_fallback and not args.no_schedules and args.speedup == 60
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}

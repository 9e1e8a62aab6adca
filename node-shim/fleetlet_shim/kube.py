"""The one module of the shim that talks to the Kubernetes API server.

What it is for: every read and write the shim makes — the informers it watches through, and each write a
controller makes (register a Node, report its status, set its car-state taints, renew a Lease, write a pod's
status, finish a pod's deletion, mirror telemetry into VehicleNode status, post an Event, ask a
SubjectAccessReview) — is a method here, declared with the RBAC verb it needs (``uses``). ``fleetlet_shim.rbac``
grants exactly the union of those declarations, so the ClusterRole names only the verbs the shim uses.

Objects are kept as trimmed projections (``project_*``): a shim serving thousands of cars holds a few fields of
each Node and pod, not whole bodies.

What it must never do: decide anything (controllers decide; this module only carries out), retry a create blindly
(409 goes back to the caller), or write a Node's taints without the resourceVersion it read them at.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from fleetlet.api.v1alpha1.meta import API_VERSION
from fleetlet.api.v1alpha1.taints import LABEL_VEHICLE
from fleetlet.kube import ApiError, Informer, KubeClient, resource_path
from fleetlet.kube.client import MERGE, STRATEGIC
from fleetlet.kube.events import write_event
from fleetlet.kube.rbac import Permissions

from . import nodespec

FIELD_MANAGER = "fleetlet-shim"
VN_PATH = resource_path(API_VERSION, "vehiclenodes")
NODES_PATH = resource_path("v1", "nodes")
PODS_PATH = resource_path("v1", "pods")
SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
REVOCATIONS_CONFIGMAP = "fleetlet-car-revocations"


PERMISSIONS = Permissions()
"""Every (group, resource, verb) the shim's API calls need; ``rbac`` renders the roles from it."""
uses = PERMISSIONS.uses
USES = PERMISSIONS.declared


# ---- projections: what the shim keeps of each object ---------------------------------------------------------


def project_node(node: dict[str, Any]) -> dict[str, Any]:
    """A Node as the shim needs it: identity, labels, taints, cordon, and its Ready condition."""
    meta, spec, status = node.get("metadata", {}), node.get("spec", {}), node.get("status", {})
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
    kept = {k: meta[k] for k in ("name", "uid", "resourceVersion", "labels", "deletionTimestamp") if k in meta}
    cordon = (meta.get("annotations") or {}).get("fleetlet.io/cordoned-by")
    if cordon is not None:
        kept["annotations"] = {"fleetlet.io/cordoned-by": cordon}
    return {
        "metadata": kept,
        "spec": {"taints": spec.get("taints") or [], "unschedulable": bool(spec.get("unschedulable"))},
        "status": {"ready": {k: ready.get(k) for k in ("status", "reason", "lastHeartbeatTime", "lastTransitionTime")}
                   if ready else None},
    }


def project_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod bound to a car: what the pod controller, the kubelet API and the contract parser read."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    containers = spec.get("containers") or []
    kept_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "deletionTimestamp",
                                      "deletionGracePeriodSeconds", "labels") if k in meta}
    annotations = meta.get("annotations") or {}
    if "fleetlet.io/assignment" in annotations:
        kept_meta["annotations"] = {"fleetlet.io/assignment": annotations["fleetlet.io/assignment"]}
    progress = next((c for c in status.get("conditions") or [] if c.get("type") == "fleetlet.io/Progress"), None)
    kept_status: dict[str, Any] = {k: status[k] for k in ("phase", "startTime") if k in status}
    if status.get("containerStatuses"):
        kept_status["containerStatuses"] = [
            {"name": s.get("name"), "state": s.get("state", {})} for s in status["containerStatuses"][:1]
        ]
    if progress is not None:
        kept_status["conditions"] = [progress]
    return {
        "metadata": kept_meta,
        "spec": {
            "nodeName": spec.get("nodeName", ""),
            "runtimeClassName": spec.get("runtimeClassName"),
            "terminationGracePeriodSeconds": spec.get("terminationGracePeriodSeconds", 30),
            "containers": [{k: c[k] for k in ("name", "image", "resources") if k in c} for c in containers],
        },
        "status": kept_status,
    }


def project_vehiclenode(vn: dict[str, Any]) -> dict[str, Any]:
    """A VehicleNode: its spec (the owner's rules) and what the shim must remember of its own status."""
    meta, status = vn.get("metadata", {}), vn.get("status") or {}
    kept_status = {k: status[k] for k in ("conditions", "trust") if k in status}
    return {
        "apiVersion": vn.get("apiVersion", API_VERSION),
        "kind": vn.get("kind", "VehicleNode"),
        "metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion", "generation", "deletionTimestamp")
                     if k in meta},
        "spec": vn.get("spec", {}),
        "status": kept_status,
    }


class UrgentWrites:
    """Which writes go first when the API server is the bottleneck.

    The API server queues all of the shim's requests in one flow (one user), first come first served. When 500
    cars change state at once, their taint writes and final pod statuses (what the scheduler and the user must see
    within seconds) would wait behind the steady stream of Lease renewals (200 a second at 5,000 cars), which can
    wait: a Lease stays valid for its duration, several seconds longer than the renewal interval. So urgent writes
    are counted while in flight, and routine writers call ``quiet`` first, which returns when no urgent write is
    in flight, or after ``max_wait_s`` at most."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.deferred = 0  # routine writes that found urgent ones in flight and waited

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        self._in_flight += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet.set()

    async def quiet(self, max_wait_s: float) -> None:
        if self._in_flight == 0 or max_wait_s <= 0:
            return
        self.deferred += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet.wait(), max_wait_s)


class ShimApi:
    """The shim's API calls. One instance per process, sharing one ``KubeClient`` (and its connection pool)."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.urgent = UrgentWrites()

    # ---- informers -----------------------------------------------------------------------------------------

    @uses("fleetlet.io", "vehiclenodes", "list", "watch")
    def vehiclenode_informer(self, keep: Callable[[dict[str, Any]], bool]) -> Informer:
        return Informer(self.kube, VN_PATH, name="vehiclenodes", transform=project_vehiclenode, keep=keep)

    @uses("", "nodes", "list", "watch")
    def node_informer(self, keep: Callable[[dict[str, Any]], bool]) -> Informer:
        return Informer(self.kube, NODES_PATH, name="nodes", transform=project_node, keep=keep,
                        labelSelector=f"{LABEL_VEHICLE}=true")

    @uses("", "pods", "list", "watch")
    def pod_informer(self, keep: Callable[[dict[str, Any]], bool]) -> Informer:
        # Only pods bound to a Node; of those the shim keeps the ones on cars it serves.
        return Informer(self.kube, PODS_PATH, name="pods", transform=project_pod, keep=keep,
                        fieldSelector="spec.nodeName!=")

    @uses("", "configmaps", "list", "watch", namespaced=True)
    def revocation_informer(self) -> Informer:
        return Informer(self.kube, resource_path("v1", "configmaps", self.namespace), name="revocations",
                        fieldSelector=f"metadata.name={REVOCATIONS_CONFIGMAP}")

    # ---- Nodes ---------------------------------------------------------------------------------------------

    @uses("", "nodes", "create")
    async def create_node(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.create(NODES_PATH, body, fieldManager=FIELD_MANAGER)

    @uses("", "nodes/status", "patch")
    async def apply_node_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.apply(resource_path("v1", "nodes", name=name, sub="status"),
                                     nodespec.node_status_apply(name, status), FIELD_MANAGER)

    @uses("", "nodes", "patch")
    async def patch_node(self, name: str, resource_version: str, labels: dict[str, str | None],
                         annotations: dict[str, str | None], taints: list[dict[str, Any]],
                         unschedulable: bool) -> dict[str, Any]:
        """Replace the Node's taint list (an atomic list) and set labels, annotations and cordon, only if the Node
        is still at ``resource_version``: a 409 means someone else wrote it meanwhile; the caller re-reads."""
        meta: dict[str, Any] = {"resourceVersion": resource_version}
        if labels:
            meta["labels"] = labels
        if annotations:
            meta["annotations"] = annotations
        body = {"metadata": meta, "spec": {"taints": taints, "unschedulable": unschedulable or None}}
        async with self.urgent.hold():  # the scheduler and the taint-eviction controller act on it
            return await self.kube.patch(resource_path("v1", "nodes", name=name), body, content_type=MERGE,
                                         fieldManager=FIELD_MANAGER)

    @uses("", "nodes", "get")
    async def get_node(self, name: str) -> dict[str, Any]:
        return project_node(await self.kube.get(resource_path("v1", "nodes", name=name)))

    # ---- Leases --------------------------------------------------------------------------------------------

    @uses("coordination.k8s.io", "leases", "create", "patch", namespaced=True)
    async def renew_lease(self, name: str, node_uid: str | None, duration_s: int, now: datetime,
                          exists: bool) -> None:
        """One write: PATCH the renewTime, or POST the Lease when it does not exist (each falls back to the other)."""
        leases = resource_path("coordination.k8s.io/v1", "leases", nodespec.NODE_LEASE_NAMESPACE)
        body = nodespec.lease_manifest(name, node_uid, duration_s, now)
        try:
            if exists:
                await self.kube.patch(f"{leases}/{name}", {"spec": body["spec"]})
            else:
                await self.kube.create(leases, body)
        except ApiError as exc:
            if not exists and exc.conflict:
                await self.kube.patch(f"{leases}/{name}", {"spec": body["spec"]})
            elif exists and exc.not_found:
                await self.kube.create(leases, body)
            else:
                raise

    # ---- pods ----------------------------------------------------------------------------------------------

    @uses("", "pods/status", "patch")
    async def patch_pod_status(self, namespace: str, name: str, uid: str, status: dict[str, Any],
                               urgent: bool = False) -> None:
        """``urgent``: a pod's end (the operator reschedules its shard on it), not a progress report."""
        # The uid in the patch makes it a precondition: a new pod that took the old one's name is never touched.
        body = {"metadata": {"uid": uid}, "status": status}
        path = resource_path("v1", "pods", namespace, name, "status")
        if not urgent:
            await self.kube.patch(path, body, content_type=STRATEGIC)
            return
        async with self.urgent.hold():
            await self.kube.patch(path, body, content_type=STRATEGIC)

    @uses("", "pods", "delete")
    async def finish_pod_deletion(self, namespace: str, name: str, uid: str) -> None:
        """Delete with grace 0 (what a kubelet does once the containers are gone); gone or replaced is fine."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            await self.kube.request("DELETE", resource_path("v1", "pods", namespace, name), body=body)
        except ApiError as exc:
            if not (exc.not_found or exc.conflict):
                raise

    # ---- VehicleNodes --------------------------------------------------------------------------------------

    @uses("fleetlet.io", "vehiclenodes/status", "patch")
    async def patch_vehiclenode_status(self, name: str, status: dict[str, Any]) -> None:
        await self.kube.patch(resource_path(API_VERSION, "vehiclenodes", name=name, sub="status"),
                              {"status": status}, content_type=MERGE)

    # ---- Events --------------------------------------------------------------------------------------------

    @uses("", "events", "create", "patch", namespaced=True)
    async def post_event(self, body: dict[str, Any], *, update: bool) -> None:
        await write_event(self.kube, body, update=update)

    # ---- authorization -------------------------------------------------------------------------------------

    @uses("authorization.k8s.io", "subjectaccessreviews", "create")
    async def may_proxy_node(self, user: str, groups: list[str], node: str) -> bool:
        """May ``user`` read logs on ``node``? (``nodes/proxy``, what the kubelet checks.)"""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups,
                     "resourceAttributes": {"verb": "get", "resource": "nodes", "subresource": "proxy",
                                            "name": node}},
        }
        answer = await self.kube.create(SAR_PATH, review)
        return bool(answer.get("status", {}).get("allowed"))

"""The one module of the operator that talks to the Kubernetes API server through Fleetlet's lean client.

(kopf has its own client: it watches FleetJobs and posts Events. Everything else — shard pods, the ledger, the
cars' trust records and finalizers, FleetJob status — goes through here.) Each method declares the RBAC verb it
needs (``uses``), and the operator's ClusterRole is rendered from those declarations.

Shard pods and VehicleNodes are watched through the controller toolkit's informers with trimmed projections: an
operator with 10,000 pods and 5,000 cars keeps a few hundred bytes of each, not whole bodies.

What it must never do: decide anything, or retry a create blindly (409 goes back to the caller, who knows whether
it is its own object).
"""

from __future__ import annotations

from typing import Any

from fleetlet.api.v1alpha1.meta import API_VERSION
from fleetlet.api.v1alpha1.shard import ANNOTATION, PROGRESS_CONDITION
from fleetlet.api.v1alpha1.taints import LABEL_VEHICLE
from fleetlet.kube import ApiError, Informer, KubeClient, resource_path
from fleetlet.kube.client import MERGE
from fleetlet.kube.events import write_event
from fleetlet.kube.rbac import Permission, Permissions

from .reconcile.model import ANNOTATION_CARRIED, LABEL_JOB_UID

FIELD_MANAGER = "fleetlet-operator"
PODS = resource_path("v1", "pods")
VEHICLENODES = resource_path(API_VERSION, "vehiclenodes")
LEDGER_LABEL = "fleetlet.io/ledger"


PERMISSIONS = Permissions()
"""Every (group, resource, verb) the operator's own API calls need; ``rbac`` renders its role from it."""
uses = PERMISSIONS.uses
USES = PERMISSIONS.declared


# kopf's own calls (it watches FleetJobs and writes nothing): granted by the chart and the tests.
KOPF_USES = [Permission("fleetlet.io", "fleetjobs", "list"), Permission("fleetlet.io", "fleetjobs", "watch")]


def project_pod(pod: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    annotations = meta.get("annotations") or {}
    kept_conditions = [c for c in status.get("conditions") or []
                       if c.get("type") in (PROGRESS_CONDITION, "PodScheduled")]
    statuses = [{"state": {k: v for k, v in (s.get("state") or {}).items() if k == "terminated"}}
                for s in (status.get("containerStatuses") or [])[:1]]
    return {
        "metadata": {
            **{k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp",
                                    "deletionTimestamp", "labels") if k in meta},
            "annotations": {k: annotations[k] for k in (ANNOTATION, ANNOTATION_CARRIED) if k in annotations},
        },
        "spec": {"nodeName": spec.get("nodeName", "")},
        "status": {
            **{k: status[k] for k in ("phase", "reason", "message") if k in status},
            "conditions": kept_conditions,
            "containerStatuses": statuses,
        },
    }


def project_vehiclenode(vn: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = vn.get("metadata", {}), vn.get("spec", {}), vn.get("status") or {}
    return {
        "metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion", "finalizers", "deletionTimestamp")
                     if k in meta},
        "spec": {"owner": {"id": (spec.get("owner") or {}).get("id", "")}},
        "status": {"trust": status.get("trust") or {}},
    }


def project_node(node: dict[str, Any]) -> dict[str, Any]:
    """A car's Node: only whether it is Ready, and since when (the planner's lost-car fallback)."""
    meta = node.get("metadata", {})
    conditions = (node.get("status") or {}).get("conditions") or []
    return {
        "metadata": {k: meta[k] for k in ("name", "resourceVersion") if k in meta},
        "status": {"conditions": [{k: c[k] for k in ("type", "status", "lastTransitionTime") if k in c}
                                  for c in conditions if c.get("type") == "Ready"]},
    }


class OperatorApi:
    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    # ---- informers -----------------------------------------------------------------------------------------

    @uses("", "pods", "list", "watch")
    def pod_informer(self) -> Informer:
        return Informer(self.kube, PODS, name="shard-pods", transform=project_pod, labelSelector=LABEL_JOB_UID)

    @uses("fleetlet.io", "vehiclenodes", "list", "watch")
    def vehiclenode_informer(self) -> Informer:
        return Informer(self.kube, VEHICLENODES, name="vehiclenodes", transform=project_vehiclenode)

    @uses("", "nodes", "list", "watch")
    def car_node_informer(self) -> Informer:
        """Car Nodes only (label ``fleetlet.io/vehicle``), trimmed to their Ready condition."""
        return Informer(self.kube, resource_path("v1", "nodes"), name="car-nodes", transform=project_node,
                        labelSelector=f"{LABEL_VEHICLE}=true")

    # ---- shard pods ----------------------------------------------------------------------------------------

    @uses("", "pods", "create")
    async def create_pod(self, body: dict[str, Any]) -> bool:
        """Create a shard pod; False if one of that name exists (its names are deterministic: it is ours)."""
        try:
            await self.kube.create(resource_path("v1", "pods", body["metadata"]["namespace"]), body,
                                   fieldManager=FIELD_MANAGER)
            return True
        except ApiError as exc:
            if exc.conflict:
                return False
            raise

    @uses("", "pods", "delete")
    async def delete_pod(self, namespace: str, name: str, grace_period_s: int | None = None) -> None:
        """Delete gracefully (the car stops at a checkpoint), or with ``grace_period_s=0`` a pod on a car that is
        gone (no kubelet is left to confirm); gone already is fine."""
        try:
            await self.kube.delete(resource_path("v1", "pods", namespace, name), grace_period_s=grace_period_s)
        except ApiError as exc:
            if not exc.not_found:
                raise

    @uses("scheduling.k8s.io", "priorityclasses", "create")
    async def ensure_priority_class(self, name: str, value: int) -> None:
        body = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
                "value": value, "preemptionPolicy": "Never", "globalDefault": False,
                "description": "FleetJob shard pods of this spec.priority (orders the scheduling queue; never "
                               "preempts: a car's shard resumes from checkpoints, it is not evicted for another)"}
        try:
            await self.kube.create("/apis/scheduling.k8s.io/v1/priorityclasses", body)
        except ApiError as exc:
            if not exc.conflict:
                raise

    # ---- FleetJobs -----------------------------------------------------------------------------------------

    @uses("fleetlet.io", "fleetjobs/status", "patch")
    async def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.kube.patch(resource_path(API_VERSION, "fleetjobs", namespace, name, "status"),
                              {"status": status}, content_type=MERGE)

    @uses("fleetlet.io", "fleetjobs", "patch")
    async def set_job_finalizers(self, namespace: str, name: str, finalizers: list[str], rv: str) -> None:
        await self.kube.patch(resource_path(API_VERSION, "fleetjobs", namespace, name),
                              {"metadata": {"finalizers": finalizers, "resourceVersion": rv}}, content_type=MERGE)

    # ---- the ledger ----------------------------------------------------------------------------------------

    @uses("", "configmaps", "list")
    async def list_ledger(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            page = await self.kube.list(resource_path("v1", "configmaps", namespace),
                                        labelSelector=f"{LEDGER_LABEL}={job_uid}", limit=100,
                                        **{"continue": cont})
            out += page.get("items", [])
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return out

    @uses("", "configmaps", "create", "update", "get")
    async def write_ledger(self, namespace: str, name: str, job_uid: str, job_name: str, data: dict[str, str],
                           owner: dict[str, Any], rv: str | None) -> str:
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {LEDGER_LABEL: job_uid, "app.kubernetes.io/managed-by": FIELD_MANAGER},
                         "annotations": {"fleetlet.io/job": job_name},
                         "ownerReferences": [owner]},
            "data": data,
        }
        if rv is None:
            try:
                made = await self.kube.create(resource_path("v1", "configmaps", namespace), body)
                return str(made["metadata"]["resourceVersion"])
            except ApiError as exc:
                if not exc.conflict:
                    raise
                current = await self.kube.get(resource_path("v1", "configmaps", namespace, name))
                rv = str(current["metadata"]["resourceVersion"])
        body["metadata"]["resourceVersion"] = rv
        done = await self.kube.replace(resource_path("v1", "configmaps", namespace, name), body)
        return str(done["metadata"]["resourceVersion"])

    # ---- Events ------------------------------------------------------------------------------------------

    @uses("", "events", "create", "patch")
    async def post_event(self, body: dict[str, Any], *, update: bool) -> None:
        await write_event(self.kube, body, update=update)

    # ---- VehicleNodes --------------------------------------------------------------------------------------

    @uses("fleetlet.io", "vehiclenodes/status", "patch")
    async def patch_trust(self, name: str, trust: dict[str, Any]) -> None:
        await self.kube.patch(resource_path(API_VERSION, "vehiclenodes", name=name, sub="status"),
                              {"status": {"trust": trust}}, content_type=MERGE)

    @uses("fleetlet.io", "vehiclenodes", "patch")
    async def set_vehiclenode_finalizers(self, name: str, finalizers: list[str], rv: str) -> None:
        await self.kube.patch(resource_path(API_VERSION, "vehiclenodes", name=name),
                              {"metadata": {"finalizers": finalizers, "resourceVersion": rv}}, content_type=MERGE)

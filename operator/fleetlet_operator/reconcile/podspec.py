"""A shard pod, built from the one shard contract and the job's placement: everything the kube-scheduler needs to
place it only where the job and the car's owner allow, and nothing it must decide for the scheduler.

- the ``ShardAssignment`` goes on the pod with ``apply_to_pod`` (annotation + requests == limits), so the shim
  reads back exactly what the operator wrote;
- RuntimeClass ``fleetlet-onnx`` (it adds the vehicle toleration and a car node selector);
- tolerations the job allows: ``fleetlet.io/unplugged=on-battery`` only with ``allowUnplugged`` (never the
  owner-requires-plug value), never driving, battery-critical, overheat; a bounded wait for a car whose link
  dropped (``node.kubernetes.io/not-ready|unreachable``) before the shard is rescheduled elsewhere;
- node affinity for accelerator types, regions and ``minStateOfCharge`` (the state-of-charge decile label, Gt);
- for replicas of one shard: anti-affinity across cars and owners, and the cars and owners that already ran the
  shard excluded outright (a finished pod no longer repels a new one);
- priority through a PriorityClass, an owner reference to the FleetJob, no service account token, no env.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1 import taints as t
from fleetlet.api.v1alpha1.shard import (
    ShardAssignment,
    ShardCheckpoint,
    ShardInput,
    ShardModel,
    ShardResources,
)

from .model import (
    ANNOTATION_CARRIED,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_UID,
    LABEL_REPLICA,
    LABEL_SHARD,
    PodCreate,
)

TERMINATION_GRACE_S = 30  # time for a graceful stop to write a checkpoint
MANAGED_BY = "fleetlet-operator"


def pod_name(job: str, shard: int, replica: int, attempt: int) -> str:
    """``<job>-<shard>-<replica>-<attempt>``: deterministic, so a create is idempotent (409 = it exists)."""
    suffix = f"-{shard}-{replica}-{attempt}"
    if len(job) + len(suffix) <= 253:
        return job + suffix
    digest = hashlib.sha256(job.encode()).hexdigest()[:10]
    # A cut right after a '.' would start a DNS label with '-' (an invalid name): cut before it.
    return f"{job[: 253 - len(suffix) - 11].rstrip('.-')}-{digest}{suffix}"


def label_value(text: str) -> str:
    """A label value (at most 63 characters) that stays unique for long names."""
    if len(text) <= 63:
        return text
    return f"{text[:52]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def priority_class(priority: int) -> str | None:
    if priority == 0:
        return None
    return f"fleetlet-priority-{priority}" if priority > 0 else f"fleetlet-priority-minus-{-priority}"


def shard_selector(job_uid: str, shard: int) -> dict[str, str]:
    return {LABEL_JOB_UID: job_uid, LABEL_SHARD: str(shard)}


def shard_pod(job: FleetJob, create: PodCreate, *, model_digest: str, input_digest: str, items: int,
              unreachable_toleration_s: int, anti_affinity: bool) -> dict[str, Any]:
    """The shard pod for ``create``. ``input_digest`` is the shard's own input blob (items ``[0, items)``)."""
    spec = job.spec
    meta = job.metadata
    assert meta.name and meta.namespace and meta.uid
    assignment = ShardAssignment(
        model=ShardModel(sha256=model_digest, runtime=spec.model.runtime),
        input=ShardInput(sha256=input_digest, format=spec.input.format, start=0, end=items),
        resume_from=create.resume if _useful(create.resume, items) else None,
        resources=ShardResources(cpu=spec.resources.cpu, memory=spec.resources.memory,
                                 accelerator=spec.resources.accelerator),
    )
    labels = {
        LABEL_JOB: label_value(meta.name),
        LABEL_JOB_UID: meta.uid,
        LABEL_SHARD: str(create.shard),
        LABEL_REPLICA: str(create.replica),
        LABEL_ATTEMPT: str(create.attempt),
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    tolerations: list[dict[str, Any]] = [  # (the RuntimeClass adds the fleetlet.io/vehicle toleration)
        # A car whose link dropped may come back within minutes and finish; past this it resumes elsewhere.
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": unreachable_toleration_s},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": unreachable_toleration_s},
    ]
    if spec.placement.allow_unplugged:
        tolerations.append({"key": t.UNPLUGGED, "operator": "Equal", "value": t.UNPLUGGED_ON_BATTERY,
                            "effect": "NoSchedule"})
    expressions: list[dict[str, Any]] = [{"key": t.LABEL_VEHICLE, "operator": "In", "values": ["true"]}]
    if spec.placement.accelerator_types:
        expressions.append({"key": t.LABEL_ACCELERATOR, "operator": "In",
                            "values": list(spec.placement.accelerator_types)})
    if spec.placement.regions:
        expressions.append({"key": t.LABEL_REGION, "operator": "In", "values": list(spec.placement.regions)})
    if spec.placement.min_state_of_charge:
        # The label is the decile: a floor of 0.6 needs band >= 6, i.e. Gt 5 (the floor rounds up to a decile).
        band = math.ceil(round(spec.placement.min_state_of_charge * 10, 6))
        expressions.append({"key": t.LABEL_SOC_BAND, "operator": "Gt", "values": [str(band - 1)]})
    if create.exclude_cars:
        expressions.append({"key": "kubernetes.io/hostname", "operator": "NotIn",
                            "values": sorted(create.exclude_cars)})
    if create.exclude_owners:
        expressions.append({"key": t.LABEL_OWNER, "operator": "NotIn", "values": sorted(create.exclude_owners)})
    affinity: dict[str, Any] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": expressions}]}},
    }
    if anti_affinity:
        selector = {"matchLabels": shard_selector(meta.uid, create.shard)}
        affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"},
            {"labelSelector": selector, "topologyKey": t.LABEL_OWNER},
        ]}
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(meta.name, create.shard, create.replica, create.attempt),
            "namespace": meta.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_CARRIED: create.carried.annotation()},
            "ownerReferences": [{"apiVersion": job.api_version, "kind": job.kind, "name": meta.name,
                                 "uid": meta.uid, "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "runtimeClassName": t.RUNTIME_CLASS_ONNX,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "tolerations": tolerations,
            "affinity": affinity,
            "containers": [{"name": "shard", "image": f"fleetlet.io/{spec.model.runtime}@sha256:{model_digest}"}],
        },
    }
    cls = priority_class(spec.priority)
    if cls is not None:
        pod["spec"]["priorityClassName"] = cls
    return assignment.apply_to_pod(pod)


def _useful(checkpoint: ShardCheckpoint | None, items: int) -> bool:
    return checkpoint is not None and 0 < checkpoint.items_done < items

"""A shard pod (``reconcile.podspec.shard_pod``) lets the real kube-scheduler place it only where the job and the
car's owner allow: the assignment round-trips to the shim unchanged, the tolerations never reach a driving, hot,
critically low or plug-only car, node affinity keeps the job's placement, replicas repel across cars and owners,
and names and labels stay within the API's limits. Placement is checked the way the scheduler reads it: taints
against tolerations and node labels against match expressions."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from fleetlet_operator.reconcile.model import (
    ANNOTATION_CARRIED,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_UID,
    LABEL_REPLICA,
    LABEL_SHARD,
    Carried,
    PodCreate,
)
from fleetlet_operator.reconcile.podspec import label_value, pod_name, priority_class, shard_pod

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1 import taints as t
from fleetlet.api.v1alpha1.shard import (
    ShardAssignment,
    ShardCheckpoint,
    ShardInput,
    ShardModel,
    ShardResources,
)

UID = "6b0c55a1-2b7e-4c1e-9d7f-5d0f1f5e0a11"
MODEL = hashlib.sha256(b"model").hexdigest()
INPUT = hashlib.sha256(b"shard input").hexdigest()
TOLERATION_S = 120
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def make_job(name: str = "digits", *, placement: dict[str, Any] | None = None,
             resources: dict[str, Any] | None = None, priority: int = 0) -> FleetJob:
    return FleetJob.model_validate({
        "metadata": {"name": name, "namespace": "team-a", "uid": UID, "generation": 3},
        "spec": {
            "model": {"uri": "fleetlet://artifacts/model.onnx", "sha256": MODEL},
            "input": {"uri": "fleetlet://artifacts/input.npz", "items": 1000, "format": "npz"},
            "shardSize": 100,
            "placement": placement or {},
            "resources": resources or {},
            "priority": priority,
        },
    })


def create(shard: int = 3, replica: int = 0, attempt: int = 0, resume: ShardCheckpoint | None = None,
           carried: Carried | None = None, exclude_cars: tuple[str, ...] = (),
           exclude_owners: tuple[str, ...] = ()) -> PodCreate:
    return PodCreate(shard, replica, attempt, resume, carried or Carried(), exclude_cars, exclude_owners)


def build(job: FleetJob | None = None, c: PodCreate | None = None, *, items: int = 100,
          anti_affinity: bool = False) -> dict[str, Any]:
    return shard_pod(job or make_job(), c or create(), model_digest=MODEL, input_digest=INPUT, items=items,
                     unreachable_toleration_s=TOLERATION_S, anti_affinity=anti_affinity)


def ck(items_done: int) -> ShardCheckpoint:
    return ShardCheckpoint(sha256=hashlib.sha256(f"ck{items_done}".encode()).hexdigest(), items_done=items_done)


# ---- how the scheduler reads a pod ------------------------------------------------------------------------------


def tolerated(pod: dict[str, Any], key: str, value: str | None, effect: str) -> bool:
    """Kubernetes' toleration matching (v1.Toleration.ToleratesTaint)."""
    for tol in pod["spec"].get("tolerations", []):
        if tol.get("effect") and tol["effect"] != effect:
            continue
        if tol.get("key") and tol["key"] != key:
            continue
        op = tol.get("operator", "Equal")
        if op == "Exists" or (op == "Equal" and tol.get("value") == value):
            return True
    return False


def fits(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """The required node affinity against a Node's labels (terms ORed, expressions ANDed)."""
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]

    def one(e: dict[str, Any]) -> bool:
        have = labels.get(e["key"])
        match e["operator"]:
            case "In":
                return have in e["values"]
            case "NotIn":
                return have not in e["values"]
            case "Exists":
                return have is not None
            case "Gt":
                return have is not None and int(have) > int(e["values"][0])
            case "Lt":
                return have is not None and int(have) < int(e["values"][0])
        raise AssertionError(f"unknown operator {e['operator']}")

    return any(all(one(e) for e in term["matchExpressions"]) for term in terms)


def car(name: str = "car-1", *, owner: str = "owner-1", soc: float = 0.8, accelerator: str = "none",
        region: str = "eu-west") -> dict[str, str]:
    """A car Node's labels as the shim writes them."""
    return {t.LABEL_VEHICLE: "true", "kubernetes.io/hostname": name, t.LABEL_OWNER: owner,
            t.LABEL_SOC_BAND: str(t.soc_band(soc)), t.LABEL_ACCELERATOR: accelerator, t.LABEL_REGION: region}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# ---- the assignment ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resources, items, resume, resumed", [
    ({}, 100, None, None),
    ({"cpu": "2", "memory": "1Gi"}, 100, ck(40), ck(40)),
    ({"cpu": "500m", "memory": "256Mi", "accelerator": 1}, 37, ck(36), ck(36)),
    ({}, 100, ck(0), None),  # nothing done yet: start from the input
    ({}, 100, ck(100), None),  # not before the end: the shard starts over
])
def test_the_assignment_round_trips_to_the_shim_with_requests_equal_to_limits(
        resources: dict[str, Any], items: int, resume: ShardCheckpoint | None,
        resumed: ShardCheckpoint | None) -> None:
    placement = {"acceleratorTypes": ["hw4"]} if resources.get("accelerator") else {}
    job = make_job(resources=resources, placement=placement)
    pod = build(job, create(resume=resume), items=items)
    want = ShardAssignment(
        model=ShardModel(sha256=MODEL, runtime="onnx"),
        input=ShardInput(sha256=INPUT, format="npz", start=0, end=items),
        resume_from=resumed,
        resources=ShardResources(cpu=job.spec.resources.cpu, memory=job.spec.resources.memory,
                                 accelerator=job.spec.resources.accelerator),
    )
    assert ShardAssignment.from_pod(pod) == want
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert (t.RESOURCE_ACCELERATOR in container["resources"]["limits"]) == bool(resources.get("accelerator"))


def test_what_earlier_attempts_carried_travels_on_the_pod() -> None:
    carried = Carried(0.125, 2, ("car-7", "car-9"))
    pod = build(c=create(attempt=2, carried=carried))
    assert Carried.parse(pod["metadata"]["annotations"][ANNOTATION_CARRIED]) == carried


def test_a_shard_pod_runs_sandboxed_without_credentials_and_never_restarts_in_place() -> None:
    spec = build()["spec"]
    assert spec["runtimeClassName"] == t.RUNTIME_CLASS_ONNX
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert all("env" not in c and "envFrom" not in c for c in spec["containers"])


# ---- tolerations ---------------------------------------------------------------------------------------------


NEVER = [(key, None, effect) for key, effect in t.TAINT_EFFECTS.items() if key not in (t.UNPLUGGED, t.VEHICLE)]


@pytest.mark.parametrize("allow_unplugged", [False, True])
def test_tolerations_reach_an_unplugged_car_only_when_allowed_and_never_an_unsafe_one(allow_unplugged: bool) -> None:
    pod = build(make_job(placement={"allowUnplugged": allow_unplugged}))
    assert tolerated(pod, t.UNPLUGGED, t.UNPLUGGED_ON_BATTERY, "NoSchedule") is allow_unplugged
    assert not tolerated(pod, t.UNPLUGGED, t.UNPLUGGED_OWNER_REQUIRES_PLUG, "NoSchedule")
    for key, value, effect in NEVER:
        assert not tolerated(pod, key, value, effect), key
        assert not tolerated(pod, key, "anything", effect), key
    if allow_unplugged:
        (unplugged,) = [x for x in pod["spec"]["tolerations"] if x["key"] == t.UNPLUGGED]
        assert unplugged == {"key": t.UNPLUGGED, "operator": "Equal", "value": t.UNPLUGGED_ON_BATTERY,
                             "effect": "NoSchedule"}


@pytest.mark.parametrize("key", ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"])
def test_a_car_whose_link_dropped_is_waited_for_a_bounded_time(key: str) -> None:
    pod = build()
    assert tolerated(pod, key, None, "NoExecute")
    (tol,) = [x for x in pod["spec"]["tolerations"] if x["key"] == key]
    assert tol["tolerationSeconds"] == TOLERATION_S


def test_no_toleration_is_a_wildcard() -> None:
    assert all(x.get("key") for x in build(make_job(placement={"allowUnplugged": True}))["spec"]["tolerations"])


# ---- node affinity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("floor, threshold", [(0.6, "5"), (0.65, "6"), (0.05, "0"), (1.0, "9"), (0.3, "2")])
def test_min_state_of_charge_becomes_a_soc_band_decile_floor(floor: float, threshold: str) -> None:
    pod = build(make_job(placement={"minStateOfCharge": floor}))
    (expr,) = [e for e in _expressions(pod) if e["key"] == t.LABEL_SOC_BAND]
    assert expr == {"key": t.LABEL_SOC_BAND, "operator": "Gt", "values": [threshold]}


@pytest.mark.parametrize("floor, soc, allowed", [
    (0.6, 0.60, True), (0.6, 0.59, False), (0.6, 1.0, True),
    (0.65, 0.64, False), (0.65, 0.70, True),  # a floor inside a decile rounds up: never a car under it
    (1.0, 0.99, False), (1.0, 1.0, True),
])
def test_no_car_under_the_jobs_charge_floor_is_eligible(floor: float, soc: float, allowed: bool) -> None:
    pod = build(make_job(placement={"minStateOfCharge": floor}))
    assert fits(pod, car(soc=soc)) is allowed


@pytest.mark.parametrize("floor", [None, 0.0])
def test_no_charge_floor_means_no_soc_expression(floor: float | None) -> None:
    placement = {} if floor is None else {"minStateOfCharge": floor}
    assert all(e["key"] != t.LABEL_SOC_BAND for e in _expressions(build(make_job(placement=placement))))


@pytest.mark.parametrize("labels, allowed", [
    (car(accelerator="hw4", region="eu-west"), True),
    (car(accelerator="hw3", region="eu-west"), True),
    (car(accelerator="none", region="eu-west"), False),
    (car(accelerator="hw4", region="us-east"), False),
    ({**car(accelerator="hw4"), t.LABEL_VEHICLE: "false"}, False),
    ({"kubernetes.io/hostname": "ordinary-node"}, False),
])
def test_node_affinity_keeps_the_jobs_accelerator_types_and_regions(labels: dict[str, str], allowed: bool) -> None:
    job = make_job(placement={"acceleratorTypes": ["hw3", "hw4"], "regions": ["eu-west", "eu-north"]},
                   resources={"accelerator": 1})
    assert fits(build(job), labels) is allowed


def test_cars_and_owners_that_already_ran_the_shard_are_excluded() -> None:
    pod = build(c=create(replica=1, exclude_cars=("car-b", "car-a"), exclude_owners=("owner-a",)))
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["car-a", "car-b"]} in _expressions(pod)
    assert {"key": t.LABEL_OWNER, "operator": "NotIn", "values": ["owner-a"]} in _expressions(pod)
    assert not fits(pod, car("car-a", owner="owner-z"))
    assert not fits(pod, car("car-c", owner="owner-a"))
    assert fits(pod, car("car-c", owner="owner-c"))


def _expressions(pod: dict[str, Any]) -> list[dict[str, Any]]:
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert len(terms) == 1
    exprs: list[dict[str, Any]] = terms[0]["matchExpressions"]
    return exprs


# ---- replicas repel each other ---------------------------------------------------------------------------------


def test_replicas_of_a_shard_repel_across_cars_and_owners_and_only_each_other() -> None:
    pod = build(c=create(shard=3, replica=1), anti_affinity=True)
    terms = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert sorted(x["topologyKey"] for x in terms) == sorted(["kubernetes.io/hostname", t.LABEL_OWNER])
    sibling = build(c=create(shard=3, replica=0))["metadata"]["labels"]
    other_shard = build(c=create(shard=4, replica=0))["metadata"]["labels"]
    other_job = {**sibling, LABEL_JOB_UID: "another-job-uid"}
    for term in terms:
        assert matches(term["labelSelector"], sibling)
        assert not matches(term["labelSelector"], other_shard)
        assert not matches(term["labelSelector"], other_job)
    assert "podAntiAffinity" not in build(anti_affinity=False)["spec"]["affinity"]


# ---- priority, ownership, names, labels -------------------------------------------------------------------------


@pytest.mark.parametrize("priority, cls", [(0, None), (100, "fleetlet-priority-100"),
                                           (-5, "fleetlet-priority-minus-5"), (1000, "fleetlet-priority-1000")])
def test_priority_becomes_a_priority_class_and_none_for_zero(priority: int, cls: str | None) -> None:
    pod = build(make_job(priority=priority))
    assert pod["spec"].get("priorityClassName") == cls == priority_class(priority)
    if cls is not None:
        assert DNS_SUBDOMAIN.match(cls)


def test_the_fleetjob_controls_its_pods() -> None:
    job = make_job()
    (ref,) = build(job)["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "fleetlet.io/v1alpha1", "kind": "FleetJob", "name": "digits", "uid": UID,
                   "controller": True, "blockOwnerDeletion": True}


def test_pods_are_named_and_labelled_by_job_shard_replica_and_attempt() -> None:
    meta = build(c=create(shard=12, replica=2, attempt=5))["metadata"]
    assert (meta["name"], meta["namespace"]) == ("digits-12-2-5", "team-a")
    assert {k: meta["labels"][k] for k in (LABEL_JOB, LABEL_JOB_UID, LABEL_SHARD, LABEL_REPLICA, LABEL_ATTEMPT)} == {
        LABEL_JOB: "digits", LABEL_JOB_UID: UID, LABEL_SHARD: "12", LABEL_REPLICA: "2", LABEL_ATTEMPT: "5"}
    assert build(c=create(shard=12, replica=2, attempt=5)) == build(c=create(shard=12, replica=2, attempt=5))


LONG = "a" * 253
LONG_DOTTED = "a" * 235 + "." + "b" * 17  # the cut for a long name lands right after the dot
LONG_HYPHEN = "a" * 235 + "-" + "b" * 17


@pytest.mark.parametrize("job", ["digits", "x" * 240, LONG, LONG_DOTTED, LONG_HYPHEN, "a.b." * 63 + "c"])
@pytest.mark.parametrize("suffix", [(0, 0, 0), (99_999, 4, 100)])
def test_pod_names_are_valid_dns_subdomains_within_253_characters(job: str, suffix: tuple[int, int, int]) -> None:
    name = pod_name(job, *suffix)
    assert len(name) <= 253 and DNS_SUBDOMAIN.match(name), name
    assert name.endswith("-{}-{}-{}".format(*suffix))
    assert pod_name(job, *suffix) == name


def test_long_job_names_that_share_a_prefix_still_get_distinct_pod_names_and_labels() -> None:
    a, b = "j" * 250 + "one", "j" * 250 + "two"
    assert pod_name(a, 1, 0, 0) != pod_name(b, 1, 0, 0)
    assert label_value(a) != label_value(b)


@pytest.mark.parametrize("text", ["digits", "x" * 63, "x" * 64, LONG, LONG_DOTTED, "a-" * 40])
def test_label_values_are_valid_within_63_characters(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value
    assert (value == text) == (len(text) <= 63)


def test_a_long_job_name_gives_valid_pod_metadata() -> None:
    meta = build(make_job(LONG_DOTTED), create(shard=7, replica=1, attempt=2))["metadata"]
    assert len(meta["name"]) <= 253 and DNS_SUBDOMAIN.match(meta["name"])
    assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in meta["labels"].values())

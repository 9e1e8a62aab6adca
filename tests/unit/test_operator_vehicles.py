"""The operator's view of a car: a car Node that stops being Ready marks the car lost from that moment, whichever
informer speaks first, and a Ready Node (or a deleted one) clears it. No API server: the informers are fed
directly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fleetlet_operator.kube import project_node, project_vehiclenode
from fleetlet_operator.metrics import OperatorMetrics
from fleetlet_operator.reconcile.model import TrustVerdict
from fleetlet_operator.vehicles import VehicleController
from prometheus_client import CollectorRegistry

from fleetlet.kube import Change, Informer

T = "2026-11-24T10:00:00Z"


def node(name: str, ready: str, since: str = T) -> dict[str, Any]:
    return project_node({"metadata": {"name": name, "resourceVersion": "1", "labels": {"x": "y"}},
                         "status": {"conditions": [
                             {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                             {"type": "Ready", "status": ready, "lastTransitionTime": since,
                              "reason": "NodeStatusUnknown"}]}})


def vehiclenode(name: str) -> dict[str, Any]:
    return project_vehiclenode({"metadata": {"name": name, "uid": "u", "resourceVersion": "1"},
                                "spec": {"owner": {"id": "owner-1"}}, "status": {"trust": {"validStreak": 3}}})


def controller() -> tuple[VehicleController, Informer, Informer]:
    vns, pods, nodes = (Informer(None, f"/x/{n}", name=n) for n in ("vn", "pods", "nodes"))  # type: ignore[arg-type]
    ctl = VehicleController(None, vns, pods, OperatorMetrics(CollectorRegistry()), workers=1,  # type: ignore[arg-type]
                            nodes=nodes)
    return ctl, vns, nodes


def test_the_projection_keeps_only_the_ready_condition() -> None:
    assert node("car-1", "Unknown")["status"]["conditions"] == [
        {"type": "Ready", "status": "Unknown", "lastTransitionTime": T}]


def test_a_node_that_stops_being_ready_marks_the_car_lost_since_then_whichever_informer_speaks_first() -> None:
    ctl, _, _ = controller()
    ctl._changed(Change("ADDED", "car-1", vehiclenode("car-1")))
    assert ctl.cars()["car-1"].lost_since is None
    ctl._node_changed(Change("MODIFIED", "car-1", node("car-1", "Unknown")))
    assert ctl.cars()["car-1"].lost_since == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert ctl.cars()["car-1"].valid_streak == 3 and ctl.cars()["car-1"].owner == "owner-1"
    # False (the shim: link closed) then Unknown (the Lease lapsed): one outage, lost since the first.
    ctl._node_changed(Change("MODIFIED", "car-1", node("car-1", "False", "2026-11-24T10:00:40Z")))
    assert ctl.cars()["car-1"].lost_since == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    # The Node's news came first: the car's VehicleNode, seen later, carries it.
    ctl._node_changed(Change("ADDED", "car-2", node("car-2", "False")))
    ctl._changed(Change("ADDED", "car-2", vehiclenode("car-2")))
    assert ctl.cars()["car-2"].lost_since is not None
    # Ready again, or the Node gone: not lost (a car without a Node is the drain finalizer's business).
    ctl._node_changed(Change("MODIFIED", "car-1", node("car-1", "True")))
    ctl._node_changed(Change("DELETED", "car-2", node("car-2", "False")))
    assert ctl.cars()["car-1"].lost_since is None and ctl.cars()["car-2"].lost_since is None


def test_a_job_is_told_to_wait_while_a_rejected_result_of_one_of_its_cars_is_still_to_be_recorded() -> None:
    ctl, _, _ = controller()
    ctl.record([TrustVerdict("car-1", True, True, 0), TrustVerdict("car-2", False, True, 1)])
    assert ctl.judging(["car-2", "car-3"])
    assert not ctl.judging(["car-1", "car-3"])  # a valid verdict costs nothing: no reason to hold a merge
    assert not ctl.judging([])


async def test_a_car_caught_lying_stays_untrusted_while_the_informer_still_shows_an_older_vehiclenode() -> None:
    class Api:
        async def patch_trust(self, name: str, trust: dict[str, Any]) -> None:
            self.written = trust

    ctl, _, _ = controller()
    ctl.api = Api()  # type: ignore[assignment]
    lost: list[str] = []
    ctl.on_untrusted(lost.append)
    older = vehiclenode("car-1")
    ctl.vehiclenodes._store["car-1"] = older
    ctl._changed(Change("ADDED", "car-1", older))
    ctl.record([TrustVerdict("car-1", False, True, 7)])
    await ctl._apply_trust("car-1")
    assert lost == ["car-1"] and ctl.cars()["car-1"].untrusted
    # The shim's telemetry write from before ours reaches the informer after it: the car must not look trusted
    # again, or a job re-planning now would keep the liar's results and merge them.
    ctl._changed(Change("MODIFIED", "car-1", older))
    assert ctl.cars()["car-1"].untrusted
    caught = vehiclenode("car-1")
    caught["status"]["trust"] = {"untrusted": True, "validStreak": 0}
    ctl._changed(Change("MODIFIED", "car-1", caught))
    assert ctl.cars()["car-1"].untrusted
    # From then on the API is the authority: an administrator clearing the flag is obeyed.
    ctl._changed(Change("MODIFIED", "car-1", older))
    assert not ctl.cars()["car-1"].untrusted

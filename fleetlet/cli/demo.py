"""``fleetlet demo``: the whole car path on this machine, with nothing mocked but the cars' bodies.

A real control plane, ``fleetlet-shim`` and ``fleetlet-sim`` (simulated vehicles — battery, heat, driving —
running the real car agent, link and sandboxed runtime) start as their own processes; the digits model is built
and split into shards; shard pods are placed by the real kube-scheduler, run on the cars and their results are
checked against a local onnxruntime run. The example FleetJob is applied too; turning FleetJobs into shard pods
is the operator's job (not built yet), so the demo creates the shard pods itself, as the operator will.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.api.v1alpha1.shard import ShardAssignment
from fleetlet.artifacts import BlobStore
from fleetlet.localcluster import LocalCluster

NAMESPACE = "default"


def _progress(msg: str) -> None:
    print(f"• {msg}", file=sys.stderr, flush=True)


def _show(kubectl: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> None:
    print(f"\n$ kubectl {' '.join(args)}", flush=True)
    print(kubectl(*args).stdout.rstrip(), flush=True)


def _procs_file(state: Path) -> Path:
    return state / "demo-procs.json"


def stop_processes(state: Path) -> list[str]:
    """Stop the shim and simulator a demo left running; returns what was stopped."""
    path = _procs_file(state)
    if not path.exists():
        return []
    procs: dict[str, int] = json.loads(path.read_text())
    for pid in procs.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 15
    for pid in procs.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
            time.sleep(0.1)
    path.unlink()
    return list(procs)


def run_demo(cluster: LocalCluster, state: Path, cars: int = 12, seed: int = 42, shard_size: int = 300) -> int:
    from fleetlet_car.runtime.results import load_arrays
    from fleetlet_car.sim import make_vehicle_specs

    from fleetlet.cli.local import apply_objects, launch_shim
    from fleetlet.models import default_cache_dir
    from fleetlet.models.digits import build_digits, predict_onnx

    stop_processes(state)
    kubectl = cluster.kubectl
    _progress("starting fleetlet-shim (the virtual kubelet for every car)")
    shim = launch_shim(cluster, state / "shim", lease_renew_s=10.0, local=cluster, heartbeat_s=10.0,
                       dead_after_s=25.0)
    procs = {"fleetlet-shim": shim.process.pid}
    _procs_file(state).write_text(json.dumps(procs))

    specs = make_vehicle_specs(cars, seed)
    bodies = [VehicleNode(metadata={"name": s.vehicle_id}, spec=s).wire(exclude={"status"})  # type: ignore[arg-type]
              for s in specs]
    apply_objects(cluster, bodies)
    _progress(f"starting fleetlet-sim: {cars} simulated cars (vehicle physics simulated; agent, link and sandbox real)")
    sim_dir = state / "sim"
    sim_dir.mkdir(parents=True, exist_ok=True)
    with open(state / "sim.log", "ab") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleetlet_car.sim.runner", "--cars", str(cars), "--seed", str(seed),
             "--shim-url", shim.link_url, "--ca", str(shim.fleet_ca_file),
             "--ca-key", str(shim.fleet_ca_file.with_suffix(".key")), "--work-dir", str(sim_dir),
             "--status-every", "10"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    procs["fleetlet-sim"] = sim.pid
    _procs_file(state).write_text(json.dumps(procs))

    deadline = time.monotonic() + 120
    ready = 0
    while ready < cars:
        if time.monotonic() > deadline or sim.poll() is not None:
            raise RuntimeError(f"only {ready}/{cars} car Nodes became Ready; see {state / 'sim.log'} and "
                               f"{shim.log_path}")
        nodes = json.loads(kubectl("get", "nodes", "-l", "fleetlet.io/vehicle=true", "-o", "json").stdout)["items"]
        ready = sum(1 for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                             for c in n["status"].get("conditions", [])))
        _progress(f"{ready}/{cars} car Nodes Ready")
        time.sleep(1 if ready < cars else 0)
    _show(kubectl, "get", "nodes", "-l", "fleetlet.io/vehicle=true", "-L", "fleetlet.io/accelerator,topology.kubernetes.io/region")
    time.sleep(2)  # let the shim mirror the first telemetry
    _show(kubectl, "get", "vehiclenodes")

    _progress("building the digits model (scikit-learn MLP exported to ONNX) and its 1,797 inputs")
    example = build_digits(default_cache_dir())
    (state / "example").mkdir(parents=True, exist_ok=True)
    store = BlobStore(shim.artifact_dir)
    model_digest = store.put_file(example.model_path)
    inputs = np.load(example.inputs_path)
    # Only cars whose owner's rules allow work now: parked, charged, plugged in where the owner requires it.
    # (The operator will express this as taints; the demo reads the mirrored telemetry itself.)
    eligible = []
    for body in json.loads(kubectl("get", "vehiclenodes", "-o", "json").stdout)["items"]:
        tel, policy = body.get("status", {}).get("telemetry"), body["spec"]["policy"]
        if tel and tel["driveState"] == "Parked" and tel["stateOfCharge"] > policy["minStateOfCharge"] + 0.02 \
                and (tel["pluggedIn"] or not policy["requirePluggedIn"]):
            eligible.append(body["metadata"]["name"])
    if not eligible:
        raise RuntimeError("no simulated car may work right now (all driving, low or unplugged); try again")
    pods, expected = [], {}
    for i, start in enumerate(range(0, len(inputs), shard_size)):
        part = inputs[start:start + shard_size]
        path = state / "example" / f"shard-{i}.npy"
        np.save(path, part)
        digest = store.put_file(path)
        name = f"digits-shard-{i}"
        expected[name] = start
        assignment = ShardAssignment.model_validate(
            {"model": {"sha256": model_digest}, "input": {"sha256": digest, "end": len(part)}})
        pods.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"fleetlet.io/shard": name},
                         "annotations": {"fleetlet.io/assignment": assignment.annotation()}},
            "spec": {"runtimeClassName": "fleetlet-onnx", "restartPolicy": "Never",
                     "nodeSelector": {"kubernetes.io/hostname": eligible[i % len(eligible)]},
                     "containers": [{"name": "shard", "image": f"fleetlet.io/onnx@sha256:{model_digest}",
                                     "resources": {"requests": {"cpu": "1", "memory": "256Mi"}}}]},
        })
    kubectl("delete", "pods", "-n", NAMESPACE, "-l", "fleetlet.io/shard", "--ignore-not-found", "--wait=true")
    apply_objects(cluster, pods)
    _progress(f"{len(pods)} shard pods created on {min(len(pods), len(eligible))} eligible cars; "
              "the kube-scheduler binds them, the shim hands them to the cars")
    deadline = time.monotonic() + 180
    while True:
        items = json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", "fleetlet.io/shard", "-o", "json").stdout)["items"]
        phases = [p.get("status", {}).get("phase", "Pending") for p in items]
        _progress("shards: " + ", ".join(f"{phases.count(ph)} {ph}" for ph in ("Pending", "Running", "Succeeded", "Failed")))
        if all(ph in ("Succeeded", "Failed") for ph in phases):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("shards did not finish in 3 minutes")
        time.sleep(2)
    _show(kubectl, "get", "pods", "-n", NAMESPACE, "-l", "fleetlet.io/shard", "-o", "wide")
    labels = np.full(len(inputs), -1, dtype=np.int64)
    failed = []
    for pod in items:
        name = pod["metadata"]["name"]
        if pod["status"]["phase"] != "Succeeded":
            failed.append(f"{name}: {pod['status'].get('reason', '?')}")
            continue
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        result = json.loads(term["message"])
        arrays = load_arrays(store.path(result["resultSha256"]))
        got = next(a for a in arrays.values() if a.dtype.kind == "i").reshape(-1)
        labels[expected[name]:expected[name] + len(got)] = got
    _show(kubectl, "logs", "-n", NAMESPACE, items[0]["metadata"]["name"])
    local, _ = predict_onnx(example.model_path, inputs)
    truth = np.load(example.labels_path)
    done = int((labels >= 0).sum())
    same = bool(np.array_equal(labels[labels >= 0], local[labels >= 0]))
    summary = f"{done}/{len(inputs)} digits classified on cars; identical to a local onnxruntime run: {same}"
    summary += f"; accuracy against the true labels {float((labels == truth).mean()):.3f}"
    _progress(summary)
    if failed:
        _progress("shards that did not succeed (the operator will re-run them elsewhere): " + "; ".join(failed))
    _progress(f"the shim and {cars} cars keep running: KUBECONFIG={cluster.kubeconfig} kubectl get nodes,vn ; "
              "stop everything with: fleetlet down")
    return 0 if same and done == len(inputs) else 1

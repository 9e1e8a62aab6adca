"""``fleetlet demo``: the whole product on this machine, with nothing mocked but the cars' bodies.

A real control plane, ``fleetlet-shim``, ``fleetlet-operator`` and ``fleetlet-sim`` (SIMULATED vehicles — battery,
heat, driving — running the real car agent, link, safety reflex and sandboxed ONNX runtime) start as their own
processes. The example model and input are uploaded to the artifact store, and the example FleetJob
(``examples/fleetjob-digits.yaml``) is applied with kubectl, as a user would. The operator shards it, the
kube-scheduler places the shards on cars the owners' rules allow, a few cars drive off in the middle of a shard
(SIMULATED departures: their work resumes elsewhere from its checkpoint), every shard is verified by two cars of
different owners, and the merged output is compared item by item with a local onnxruntime run.
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
from typing import Any

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.cli.examples import EXAMPLE, build, render
from fleetlet.cli.jobs import progress_line
from fleetlet.localcluster import LocalCluster

NAMESPACE = "default"
JOB = "digits"


def _progress(msg: str) -> None:
    print(f"• {msg}", file=sys.stderr, flush=True)


def _show(kubectl: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> None:
    print(f"\n$ kubectl {' '.join(args)}", flush=True)
    print(kubectl(*args).stdout.rstrip(), flush=True)


def _procs_file(state: Path) -> Path:
    return state / "demo-procs.json"


def stop_processes(state: Path) -> list[str]:
    """Stop the components a demo left running; returns what was stopped."""
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
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
                break
            time.sleep(0.1)
    path.unlink()
    return list(procs)


def run_demo(cluster: LocalCluster, state: Path, cars: int = 12, seed: int = 42, departures: int = 3) -> int:
    import numpy as np
    from fleetlet_car.sim import make_vehicle_specs

    from fleetlet.artifacts import BlobStore
    from fleetlet.cli.local import apply_objects, launch_operator, launch_shim
    from fleetlet.models.digits import predict_onnx

    stop_processes(state)
    kubectl = cluster.kubectl
    procs: dict[str, int] = {}

    def remember(name: str, pid: int) -> None:
        procs[name] = pid
        _procs_file(state).write_text(json.dumps(procs))

    _progress("starting fleetlet-shim (the virtual kubelet for every car)")
    shim = launch_shim(cluster, state / "shim", lease_renew_s=10.0, local=cluster, heartbeat_s=10.0,
                       dead_after_s=25.0)
    remember("fleetlet-shim", shim.process.pid)
    _progress("starting fleetlet-operator (FleetJobs -> shards -> verified results)")
    operator = launch_operator(cluster, state / "operator", artifact_dir=shim.artifact_dir, local=cluster)
    remember("fleetlet-operator", operator.process.pid)

    specs = make_vehicle_specs(cars, seed)
    bodies = []
    for spec in specs:
        vn = VehicleNode(metadata={"name": spec.vehicle_id}, spec=spec)  # type: ignore[arg-type]
        body = vn.wire(exclude={"status"})
        body["spec"]["policy"]["availability"] = []  # these owners lend their cars at any hour (the demo runs now)
        bodies.append(body)
    apply_objects(cluster, bodies)
    _progress(f"starting fleetlet-sim: {cars} SIMULATED cars (vehicle physics simulated; agent, link, safety reflex "
              f"and sandbox real); {departures} of them will drive off in the middle of a shard")
    sim_dir = state / "sim"
    sim_dir.mkdir(parents=True, exist_ok=True)
    with open(state / "sim.log", "ab") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "fleetlet_car.sim.runner", "--cars", str(cars), "--seed", str(seed),
             "--shim-url", shim.link_url, "--ca", str(shim.fleet_ca_file),
             "--ca-key", str(shim.fleet_ca_file.with_suffix(".key")), "--work-dir", str(sim_dir),
             "--no-schedules", "--start-ready", "--departures", str(departures), "--departure-after", "1",
             "--departure-seconds", "30", "--batch-size", "1", "--checkpoint-seconds", "1", "--status-every", "10"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    remember("fleetlet-sim", sim.pid)

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
    time.sleep(2)  # the first telemetry becomes taints and conditions
    _show(kubectl, "get", "nodes", "-l", "fleetlet.io/vehicle=true", "-L",
          "fleetlet.io/accelerator,fleetlet.io/soc-band,topology.kubernetes.io/region")
    _show(kubectl, "get", "vehiclenodes", "-o", "wide")

    _progress("building the example: a digits classifier (scikit-learn MLP exported to ONNX) and 179,700 inputs")
    example = build(state / "example")
    if render(example) != EXAMPLE.read_text():
        raise RuntimeError(f"{EXAMPLE} names other digests than this machine builds (a new scikit-learn or ONNX "
                           "version changed the model's bytes): run `make examples`")
    store = BlobStore(shim.artifact_dir)
    store.put_file(example.model_path)
    store.put_file(example.input_path)
    _progress(f"uploaded the model and the input to the artifact store; kubectl apply -f {EXAMPLE}")
    kubectl("delete", "fleetjob", JOB, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    kubectl("apply", "-f", str(EXAMPLE))

    started = time.monotonic()
    tty = sys.stderr.isatty()
    job: dict[str, Any] = {}
    while True:
        job = json.loads(kubectl("get", "fleetjob", JOB, "-n", NAMESPACE, "-o", "json").stdout)
        line = progress_line(job)
        print(("\r\x1b[K" if tty else "") + f"• {line}", end="" if tty else "\n", file=sys.stderr, flush=True)
        if (job.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            break
        if time.monotonic() - started > 900:
            raise RuntimeError("the FleetJob did not finish in 15 minutes; see `kubectl describe fleetjob digits`")
        time.sleep(1.0 if tty else 3.0)
    if tty:
        print(file=sys.stderr)
    status = job["status"]
    _show(kubectl, "get", "fleetjobs", "-n", NAMESPACE, "-o", "wide")
    _show(kubectl, "get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.kind=FleetJob")
    if status["phase"] != "Succeeded":
        _progress(f"the job failed: {next((c['message'] for c in status['conditions'] if c['type'] == 'Failed'), '?')}")
        return 1
    from fleetlet.arrays import load_arrays

    output = load_arrays(store.path(status["result"]["sha256"]))
    got = next(a for a in output.values() if a.dtype.kind == "i").reshape(-1)
    expected, _ = predict_onnx(example.model_path, np.load(example.input_path))
    same = int((got == expected).sum()) if got.shape == expected.shape else 0
    metrics = operator.metrics()
    left = int(sum(v for k, v in metrics.items() if k.startswith("fleetlet_operator_departures_total")))
    _progress(f"{same}/{len(expected)} output items identical to a local onnxruntime run of the same model; "
              f"{status['shards']['verified']} shards verified by two cars of different owners each; "
              f"{left} departures resumed from their checkpoints without spending a retry; "
              f"{status['energyKWh']:.4f} kWh of car energy, {status['cost']:.4f} EUR to the owners' pool")
    _progress(f"everything keeps running: export KUBECONFIG={cluster.kubeconfig}; kubectl get fj,vn,nodes; "
              "fleetlet status --watch; stop it all with: fleetlet down (or make down)")
    return 0 if same == len(expected) else 1

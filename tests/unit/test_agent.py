"""The car agent end to end on loopback, no Kubernetes: real link server, real artifact store, real sandboxes.

The shim is a test double (a LinkHandler that records what cars say); everything on the car side is real:
SimFleetHarness cars with their own fleet-CA certificates, the TLS car link, the safety reflex, the sandboxed
ONNX runner as a child process, artifacts fetched by digest through a grant and results uploaded under it.

What a user relies on: an assigned shard runs to Succeeded on the execution provider the status names, with its
work energy metered, and its uploaded result is exactly what ONNX Runtime computes; a stop ends it as Stopped with
a checkpoint; a car that drives off kills its shard at once and reports CarLeftParked with a checkpoint that lets
it resume elsewhere; a corrupt or missing artifact fails the shard with a reason instead of crashing the agent;
the pod's memory is its sandbox's limit; an accelerator pod on a car without an accelerator provider fails with
AcceleratorUnavailable instead of running on the CPU; the owner pausing the car or its hours ending drains
running work gracefully with a checkpoint; after a reconnect the hello lists what the car still holds and its
statuses are sent again until the shim acks them; a stop for work the car does not hold is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from aiohttp import web
from fleetlet_car.agent import AgentConfig
from fleetlet_car.link import CarLinkConfig
from fleetlet_car.runtime.results import write_arrays
from fleetlet_car.sim.compute import simulated_outputs
from fleetlet_car.sim.fleet import make_vehicle_specs
from fleetlet_car.sim.runner import CAR_ORGANIZATION, SimFleetHarness, vehiclenodes_yaml
from fleetlet_shim.link import LinkServer, server_ssl_context
from onnx import TensorProto, helper, numpy_helper

from fleetlet.api.v1alpha1.shard import (
    ShardAssignment,
    ShardCheckpoint,
    ShardInput,
    ShardModel,
    ShardResources,
)
from fleetlet.api.v1alpha1.vehiclenode import AvailabilityWindow, Policy
from fleetlet.artifacts import BlobStore, GrantSigner, make_app
from fleetlet.carlink.protocol import (
    Ack,
    Assign,
    CarMessage,
    Grant,
    Hello,
    Log,
    OwnerPolicy,
    PodStatus,
    ShimMessage,
    Stop,
    TelemetryReport,
)
from fleetlet.pki import CertificateAuthority, KeyPair

pytestmark = pytest.mark.timeout(60)
CAR = "car-000000"


# ---- models and data --------------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


def classifier(path: Path) -> bytes:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0, "W")
    b = numpy_helper.from_array(np.array([0.5, -0.25, 0.125], dtype=np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[w, b],
    )
    return _save(graph, path)


def slow_model(path: Path, depth: int = 400, dim: int = 32) -> bytes:
    """~0.7 ms per item on one thread: a 20,000-item shard keeps a runner busy for many seconds."""
    w = numpy_helper.from_array(
        (np.random.default_rng(1).standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), "W"
    )
    nodes, prev = [], "x"
    for k in range(depth):
        nodes += [helper.make_node("MatMul", [prev, "W"], [f"m{k}"]), helper.make_node("Tanh", [f"m{k}"], [f"t{k}"])]
        prev = f"t{k}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializer=[w],
    )  # fmt: skip
    return _save(graph, path)


def memory_hog(path: Path, floats_per_item: int = 12_500_000) -> bytes:
    """x[N,1] expanded to [N, 12.5M] floats: 400 MB for 8 items (well over a 256 MiB pod)."""
    shape = numpy_helper.from_array(np.array([8, floats_per_item], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "hog",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", floats_per_item])],
        initializer=[shape],
    )  # fmt: skip
    return _save(graph, path)


def npy_bytes(arr: np.ndarray, path: Path) -> bytes:
    np.save(path, arr)
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the shim double, the store, the fleet ----------------------------------------------------------------


@dataclass
class Recorder:
    """A LinkHandler that records what cars say (a test double of the shim)."""

    hellos: dict[str, list[Hello]] = field(default_factory=dict)
    messages: list[CarMessage] = field(default_factory=list)

    async def car_connected(self, car: str, hello: Hello) -> None:
        self.hellos.setdefault(car, []).append(hello)

    async def car_message(self, car: str, msg: CarMessage) -> None:
        self.messages.append(msg)

    async def car_disconnected(self, car: str, reason: str) -> None:
        pass

    def statuses(self, uid: str) -> list[PodStatus]:
        return [m for m in self.messages if isinstance(m, PodStatus) and m.uid == uid]

    def log_lines(self, uid: str) -> list[str]:
        return [ln for m in self.messages if isinstance(m, Log) and m.uid == uid for ln in m.lines]

    async def until(self, what: Callable[[], object], within: float = 20.0) -> object:
        async with asyncio.timeout(within):
            while not (found := what()):  # noqa: ASYNC110 - a predicate over several sources, polled
                await asyncio.sleep(0.05)
        return found

    async def final(self, uid: str, within: float = 20.0) -> PodStatus:
        def done() -> PodStatus | None:
            return next((s for s in self.statuses(uid) if s.phase in ("Succeeded", "Failed")), None)

        return await self.until(done, within)  # type: ignore[return-value]

    def finals(self, uid: str) -> int:
        return sum(1 for s in self.statuses(uid) if s.phase in ("Succeeded", "Failed"))




@dataclass
class World:
    server: LinkServer
    shim: Recorder
    store: BlobStore
    signer: GrantSigner
    store_url: str
    fleet: SimFleetHarness
    tmp: Path
    _uids: int = 0

    def put(self, data: bytes) -> str:
        return self.store.put_bytes(data)

    async def assign(
        self, model: str, inp: str, items: int, *, car: str = CAR, resume: ShardCheckpoint | None = None,
        start: int = 0, resources: ShardResources | None = None,
    ) -> str:
        self._uids += 1
        uid = f"uid-{self._uids}"
        digests = [model, inp] + ([resume.sha256] if resume else [])
        token = self.signer.issue_grant(digests, ttl=600, upload=True, subject=f"{car}/{uid}")
        msg = Assign(
            uid=uid, namespace="default", name=f"shard-{self._uids}",
            assignment=ShardAssignment(
                model=ShardModel(sha256=model, runtime="onnx"),
                input=ShardInput(sha256=inp, format="npy", start=start, end=start + items),
                resume_from=resume,
                resources=resources or ShardResources(cpu="1", memory="1Gi"),
            ),
            grant=Grant(token=token, base_url=self.store_url),
        )  # fmt: skip
        assert self.server.send(car, msg)
        return uid

    async def tell(self, msg: ShimMessage, car: str = CAR) -> None:
        assert self.server.send(car, msg)


def _network_fallback_needed() -> bool:
    """Whether this kernel refuses unshare(CLONE_NEWNET) to us (then the sandbox needs its fallback)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        import ctypes

        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0 else 1)
    return os.waitpid(pid, 0)[1] != 0


@contextlib.asynccontextmanager
async def make_world(tmp_path: Path, **harness: Any) -> AsyncIterator[World]:
    """A shim double, a store and two SIMULATED cars with real agents; ``harness`` goes to SimFleetHarness."""
    ca = CertificateAuthority.create()
    pki = tmp_path / "pki"
    ca.pair.write(pki, "ca")
    ca.issue("shim", server=True, ip_addresses=("127.0.0.1",)).write(pki, "shim")
    shim = Recorder()
    server = LinkServer(shim, server_ssl_context(pki / "ca.crt", pki / "shim.crt", pki / "shim.key"))
    port = await server.start("127.0.0.1", 0)

    store = BlobStore(tmp_path / "store")
    signer = GrantSigner(os.urandom(32))
    runner = web.AppRunner(make_app(store, signer), access_log=None)
    await runner.setup()
    store_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    store_tls.load_cert_chain(pki / "shim.crt", pki / "shim.key")  # server-only TLS: cars need no cert here
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=store_tls)
    await site.start()
    store_port = runner.addresses[0][1]

    def issue(name: str) -> KeyPair:
        return ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True)

    # Owners who allow work unplugged, down to 30 % charge: the reflex admits work on these parked cars.
    specs = [
        s.model_copy(update={"policy": Policy(min_state_of_charge=0.3, require_plugged_in=False)})
        for s in make_vehicle_specs(2, seed=3)
    ]
    config = AgentConfig(
        batch_size=1,
        checkpoint_every_items=500,
        status_interval_seconds=0.2,
        log_interval_seconds=0.5,
        drain_grace_seconds=10.0,
        allow_network_fallback=_network_fallback_needed(),
        link=CarLinkConfig(backoff_base_seconds=0.05, backoff_cap_seconds=0.2),
    )
    harness.setdefault("tick_seconds", 0.2)
    fleet = SimFleetHarness(
        2, f"wss://127.0.0.1:{port}/v1/link", ca.cert_pem, issue, tmp_path / "fleet", seed=3,
        specs=specs, config=config, **harness,
    )  # fmt: skip
    try:
        async with fleet:
            w = World(server, shim, store, signer, f"https://127.0.0.1:{store_port}", fleet, tmp_path)
            await shim.until(lambda: all(server.is_connected(c) and a.connected for c, a in fleet.agents.items()))
            yield w
    finally:
        await server.stop()
        await runner.cleanup()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path) as w:
        yield w


def slow_shard(w: World, items: int = 20_000) -> tuple[str, str]:
    model = w.put(slow_model(w.tmp / "slow.onnx"))
    x = np.random.default_rng(5).standard_normal((items, 32)).astype(np.float32)
    return model, w.put(npy_bytes(x, w.tmp / "slow.npy"))


async def running_with_checkpoint(w: World, uid: str) -> PodStatus:
    def checkpointed() -> PodStatus | None:
        return next((s for s in w.shim.statuses(uid) if s.phase == "Running" and s.checkpoint), None)

    return await w.shim.until(checkpointed)  # type: ignore[return-value]


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # dead, waiting to be reaped
    except FileNotFoundError:
        return True


# ---- tests ------------------------------------------------------------------------------------------------


async def test_assignment_succeeds_on_the_provider_it_names_and_the_result_is_what_onnxruntime_computes(
    world: World,
) -> None:
    w = world
    model_bytes = classifier(w.tmp / "clf.onnx")
    x = np.random.default_rng(7).integers(-4, 5, size=(300, 4)).astype(np.float32)
    model, inp = w.put(model_bytes), w.put(npy_bytes(x, w.tmp / "x.npy"))

    uid = await w.assign(model, inp, 300)
    final = await w.shim.final(uid)

    assert final.phase == "Succeeded", final
    assert final.container.reason == "Completed" and final.container.exit_code == 0
    assert final.items_done == 300
    statuses = w.shim.statuses(uid)
    assert statuses[0].phase == "Pending" and "Running" in [s.phase for s in statuses]
    # Every status after the start says which execution provider ran it: the CPU, for a pod without accelerator.
    started = [s for s in statuses if s.phase != "Pending"]
    assert started and all(s.provider == "CPUExecutionProvider" for s in started)
    assert final.energy_kwh > 0, "the run's work energy was metered"
    assert final.result_digest is not None and w.store.has(final.result_digest)
    uploaded = np.load(w.store.path(final.result_digest), allow_pickle=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])  # batch 1
    np.testing.assert_array_equal(uploaded, expected)
    lines = w.shim.log_lines(uid)
    assert f"result sha256:{final.result_digest}" in lines
    assert any(ln.startswith(f"loaded model sha256:{model}") for ln in lines)
    assert not w.fleet.fleet.work_load.any(), "no work metered once the shard ended"
    agent = w.fleet.agents[CAR]
    assert agent.last_telemetry is not None and agent.last_telemetry.energy_today_kwh > 0
    assert agent.last_telemetry.energy_day == datetime.now(UTC).date().isoformat()  # the owner's zone is UTC

    # The car keeps the final status until the shim says it stored it; then it forgets the assignment.
    assert agent.assignment(uid) is not None
    await w.tell(Ack(uid=uid))
    await w.shim.until(lambda: agent.assignment(uid) is None)


async def test_the_hello_lists_the_providers_and_an_accelerator_pod_fails_instead_of_running_on_the_cpu(
    world: World,
) -> None:
    w = world
    hello = w.shim.hellos[CAR][-1]
    assert "CPUExecutionProvider" in hello.providers
    assert not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(hello.providers)  # this machine
    model = w.put(classifier(w.tmp / "clf.onnx"))
    inp = w.put(npy_bytes(np.ones((10, 4), np.float32), w.tmp / "x.npy"))

    uid = await w.assign(model, inp, 10, resources=ShardResources(accelerator=1, accelerator_type="hw4"))
    final = await w.shim.final(uid)

    assert final.phase == "Failed" and final.container.reason == "AcceleratorUnavailable"
    assert "type hw4" in (final.container.message or "")
    assert "CPUExecutionProvider" in (final.container.message or "")  # names the providers that do exist
    assert final.provider is None and final.result_digest is None  # it never ran, on the CPU or elsewhere


async def test_a_shard_over_its_pods_memory_is_oomkilled_with_the_numbers(world: World) -> None:
    w = world
    model = w.put(memory_hog(w.tmp / "hog.onnx"))
    inp = w.put(npy_bytes(np.ones((64, 1), np.float32), w.tmp / "x.npy"))

    uid = await w.assign(model, inp, 64, resources=ShardResources(cpu="500m", memory="256Mi"))
    final = await w.shim.final(uid, within=40)

    assert final.phase == "Failed" and final.container.reason == "OOMKilled", final
    message = final.container.message or ""
    assert "256 MiB" in message and "memory" in message
    lines = w.shim.log_lines(uid)
    assert any("1 thread(s)" in ln for ln in lines)  # cpu 500m rounds up to one whole core


async def test_stop_ends_the_shard_as_stopped_with_a_checkpoint_in_the_store(world: World) -> None:
    w = world
    model, inp = slow_shard(w)
    uid = await w.assign(model, inp, 20_000)
    await running_with_checkpoint(w, uid)

    await w.tell(Stop(uid=uid, grace_seconds=10, reason="PodDeleted"))
    final = await w.shim.final(uid)

    assert final.phase == "Failed" and final.container.reason == "Stopped"
    assert final.container.exit_code == 143  # it checkpointed on SIGTERM within its grace
    assert final.checkpoint is not None and 0 < final.checkpoint.items_done < 20_000
    assert w.store.has(final.checkpoint.sha256)
    assert w.fleet.agents[CAR].running == 0


async def test_a_stop_for_work_the_car_does_not_hold_is_answered_so_the_shim_does_not_wait(world: World) -> None:
    w = world
    await w.tell(Stop(uid="never-assigned", grace_seconds=30, reason="PodDeleted"))
    final = await w.shim.final("never-assigned")
    assert final.phase == "Failed" and final.container.reason == "UnknownAssignment"
    assert "holds no assignment" in (final.container.message or "")
    await w.tell(Ack(uid="never-assigned"))
    await w.shim.until(lambda: w.fleet.agents[CAR].assignment("never-assigned") is None)


async def test_driving_off_kills_the_shard_at_once_and_it_resumes_elsewhere_from_its_checkpoint(
    world: World,
) -> None:
    w = world
    model, inp = slow_shard(w)
    uid = await w.assign(model, inp, 20_000)
    await running_with_checkpoint(w, uid)
    agent = w.fleet.agents[CAR]
    pid = agent.run_pid(uid)
    assert pid is not None and w.fleet.fleet.work_load[w.fleet.index(CAR)] > 0

    w.fleet.set_drive_state(CAR, "Driving")
    # The reflex ran the kill before set_drive_state returned: no awaits in between, the child is dying.
    assert w.fleet.fleet.work_load[w.fleet.index(CAR)] == 0
    await w.shim.until(lambda: process_gone(pid), within=2.0)

    final = await w.shim.final(uid)
    assert final.phase == "Failed" and final.container.reason == "CarLeftParked"
    assert final.container.exit_code == 137
    assert final.checkpoint is not None and final.checkpoint.items_done > 0 and w.store.has(final.checkpoint.sha256)
    assert w.fleet.fleet.work_energy_kwh[w.fleet.index(CAR)] > 0, "the run's energy was metered"
    assert final.energy_kwh > 0
    assert any(
        isinstance(m, TelemetryReport) and m.car == CAR and m.telemetry.drive_state == "Driving" for m in w.shim.messages
    )

    # While driving, new work is refused with a reason the scheduler side can act on.
    refused = await w.shim.final(await w.assign(model, inp, 20_000))
    assert refused.phase == "Failed" and refused.container.reason == "CarNotParked"

    # Another (parked) car resumes the shard from the checkpoint instead of starting over.
    other = "car-000001"
    await w.shim.until(lambda: w.server.is_connected(other))
    rest = 20_000 - final.checkpoint.items_done
    resumed = await w.assign(model, inp, 20_000, car=other, resume=final.checkpoint)
    await w.shim.until(lambda: any(ln.startswith("resumed from the checkpoint") for ln in w.shim.log_lines(resumed)))
    assert rest > 0
    await w.tell(Stop(uid=resumed, grace_seconds=0), car=other)
    assert (await w.shim.final(resumed)).container.reason == "Stopped"


@pytest.mark.parametrize("rule", ["paused", "off-hours"])
async def test_the_owners_rules_drain_running_work_gracefully_with_a_checkpoint(world: World, rule: str) -> None:
    w = world
    model, inp = slow_shard(w)
    uid = await w.assign(model, inp, 20_000)
    await running_with_checkpoint(w, uid)
    base = w.fleet.specs[0].policy
    if rule == "paused":
        msg, reason = OwnerPolicy(policy=base, paused=True, generation=2), "PausedByOwner"
    else:  # a window that opens an hour from now: the car is outside its owner's hours
        soon = datetime.now(UTC) + timedelta(hours=1)
        window = AvailabilityWindow(start=soon.strftime("%H:%M"), end=(soon + timedelta(hours=1)).strftime("%H:%M"))
        msg, reason = OwnerPolicy(policy=base.model_copy(update={"availability": [window]}), generation=2), \
            "OutsideAvailabilityWindow"  # fmt: skip

    await w.tell(msg)
    final = await w.shim.final(uid)

    assert final.phase == "Failed" and final.container.reason == reason, final
    assert final.container.exit_code == 143, "drained gracefully (SIGTERM, checkpoint), not killed"
    assert final.checkpoint is not None and final.checkpoint.items_done > 0 and w.store.has(final.checkpoint.sha256)
    assert "owner's rules" in (final.container.message or "")
    # New work is refused for the same reason until the owner's rules allow it again.
    refused = await w.shim.final(await w.assign(model, inp, 100))
    assert refused.phase == "Failed" and refused.container.reason == reason
    await w.tell(OwnerPolicy(policy=base, generation=3))
    clf = w.put(classifier(w.tmp / "clf.onnx"))
    ok = await w.shim.final(await w.assign(clf, w.put(npy_bytes(np.ones((5, 4), np.float32), w.tmp / "o.npy")), 5))
    assert ok.phase == "Succeeded"


async def test_reaching_the_owners_daily_energy_cap_drains_running_work_even_when_nothing_else_changes(
    tmp_path: Path,
) -> None:
    async with make_world(tmp_path, tick_seconds=3600.0) as w:  # the simulated car stays still: no readings
        agent = w.fleet.agents[CAR]
        model, inp = slow_shard(w)
        uid = await w.assign(model, inp, 20_000)
        await running_with_checkpoint(w, uid)
        # A cap the running shard reaches about a second from now: only the agent's own timer can notice.
        today, _ = agent.meter.today()
        cap = today + w.fleet.specs[0].hardware.compute_power_w / 3.6e6
        await w.tell(OwnerPolicy(policy=w.fleet.specs[0].policy.model_copy(update={"max_energy_per_day_kwh": cap})))
        final = await w.shim.final(uid)

        assert final.phase == "Failed" and final.container.reason == "DailyEnergyCapReached", final
        assert final.container.exit_code == 143 and final.checkpoint is not None
        assert agent.meter.today()[0] >= cap
        telemetry = agent.last_telemetry
        assert telemetry is not None and telemetry.energy_today_kwh >= cap * 0.99


async def test_corrupt_or_missing_artifacts_fail_the_shard_with_a_reason_and_the_agent_carries_on(
    world: World,
) -> None:
    w = world
    good = w.put(classifier(w.tmp / "clf.onnx"))
    x = npy_bytes(np.zeros((10, 4), np.float32), w.tmp / "x.npy")
    inp = w.put(x)
    # The store's copy of the "model" got corrupted on disk: its bytes no longer hash to its name.
    forged = sha(b"the model that was assigned")
    w.store.path(forged).parent.mkdir(parents=True, exist_ok=True)
    w.store.path(forged).write_bytes(b"other bytes")

    mismatch = await w.shim.final(await w.assign(forged, inp, 10))
    assert mismatch.phase == "Failed" and mismatch.container.reason == "DigestMismatch"
    missing = await w.shim.final(await w.assign(sha(b"never uploaded"), inp, 10))
    assert missing.phase == "Failed" and missing.container.reason == "FetchFailed"
    assert "grant" not in (missing.container.message or "").lower()  # no bearer credential in a status
    out_of_range = await w.shim.final(await w.assign(good, inp, 10, start=5))
    assert out_of_range.phase == "Failed" and out_of_range.container.reason == "InputError"

    assert w.fleet.agents[CAR].connected
    ok = await w.shim.final(await w.assign(good, inp, 10))
    assert ok.phase == "Succeeded"


async def test_after_a_reconnect_the_hello_lists_what_the_car_holds_and_statuses_are_resent_until_acked(
    world: World,
) -> None:
    w = world
    agent = w.fleet.agents[CAR]
    clf, inp = w.put(classifier(w.tmp / "clf.onnx")), w.put(npy_bytes(np.ones((20, 4), np.float32), w.tmp / "x.npy"))
    done = await w.shim.final(await w.assign(clf, inp, 20))
    model, slow_inp = slow_shard(w)
    running = await w.assign(model, slow_inp, 20_000)
    await running_with_checkpoint(w, running)

    await w.fleet.disconnect(CAR)
    await w.shim.until(lambda: not w.server.is_connected(CAR))
    finals_before = w.shim.finals(done.uid)
    # While the link is down the reports wait for the next welcome: the agent does not spin on them.
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert time.process_time() - cpu < 0.5
    w.fleet.reconnect(CAR)
    await w.shim.until(lambda: len(w.shim.hellos[CAR]) >= 2)

    held = {a.uid: a for a in w.shim.hellos[CAR][-1].assignments}
    assert list(held) == [running, done.uid]  # newest work first
    assert held[running].phase == "Running" and held[running].items_done > 0
    assert held[running].checkpoint is not None
    assert held[done.uid].phase == "Succeeded" and held[done.uid].result_digest == done.result_digest
    # Unacked, the final status is sent again after the welcome ...
    await w.shim.until(lambda: w.shim.finals(done.uid) > finals_before)
    # ... and after every later welcome, until the shim acks it; then the car forgets it.
    await w.fleet.disconnect(CAR)
    await w.shim.until(lambda: not w.server.is_connected(CAR))
    finals_before = w.shim.finals(done.uid)
    w.fleet.reconnect(CAR)
    await w.shim.until(lambda: w.shim.finals(done.uid) > finals_before)
    await w.tell(Ack(uid=done.uid))
    await w.shim.until(lambda: agent.assignment(done.uid) is None)
    # An ack for work that is still running is ignored: the car goes on and keeps reporting it.
    await w.tell(Ack(uid=running))
    await asyncio.sleep(0.3)
    assert agent.assignment(running) is not None and agent.running == 1

    await w.fleet.disconnect(CAR)
    await w.shim.until(lambda: not w.server.is_connected(CAR))
    w.fleet.reconnect(CAR)
    await w.shim.until(lambda: len(w.shim.hellos[CAR]) >= 4)
    assert [a.uid for a in w.shim.hellos[CAR][-1].assignments] == [running]
    await w.tell(Stop(uid=running, grace_seconds=0, reason="PodDeleted"))
    final = await w.shim.final(running)
    assert final.container.reason == "Stopped" and final.container.exit_code == 137


async def test_a_fleet_on_simulated_compute_reports_it_and_honest_replicas_agree_while_a_liar_does_not(
    tmp_path: Path,
) -> None:
    liar = "car-000001"
    async with make_world(tmp_path, simulate_compute=4000.0, liars={liar}) as w:
        assert w.shim.hellos[CAR][-1].providers == ["SimulatedCompute"]
        model = w.put(b"a model SIMULATED compute never reads")
        inp = w.put(npy_bytes(np.zeros((1000, 1), np.float32), w.tmp / "x.npy"))
        honest = await w.shim.final(await w.assign(model, inp, 1000))
        lying = await w.shim.final(await w.assign(model, inp, 1000, car=liar))

        assert honest.phase == lying.phase == "Succeeded"
        assert honest.provider == lying.provider == "SimulatedCompute"
        assert honest.energy_kwh > 0
        write_arrays(w.tmp / "expected.npy", {"output": simulated_outputs(model, inp, 0, 1000)})
        assert honest.result_digest == sha((w.tmp / "expected.npy").read_bytes())
        assert lying.result_digest != honest.result_digest


def test_print_vehiclenodes_gives_applyable_manifests() -> None:
    import yaml

    docs = list(yaml.safe_load_all(vehiclenodes_yaml(make_vehicle_specs(3, seed=1))))
    assert [d["metadata"]["name"] for d in docs] == ["car-000000", "car-000001", "car-000002"]
    assert all(d["apiVersion"] == "fleetlet.io/v1alpha1" and d["kind"] == "VehicleNode" for d in docs)
    assert docs[0]["spec"]["vehicleId"] == "car-000000"

"""The car's sandboxed runtime: real child processes, real ONNX Runtime, tiny models built with onnx.helper.

What a user relies on: exact, byte-deterministic results with no network for the model; the pod's memory is
the most the runner may hold (over it: OOMKilled with the numbers) and its cpu is the runner's thread count and
CPU pin; an accelerator pod runs on an accelerator provider or fails with AcceleratorUnavailable, and the result
says which provider ran it; stops, kills, deadlines and resumes behave as the agent and the reflex expect.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fleetlet_car.runtime import (
    DigestMismatch,
    FetchError,
    Limits,
    Reason,
    RunSpec,
    SandboxedRun,
    fetch_artifact,
    results_match,
    runner,
    sha256_file,
)
from fleetlet_car.runtime.providers import ProviderProbe, choose_provider
from fleetlet_car.runtime.resources import CpuAllocator, address_space_backstop, cpu_threads, memory_bytes
from fleetlet_car.runtime.results import load_arrays, write_arrays
from fleetlet_car.runtime.sandbox import _Preexec
from onnx import TensorProto, helper

from fleetlet.artifacts import BlobStore, GrantSigner, blob_url, make_app

# Small integers: MatMul + Add are exact in float32, so logits are checkable bit-for-bit against numpy.
W = np.array([[1, -2, 0], [3, 1, -1], [0, 2, 2], [-1, 0, 1]], dtype=np.float32)
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def classifier_model(path: Path, *, two_outputs: bool = True) -> Path:
    """x[N,4] -> logits = x @ W + B, probs = softmax(logits)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])]
    if two_outputs:
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs,
        initializer=[onnx.numpy_helper.from_array(W, "W"), onnx.numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def memory_hog_model(path: Path, floats_per_item: int = 50_000_000) -> Path:
    """x[N,1] expanded to [N, floats_per_item] floats: 1.6 GB for 8 items by default."""
    shape = onnx.numpy_helper.from_array(np.array([8, floats_per_item], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "hog",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", floats_per_item])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(7).integers(-4, 5, size=(1000, 4)).astype(np.float32)
    path = tmp_path / "shard.npy"
    np.save(path, x)
    return path, x


@pytest.fixture
def long_shard(tmp_path: Path) -> Path:
    """Enough single-item batches to keep a runner busy for seconds."""
    path = tmp_path / "long.npy"
    np.save(path, np.ones((200_000, 4), dtype=np.float32))
    return path


def spec(tmp_path: Path, model: Path, shard_path: Path, work: str = "work", **kw: object) -> RunSpec:
    kw.setdefault("limits", Limits(memory_bytes=1 << 30, wall_seconds=60))
    return RunSpec(model_path=model, input_path=shard_path, work_dir=tmp_path / work, **kw)  # type: ignore[arg-type]


async def run_to_end(s: RunSpec) -> tuple[SandboxedRun, object]:
    run = SandboxedRun(s)
    await run.start()
    return run, await run.wait()


async def test_run_produces_exact_results_with_a_verified_digest_and_no_network(tmp_path, shard):
    model = classifier_model(tmp_path / "m.onnx")
    shard_path, x = shard
    seen = []
    run = SandboxedRun(
        spec(
            tmp_path, model, shard_path, model_sha256=sha256_file(model), input_sha256=sha256_file(shard_path)
        ),
        on_progress=seen.append,
    )
    await run.start()
    res = await run.wait()
    assert res.reason is Reason.COMPLETED, res.message
    assert res.network_isolation == "netns"
    assert res.provider == "CPUExecutionProvider"  # the provider its session really ran on
    assert res.items_done == res.items_total == 1000
    assert res.result_path is not None and res.result_path.name == "result.npz"
    assert res.result_sha256 == sha256_file(res.result_path)
    out = load_arrays(res.result_path)
    assert list(out) == ["logits", "probs"]
    np.testing.assert_array_equal(out["logits"], x @ W + B)
    np.testing.assert_allclose(out["probs"], softmax(x @ W + B), rtol=1e-6, atol=1e-7)
    assert seen and seen[-1].items_done == 1000
    # Same model + input on the same machine: byte-identical result, as replica verification expects.
    _, again = await run_to_end(spec(tmp_path, model, shard_path, work="again"))
    assert again.result_sha256 == res.result_sha256


async def test_child_runs_in_its_own_network_namespace(tmp_path, long_shard):
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    run = SandboxedRun(spec(tmp_path, model, long_shard, batch_size=1, checkpoint_every_items=100))
    await run.start()
    try:
        async for _ in run.events():
            child_ns = os.readlink(f"/proc/{run.pid}/ns/net")
            break
        assert child_ns != os.readlink("/proc/self/ns/net")
    finally:
        await run.stop(immediate=True)


def test_sandbox_preexec_cuts_the_network_even_to_loopback(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        s = spec(tmp_path, tmp_path / "unused", tmp_path / "unused")
        # Without the sandbox the probe connects; with the sandbox's own preexec it cannot.
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=30)
        jailed = subprocess.run(
            [sys.executable, "-c", probe], preexec_fn=_Preexec(s, None), capture_output=True, timeout=30
        )
    assert jailed.returncode != 0
    assert b"Network is unreachable" in jailed.stderr


def refusing_unshare(flags: int) -> int:
    return -1


async def test_refused_unshare_refuses_to_run_unless_fallback_is_allowed(tmp_path, shard):
    model = classifier_model(tmp_path / "m.onnx")
    shard_path, _ = shard
    run = SandboxedRun(spec(tmp_path, model, shard_path), _unshare=refusing_unshare)
    await run.start()
    res = await run.wait()
    assert res.reason is Reason.SANDBOX_UNAVAILABLE
    assert "allow_network_fallback" in res.message
    assert res.result_path is None

    run = SandboxedRun(
        spec(tmp_path, model, shard_path, work="fallback", allow_network_fallback=True),
        _unshare=refusing_unshare,
    )
    await run.start()
    res = await run.wait()
    assert res.reason is Reason.COMPLETED, res.message
    assert res.network_isolation == "seccomp+audit-hook"


def test_fallback_seccomp_blocks_inet_sockets_in_the_child(tmp_path):
    s = spec(tmp_path, tmp_path / "unused", tmp_path / "unused", allow_network_fallback=True)
    probe = "import socket; socket.socketpair(); socket.socket(socket.AF_INET)"
    jailed = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=_Preexec(s, refusing_unshare),
        capture_output=True,
        timeout=30,
    )
    assert jailed.returncode != 0
    assert b"PermissionError" in jailed.stderr


async def test_graceful_stop_checkpoints_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    model = classifier_model(tmp_path / "m.onnx")
    x = np.random.default_rng(3).integers(-4, 5, size=(20_000, 4)).astype(np.float32)
    shard_path = tmp_path / "shard.npy"
    np.save(shard_path, x)
    kw = {"batch_size": 2, "checkpoint_every_items": 1000}

    run = SandboxedRun(spec(tmp_path, model, shard_path, work="interrupted", **kw))
    await run.start()
    async for ev in run.events():
        if ev.kind == "checkpoint":
            break
    await run.stop(immediate=False)
    stopped = await run.wait()
    assert stopped.reason is Reason.STOPPED, stopped.message
    assert stopped.checkpoint_path is not None and stopped.checkpoint_path.is_file()
    assert 0 < stopped.items_done < 20_000

    kinds = []
    resumed = SandboxedRun(
        spec(tmp_path, model, shard_path, work="interrupted", **kw), on_progress=lambda e: kinds.append(e)
    )
    await resumed.start()
    res = await resumed.wait()
    assert res.reason is Reason.COMPLETED, res.message
    assert kinds[0].kind == "resumed" and kinds[0].items_done == stopped.items_done
    assert res.checkpoint_path is None  # consumed

    _, fresh = await run_to_end(spec(tmp_path, model, shard_path, work="fresh", **kw))
    assert fresh.result_sha256 == res.result_sha256
    np.testing.assert_array_equal(load_arrays(res.result_path)["logits"], x @ W + B)


async def test_checkpoint_moves_between_cars_via_resume_from(tmp_path, shard):
    model = classifier_model(tmp_path / "m.onnx")
    shard_path, x = shard
    done = 600
    outs = {"logits": x[:done] @ W + B, "probs": np.zeros((done, 3), np.float32)}  # resumed items are trusted
    ckpt = tmp_path / "elsewhere.npz"
    fp = runner._fingerprint(
        model, shard_path, runner.parse_args(["--model", "m", "--input", "i", "--parent-netns", "n"])
    )
    write_arrays(
        ckpt,
        {
            "__fingerprint__": np.array(fp),
            "__done__": np.array(done),
            **{f"out:{k}": v for k, v in outs.items()},
        },
    )
    run, res = await run_to_end(spec(tmp_path, model, shard_path, resume_from=ckpt))
    assert res.reason is Reason.COMPLETED, res.message
    out = load_arrays(res.result_path)
    assert not out["probs"][:done].any()  # taken from the checkpoint, not recomputed
    np.testing.assert_allclose(out["probs"][done:], softmax(x[done:] @ W + B), rtol=1e-6, atol=1e-7)


async def test_immediate_stop_kills_the_child_fast(tmp_path, long_shard):
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    run = SandboxedRun(spec(tmp_path, model, long_shard, batch_size=1, checkpoint_every_items=500))
    await run.start()
    async for ev in run.events():
        assert ev.kind == "checkpoint"
        break
    pid = run.pid
    t0 = time.monotonic()
    await run.stop(immediate=True)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    res = await run.wait()
    assert res.reason is Reason.KILLED
    assert res.signal == 9
    assert res.result_path is None and res.checkpoint_path is not None  # resumable elsewhere


async def test_kill_now_is_synchronous(tmp_path, long_shard):
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    run = SandboxedRun(spec(tmp_path, model, long_shard, batch_size=1))
    await run.start()
    run.kill_now()
    run.kill_now()  # idempotent
    res = await asyncio.wait_for(run.wait(), 5)
    assert res.reason is Reason.KILLED


async def test_wall_clock_limit_gives_deadline_exceeded(tmp_path, long_shard):
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    s = spec(tmp_path, model, long_shard, batch_size=1, limits=Limits(memory_bytes=1 << 30, wall_seconds=1.5))
    _, res = await run_to_end(s)
    assert res.reason is Reason.DEADLINE_EXCEEDED
    assert "wall-clock" in res.message


async def test_memory_over_the_pods_limit_is_killed_by_the_watchdog_with_the_numbers(tmp_path):
    # 400 MB per batch, a 256 MiB pod: well under the address-space backstop, so only the RSS watchdog can catch it.
    model = memory_hog_model(tmp_path / "hog.onnx", floats_per_item=12_500_000)
    shard_path = tmp_path / "x.npy"
    np.save(shard_path, np.ones((64, 1), dtype=np.float32))
    limit = 256 << 20
    assert address_space_backstop(limit, 1) > 400_000_000 + limit
    _, res = await run_to_end(spec(tmp_path, model, shard_path, batch_size=8,
                                   limits=Limits(memory_bytes=limit, wall_seconds=60)))  # fmt: skip
    assert res.reason is Reason.OOM_KILLED, res.message
    assert "256 MiB" in res.message and "resident set" in res.message
    assert res.peak_rss_bytes is not None and res.peak_rss_bytes > limit
    assert res.signal == 9 and res.result_path is None


async def test_memory_limit_gives_oomkilled(tmp_path):
    model = memory_hog_model(tmp_path / "hog.onnx")
    shard_path = tmp_path / "x.npy"
    np.save(shard_path, np.ones((8, 1), dtype=np.float32))
    _, res = await run_to_end(
        spec(
            tmp_path, model, shard_path, batch_size=8, limits=Limits(memory_bytes=768 << 20, wall_seconds=60)
        )
    )
    assert res.reason is Reason.OOM_KILLED, res.message
    assert "memory" in res.message
    assert res.result_path is None


@pytest.mark.parametrize(("cpu", "threads"), [("500m", 1), ("1", 1), ("1500m", 2)])
async def test_the_pods_cpu_is_the_runners_threads_and_cpu_pin(tmp_path, long_shard, cpu, threads):
    assert cpu_threads(cpu) == threads  # a fraction rounds up to a whole core
    allowed = sorted(os.sched_getaffinity(0))
    cpus = CpuAllocator(tuple(allowed)).take(threads)
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    run = SandboxedRun(spec(tmp_path, model, long_shard, batch_size=1, threads=threads, cpus=cpus))
    await run.start()
    try:
        async for _ in run.events():
            status = await asyncio.to_thread(Path(f"/proc/{run.pid}/status").read_text)
            break
    finally:
        await run.stop(immediate=True)
    pinned = next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    assert _cpu_list(pinned) == set(cpus) and len(cpus) == min(threads, len(allowed))
    res = await run.wait()
    assert res.threads == threads and res.cpus == cpus


def _cpu_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_pod_resources_become_limits() -> None:
    assert memory_bytes("512Mi") == 512 << 20 and memory_bytes("1G") == 10**9 and memory_bytes("1.5Gi") == 3 << 29
    assert [cpu_threads(q) for q in ("100m", "1", "2", "2001m", "4")] == [1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        memory_bytes("lots")
    with pytest.raises(ValueError, match="above zero"):
        cpu_threads("0")
    allocator = CpuAllocator((0, 1, 2, 3))
    first, second = allocator.take(2), allocator.take(2)
    assert set(first).isdisjoint(second)  # two shards do not share a core while others idle
    allocator.give_back(first)
    assert allocator.take(1)[0] in first
    assert allocator.take(9) == (0, 1, 2, 3)  # never more CPUs than the car has


async def test_an_accelerator_pod_on_a_car_without_an_accelerator_provider_fails_instead_of_using_the_cpu(
    tmp_path, shard
):
    model = classifier_model(tmp_path / "m.onnx")
    _, res = await run_to_end(spec(tmp_path, model, shard[0], accelerator=1, accelerator_type="hw4"))
    assert res.reason is Reason.ACCELERATOR_UNAVAILABLE, res.message
    assert "type hw4" in res.message and "CPUExecutionProvider" in res.message
    assert res.provider is None and res.result_path is None


def test_providers_are_chosen_accelerator_first_and_never_the_cpu_for_an_accelerator_pod() -> None:
    both = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert choose_provider(both, 1) == "TensorrtExecutionProvider"
    assert choose_provider(both[1:], 2) == "CUDAExecutionProvider"
    assert choose_provider(("CPUExecutionProvider",), 1) is None
    assert choose_provider(both, 0) == "CPUExecutionProvider"


async def test_the_provider_probe_asks_a_child_once_and_remembers() -> None:
    probe = ProviderProbe()
    first, second = await asyncio.gather(probe.providers(), probe.providers())
    assert first == second and "CPUExecutionProvider" in first
    assert probe.known == first
    broken = ProviderProbe(python="/bin/false")  # an onnxruntime that cannot even be imported
    assert await broken.providers() == () and broken.known == ()  # offers nothing, and the agent goes on


async def test_malformed_model_gives_model_error(tmp_path, shard):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    _, res = await run_to_end(spec(tmp_path, bad, shard[0]))
    assert res.reason is Reason.MODEL_ERROR
    assert "cannot load the model" in res.message


async def test_model_digest_mismatch_is_refused_before_loading(tmp_path, shard):
    model = classifier_model(tmp_path / "m.onnx")
    _, res = await run_to_end(spec(tmp_path, model, shard[0], model_sha256="0" * 64))
    assert res.reason is Reason.DIGEST_MISMATCH
    assert "re-fetch" in res.message


async def test_npz_input_feeds_inputs_by_name_and_missing_names_are_input_errors(tmp_path, shard):
    model = classifier_model(tmp_path / "m.onnx", two_outputs=False)
    _, x = shard
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, x=x.astype(np.float64))  # cast to the model's float32
    np.savez(bad, y=x)
    _, res = await run_to_end(spec(tmp_path, model, good, input_format="npz"))
    assert res.reason is Reason.COMPLETED, res.message
    assert res.result_path.name == "result.npy"
    np.testing.assert_allclose(np.load(res.result_path), softmax(x @ W + B), rtol=1e-6, atol=1e-7)
    _, res = await run_to_end(spec(tmp_path, model, bad, work="bad", input_format="npz"))
    assert res.reason is Reason.INPUT_ERROR
    assert "['x']" in res.message


def test_results_match_tolerates_small_float_differences_only():
    a = {"logits": np.array([[1.0, 2.0]], np.float32), "label": np.array([1])}
    b = {"logits": np.array([[1.0 + 1e-7, 2.0]], np.float32), "label": np.array([1])}
    c = {"logits": np.array([[1.1, 2.0]], np.float32), "label": np.array([1])}
    d = {"logits": np.array([[1.0, 2.0]], np.float32), "label": np.array([2])}
    assert results_match(a, b, rtol=1e-5, atol=1e-6)
    assert not results_match(a, c, rtol=1e-5, atol=1e-6)
    assert not results_match(a, d)


def test_result_files_are_byte_deterministic(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2])}
    write_arrays(tmp_path / "one.npz", arrays)
    write_arrays(tmp_path / "two.npz", arrays)
    assert sha256_file(tmp_path / "one.npz") == sha256_file(tmp_path / "two.npz")
    with zipfile.ZipFile(tmp_path / "one.npz") as zf:  # numpy.savez would stamp the current time here
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert results_match(tmp_path / "one.npz", arrays)


# --- fetch -------------------------------------------------------------------------------------------------


@pytest.fixture
async def store_server(tmp_path):
    store = BlobStore(tmp_path / "store")
    signer = GrantSigner(b"k" * 32)
    hits = []

    @web.middleware
    async def count(request, handler):
        hits.append(request.path)
        return await handler(request)

    app = make_app(store, signer)
    app.middlewares.append(count)
    server = TestServer(app)
    await server.start_server()
    try:
        yield store, signer, str(server.make_url("")), hits
    finally:
        await server.close()


async def test_fetch_verifies_and_caches(tmp_path, store_server):
    store, signer, base, hits = store_server
    data = os.urandom(3 << 20)
    digest = store.put_bytes(data)
    url = blob_url(base, digest, signer.issue_grant([digest], ttl=60))
    cache = tmp_path / "cache"
    path = await fetch_artifact(url, digest, cache)
    assert path.read_bytes() == data
    assert await fetch_artifact(url, digest, cache) == path
    assert len(hits) == 1  # the second call was a cache hit
    assert [p.name for p in cache.iterdir()] == [digest]


async def test_fetch_refuses_a_tampered_blob_and_leaves_nothing(tmp_path, store_server):
    store, signer, base, _ = store_server
    digest = store.put_bytes(b"the real model")
    store.path(digest).write_bytes(b"a tampered model")
    url = blob_url(base, digest, signer.issue_grant([digest], ttl=60))
    cache = tmp_path / "cache"
    with pytest.raises(DigestMismatch):
        await fetch_artifact(url, digest, cache)
    assert list(cache.iterdir()) == []


async def test_fetch_outside_the_grant_is_a_403_fetch_error(tmp_path, store_server):
    store, signer, base, _ = store_server
    granted, other = store.put_bytes(b"mine"), store.put_bytes(b"someone else's")
    url = blob_url(base, other, signer.issue_grant([granted], ttl=60))
    with pytest.raises(FetchError) as e:
        await fetch_artifact(url, other, tmp_path / "cache")
    assert e.value.status == 403



async def test_a_kill_requested_before_start_lands_as_soon_as_the_child_exists(tmp_path, long_shard):
    """The safety reflex may fire while the sandbox is still being created: the child must never run unguarded."""
    run = SandboxedRun(spec(tmp_path, classifier_model(tmp_path / "m.onnx"), long_shard, batch_size=1))
    run.kill_now()  # before start: nothing to kill yet, but the request is kept
    await run.start()
    res = await asyncio.wait_for(run.wait(), timeout=30)
    assert res.reason is Reason.KILLED
    assert res.items_done < 200_000

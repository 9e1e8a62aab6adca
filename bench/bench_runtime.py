"""Benchmark: the sandboxed car runtime's throughput against a bare ONNX Runtime loop on the same core.

What it is for: showing what the sandbox (child process, limits, batching, progress, checkpoints, deterministic
result writing) costs. Both sides run the same MLP (64 -> 100 -> 10, like the scikit-learn digits classifier,
seeded random weights built with onnx.helper), the same batch size and one intra-op thread, pinned to the same
core, one after the other, alternating. On a shared machine wall time measures the neighbours as much as the
code, so the headline `ratio_steady_cpu` compares items per CPU-second of each loop (same work, same core,
contention removed); wall-clock ratios are reported beside it. Each ratio is the median of the per-round
ratios (each pair runs back to back, so slow drifts in the machine's load cancel). Writes
bench/results/runtime.json.

"steady" compares inference-loop throughput (the runner reports its loop time); "end_to_end" also counts the
child's start-up, model and shard loading and result writing, which a shard pays once.

It must never be run as a test (it takes tens of seconds) and it measures, it does not assert.

    .venv/bin/python bench/bench_runtime.py [--items 400000] [--batch-size 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from fleetlet_car.runtime import Limits, Reason, RunSpec, SandboxedRun
from onnx import TensorProto, helper

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results" / "runtime.json"


def build_mlp(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.1, (64, 100)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (100,)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (100, 10)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (10,)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def bare_loop(model: Path, x: np.ndarray, batch: int) -> tuple[float, float]:
    """(items per wall second, items per CPU second) of the simplest loop: one session, one thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x[:batch]})  # warm-up, as the runner's first batch is part of its loop
    n = x.shape[0]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, n, batch):
        sess.run(None, {"x": x[i : i + batch]})
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


async def runtime_run(model: Path, shard: Path, work: Path, batch: int) -> tuple[float, float, float]:
    """(loop items per wall second, loop items per CPU second, end-to-end items per wall second)."""
    spec = RunSpec(
        model_path=model,
        input_path=shard,
        work_dir=work,
        batch_size=batch,
        threads=1,
        limits=Limits(memory_bytes=2 << 30, wall_seconds=600),
    )
    run = SandboxedRun(spec)
    await run.start()
    res = await run.wait()
    if res.reason is not Reason.COMPLETED or not res.loop_seconds or not res.loop_cpu_seconds:
        raise RuntimeError(f"runtime run failed: {res.reason}: {res.message}")
    n = res.items_done
    return n / res.loop_seconds, n / res.loop_cpu_seconds, n / res.duration_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # the child inherits it: both sides on the same core
    with tempfile.TemporaryDirectory(prefix="fleetlet-bench-") as tmp:
        d = Path(tmp)
        model = build_mlp(d / "mlp.onnx")
        x = np.random.default_rng(1).random((args.items, 64), dtype=np.float32)
        shard = d / "shard.npy"
        np.save(shard, x)
        bare, bare_cpu, steady, steady_cpu, e2e = [], [], [], [], []
        for r in range(args.rounds):
            b, bc = bare_loop(model, x, args.batch_size)
            s, sc, e = asyncio.run(runtime_run(model, shard, d / f"work{r}", args.batch_size))
            for acc, v in ((bare, b), (bare_cpu, bc), (steady, s), (steady_cpu, sc), (e2e, e)):
                acc.append(v)
            logger.info(
                "round %d: bare %.0f/s (%.0f/cpu-s), runtime loop %.0f/s (%.0f/cpu-s), end-to-end %.0f/s",
                r, b, bc, s, sc, e,
            )  # fmt: skip

    def med_ratio(a: list[float], b: list[float]) -> float:
        return round(float(np.median(np.array(a) / np.array(b))), 4)

    out = {
        "model": "mlp 64-100-10 (float32, seeded random weights)",
        "items": args.items,
        "batch_size": args.batch_size,
        "threads": 1,
        "core": core,
        "rounds": args.rounds,
        "ratio_steady_cpu": med_ratio(steady_cpu, bare_cpu),
        "ratio_steady": med_ratio(steady, bare),
        "ratio_end_to_end": med_ratio(e2e, bare),
        "ratio_steady_best_of": round(max(steady) / max(bare), 4),
        "bare_items_per_cpu_s": round(float(np.median(bare_cpu))),
        "runtime_items_per_cpu_s": round(float(np.median(steady_cpu))),
        "bare_items_per_s": round(float(np.median(bare))),
        "runtime_items_per_s": round(float(np.median(steady))),
        "runtime_end_to_end_items_per_s": round(float(np.median(e2e))),
        "rounds_items_per_s": {"bare": [round(v) for v in bare], "runtime": [round(v) for v in steady]},
        "target_ratio": 0.95,
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
        "cpus_online": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    logger.info("%s", json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

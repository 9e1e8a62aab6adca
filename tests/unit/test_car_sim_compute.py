"""SIMULATED compute (fleetlet-sim --simulate-compute): work that takes time, checkpoints and yields comparable results.

What a benchmark relies on: a run takes items / items-per-second; it reports progress and checkpoints the way the
real runner does, stops gracefully with a checkpoint and resumes from it; an immediate kill is synchronous, even
before the run started; honest replicas agree byte for byte whatever the shard boundaries, and a liar does not.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from fleetlet_car.runtime import Reason, RunSpec, ShardRef
from fleetlet_car.runtime.results import sha256_file
from fleetlet_car.sim.compute import OUTPUTS_PER_ITEM, PROVIDER, SimulatedCompute, simulated_outputs

MODEL, INPUT = "a" * 64, "b" * 64


def spec(tmp_path: Path, work: str, start: int = 0, end: int = 200, **kw: object) -> RunSpec:
    return RunSpec(model_path=tmp_path / "unused.onnx", input_path=tmp_path / "unused.npy", work_dir=tmp_path / work,
                   shard=ShardRef(MODEL, INPUT, start, end), **kw)  # type: ignore[arg-type]  # fmt: skip


async def test_a_run_takes_items_over_rate_and_honest_replicas_agree_byte_for_byte(tmp_path: Path) -> None:
    compute = SimulatedCompute(1000.0, progress_interval=0.05)
    assert await compute.providers() == (PROVIDER,) and compute.provider_for(2) == PROVIDER
    results = []
    for work in ("car-1", "car-2"):
        run = compute.run(spec(tmp_path, work))
        t0 = time.monotonic()
        await run.start()
        kinds = [ev.kind async for ev in run.events()]
        res = await run.wait()
        assert time.monotonic() - t0 >= 0.18  # 200 items at 1000 items/s
        assert res.reason is Reason.COMPLETED and res.items_done == res.items_total == 200
        assert res.provider == PROVIDER and "progress" in kinds
        assert run.pid is None  # no process: SIMULATED work runs on the agent's loop
        assert res.result_path is not None and res.result_sha256 == sha256_file(res.result_path)
        results.append(res)
    assert results[0].result_sha256 == results[1].result_sha256
    assert results[0].result_path is not None
    out = np.load(results[0].result_path, allow_pickle=False)
    assert out.shape == (200, OUTPUTS_PER_ITEM) and out.dtype == np.float32

    liar = SimulatedCompute(1000.0, lie=True).run(spec(tmp_path, "liar"))
    await liar.start()
    lied = await liar.wait()
    assert lied.reason is Reason.COMPLETED and lied.result_sha256 != results[0].result_sha256


def test_each_items_result_depends_only_on_the_model_the_input_and_the_item() -> None:
    whole = simulated_outputs(MODEL, INPUT, 0, 100)
    pieces = np.concatenate([simulated_outputs(MODEL, INPUT, 0, 37), simulated_outputs(MODEL, INPUT, 37, 100)])
    np.testing.assert_array_equal(whole, pieces)
    assert not np.array_equal(whole, simulated_outputs(MODEL, "c" * 64, 0, 100))
    assert ((whole >= 0) & (whole < 1)).all()


async def test_a_graceful_stop_checkpoints_and_a_resumed_run_gives_the_same_result(tmp_path: Path) -> None:
    compute = SimulatedCompute(2000.0, progress_interval=0.05)
    run = compute.run(spec(tmp_path, "first", end=2000, checkpoint_every_items=200))
    await run.start()
    async for ev in run.events():
        if ev.kind == "checkpoint":
            break
    await run.stop()
    stopped = await run.wait()
    assert stopped.reason is Reason.STOPPED and stopped.checkpoint_path is not None
    assert 0 < stopped.items_done < 2000

    resumed_run = compute.run(spec(tmp_path, "second", end=2000, resume_from=stopped.checkpoint_path))
    await resumed_run.start()
    first_event = await anext(resumed_run.events())
    assert first_event.kind == "resumed" and first_event.items_done == stopped.items_done
    resumed = await resumed_run.wait()
    fresh = compute.run(spec(tmp_path, "fresh", end=2000))
    await fresh.start()
    assert resumed.result_sha256 == (await fresh.wait()).result_sha256


async def test_kill_now_is_synchronous_even_before_the_run_starts(tmp_path: Path) -> None:
    compute = SimulatedCompute(100.0)
    early = compute.run(spec(tmp_path, "early"))
    early.kill_now()  # the reflex fired while the run was being set up
    await early.start()
    assert [ev async for ev in early.events()] == []
    res = await asyncio.wait_for(early.wait(), 2)
    assert res.reason is Reason.KILLED and res.items_done == 0

    running = compute.run(spec(tmp_path, "running", checkpoint_every_items=10))
    await running.start()
    async for ev in running.events():
        if ev.kind == "checkpoint":
            break
    running.kill_now()
    res = await asyncio.wait_for(running.wait(), 2)
    assert res.reason is Reason.KILLED and res.signal == 9 and res.checkpoint_path is not None

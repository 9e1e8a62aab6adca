"""SIMULATED compute: a ``Runner`` that pretends to infer, for scale benchmarks of thousands of cars.

What it is for: a 2-core machine cannot run thousands of real sandboxes, yet a benchmark of the control plane
needs thousands of cars doing work that takes time, reports progress, checkpoints, gets interrupted, resumes
and produces results that replicas can be compared by. ``SimulatedCompute`` does exactly that without running a
model: a run takes ``items / items_per_second`` seconds, emits ``Progress`` events and checkpoint files the same
way the real runner does (so the agent uploads them and a shard resumes from them), and writes a result that is
a deterministic function of (model digest, input digest, item index): honest replicas agree byte for byte on any
shard boundaries. ``lie=True`` makes a car produce a wrong result (for verification tests). Its provider is
``SimulatedCompute``, which the car's hello and every pod status say.

What it must never do: be used on a real car or be mistaken for real inference (everything here is named
SIMULATED; ``fleetlet-sim --simulate-compute ITEMS_PER_S`` turns it on), read the model or the input (it never
needs them), or delay an immediate stop: ``kill_now`` is synchronous, like the sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..runtime import Progress, Reason, RunResult, RunSpec
from ..runtime.protocol import CHECKPOINT_NAME, EXIT_STOPPED
from ..runtime.results import sha256_file, write_arrays

logger = logging.getLogger(__name__)

PROVIDER = "SimulatedCompute"
"""The execution provider a SIMULATED run reports."""
OUTPUTS_PER_ITEM = 4
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def simulated_outputs(model_sha256: str, input_sha256: str, start: int, end: int, *, lie: bool = False
                      ) -> npt.NDArray[np.float32]:  # fmt: skip
    """The SIMULATED result of items ``[start, end)``: ``OUTPUTS_PER_ITEM`` floats per item, each a function of
    (model, input, item index) only, so any split of a shard into pieces gives the same bytes per item."""
    key = int.from_bytes(hashlib.sha256(f"{model_sha256}|{input_sha256}".encode()).digest()[:8], "little")
    if lie:
        key ^= 0x5EED_BAD_C0FFEE  # a liar's result: same shape, wrong values
    counters = np.arange(start * OUTPUTS_PER_ITEM, end * OUTPUTS_PER_ITEM, dtype=np.uint64)
    with np.errstate(over="ignore"):  # splitmix64 wraps around on purpose
        z = (counters + np.uint64(key)) & _MASK
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        z = z ^ (z >> np.uint64(31))
    values = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    return values.reshape(end - start, OUTPUTS_PER_ITEM)


class SimulatedCompute:
    """A SIMULATED ``Runner``: ``items_per_second`` per run, on any car, for any accelerator."""

    def __init__(self, items_per_second: float, *, lie: bool = False, progress_interval: float = 0.5) -> None:
        if items_per_second <= 0:
            raise ValueError("items_per_second must be positive")
        self.items_per_second = items_per_second
        self.lie = lie
        self.progress_interval = progress_interval

    async def providers(self) -> tuple[str, ...]:
        return (PROVIDER,)

    def provider_for(self, accelerator: int) -> str | None:
        return PROVIDER  # SIMULATED: it pretends to serve any accelerator the car's spec lists

    def run(self, spec: RunSpec) -> SimulatedRun:
        return SimulatedRun(spec, self.items_per_second, lie=self.lie, progress_interval=self.progress_interval)


class SimulatedRun:
    """One SIMULATED run; the same contract as ``SandboxedRun`` (see ``runtime.interface``)."""

    def __init__(self, spec: RunSpec, items_per_second: float, *, lie: bool, progress_interval: float) -> None:
        self.spec = spec
        self.items_per_second = items_per_second
        self.lie = lie
        self.progress_interval = progress_interval
        self._events: asyncio.Queue[Progress | None] = asyncio.Queue()
        self._task: asyncio.Task[RunResult] | None = None
        self._kill_requested = False
        self._stop_requested = False
        self._wake = asyncio.Event()
        self._started = 0.0

    @property
    def pid(self) -> int | None:
        return None  # no process: it runs on the agent's event loop

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("this SimulatedRun was already started")
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._work(), name="simulated-compute")
        # Whatever ends the task (even a kill before its first step) ends the events.
        self._task.add_done_callback(lambda _: self._events.put_nowait(None))
        if self._kill_requested:
            self.kill_now()

    def kill_now(self) -> None:
        """Stop at once, synchronously; before ``start`` it is remembered and lands when the run starts."""
        self._kill_requested = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def stop(self, immediate: bool = False) -> None:
        if immediate:
            self.kill_now()
        else:
            self._stop_requested = True
            self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task})  # unlike awaiting it, never raises the run's own cancellation

    async def events(self) -> AsyncIterator[Progress]:
        while True:
            ev = await self._events.get()
            if ev is None:
                self._events.put_nowait(None)
                return
            yield ev

    async def wait(self) -> RunResult:
        if self._task is None:
            raise RuntimeError("call start() before wait()")
        await asyncio.wait({self._task})
        if self._task.cancelled():  # killed before its first step: nothing ran
            return self._result(Reason.KILLED, "stopped immediately (SIMULATED)", None, 9, 0, None, self._started,
                                None)  # fmt: skip
        return self._task.result()

    # ---- the pretend work -------------------------------------------------------------------------------

    async def _work(self) -> RunResult:
        started = time.monotonic()
        spec = self.spec
        shard = spec.shard
        done, total = 0, 0
        ckpt = Path(spec.work_dir) / CHECKPOINT_NAME
        try:
            if shard is None:
                return self._result(Reason.ERROR, "SIMULATED compute needs the shard's identity (RunSpec.shard)",
                                    1, None, 0, None, started, None)  # fmt: skip
            total = shard.end - shard.start
            fingerprint = f"simulated|{shard.model_sha256}|{shard.input_sha256}|{shard.start}|{shard.end}"
            done = await asyncio.to_thread(self._prepare, fingerprint)
            if done:
                self._events.put_nowait(Progress("resumed", done, total))
            loop = asyncio.get_running_loop()
            base, t0 = done, loop.time()
            last_ckpt_at, last_ckpt_items = t0, done
            deadline = t0 + spec.limits.wall_seconds if spec.limits.wall_seconds else None
            while done < total:
                left = (total - done) / self.items_per_second
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.progress_interval, left)):
                        await self._wake.wait()
                now = loop.time()
                done = min(total, base + int((now - t0) * self.items_per_second))
                timed_out = deadline is not None and now >= deadline
                if self._stop_requested or timed_out:
                    await asyncio.to_thread(self._checkpoint, ckpt, fingerprint, done)
                    self._events.put_nowait(Progress("checkpoint", done, total, ckpt))
                    if timed_out:
                        return self._result(Reason.DEADLINE_EXCEEDED, f"wall-clock limit of "
                                            f"{spec.limits.wall_seconds}s exceeded", None, 15, done, total, started,
                                            ckpt)  # fmt: skip
                    return self._result(Reason.STOPPED, "stopped gracefully", EXIT_STOPPED, None, done, total, started,
                                        ckpt)  # fmt: skip
                every_items, every_s = spec.checkpoint_every_items, spec.checkpoint_every_seconds
                if done < total and ((every_items and done - last_ckpt_items >= every_items)
                                     or (every_s and now - last_ckpt_at >= every_s)):  # fmt: skip
                    await asyncio.to_thread(self._checkpoint, ckpt, fingerprint, done)
                    self._events.put_nowait(Progress("checkpoint", done, total, ckpt))
                    last_ckpt_at, last_ckpt_items = now, done
                elif done < total:
                    self._events.put_nowait(Progress("progress", done, total))
            path, digest = await asyncio.to_thread(self._write_result)
            self._events.put_nowait(Progress("progress", done, total))
            with contextlib.suppress(FileNotFoundError):
                ckpt.unlink()
            return self._result(Reason.COMPLETED, "completed (SIMULATED)", 0, None, done, total, started, None,
                                path, digest)  # fmt: skip
        except asyncio.CancelledError:  # kill_now: ends at once, the last checkpoint stays for a resume
            left_ckpt = ckpt if ckpt.is_file() else None
            return self._result(Reason.KILLED, "stopped immediately (SIMULATED)", None, 9, done, total or None,
                                started, left_ckpt)  # fmt: skip

    def _prepare(self, fingerprint: str) -> int:
        work = Path(self.spec.work_dir)
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        source = self.spec.resume_from
        if source is None:
            return 0
        try:
            with np.load(source, allow_pickle=False) as z:
                if str(z["__fingerprint__"]) != fingerprint:
                    return 0
                return int(z["__done__"])
        except (OSError, KeyError, ValueError):
            return 0

    @staticmethod
    def _checkpoint(path: Path, fingerprint: str, done: int) -> None:
        write_arrays(path, {"__fingerprint__": np.array(fingerprint), "__done__": np.array(done, dtype=np.int64)})

    def _write_result(self) -> tuple[Path, str]:
        shard = self.spec.shard
        assert shard is not None
        path = Path(self.spec.work_dir) / "result.npy"
        outputs = simulated_outputs(shard.model_sha256, shard.input_sha256, shard.start, shard.end, lie=self.lie)
        write_arrays(path, {"output": outputs})
        return path, sha256_file(path)

    def _result(self, reason: Reason, message: str, exit_code: int | None, sig: int | None, done: int,
                total: int | None, started: float, checkpoint: Path | None, result_path: Path | None = None,
                digest: str | None = None) -> RunResult:  # fmt: skip
        elapsed = time.monotonic() - started
        return RunResult(
            reason=reason, message=message, exit_code=exit_code, signal=sig, items_done=done, items_total=total,
            result_path=result_path, result_sha256=digest, checkpoint_path=checkpoint,
            network_isolation="simulated", duration_seconds=elapsed, loop_seconds=elapsed, loop_cpu_seconds=None,
            provider=PROVIDER, threads=self.spec.threads, cpus=(),
        )  # fmt: skip


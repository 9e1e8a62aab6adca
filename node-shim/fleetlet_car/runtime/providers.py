"""ONNX Runtime execution providers: which ones this car's onnxruntime offers, and which one a shard runs on.

What it is for: the agent lists the providers in its hello and refuses an accelerator pod at once when no
accelerator provider exists; the sandboxed runner picks the same provider by the same rule and checks that
the session really got it. ``choose_provider`` is that rule: an accelerator pod runs on TensorRT, else CUDA,
whichever is offered (never silently on the CPU); a CPU pod runs on the CPU provider.

``ProviderProbe`` asks a short child process (``python -c ...``), once, because importing onnxruntime into
the agent would cost it ~100 MB and seconds of start-up, and the agent must stay small and free of native
inference code. ``shared_probe()`` is the process's one probe, so the simulator's thousands of agents share a
single child process.

This module must never import onnxruntime (the child does), and never block the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import sys

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
ACCELERATOR_PREFERENCE: tuple[str, ...] = (TENSORRT, CUDA)
"""Accelerator providers a shard may run on, best first."""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
_PROBE = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"


def choose_provider(available: tuple[str, ...] | list[str], accelerator: int) -> str | None:
    """The provider a shard runs on, or None when it asks for an accelerator this car cannot serve."""
    if accelerator <= 0:
        return CPU
    return next((p for p in ACCELERATOR_PREFERENCE if p in available), None)


def session_providers(chosen: str) -> list[str]:
    """The provider list to open a session with: the chosen one first; an accelerator keeps CUDA (TensorRT's
    fallback for layers it cannot build) and the CPU for the few operators accelerators never implement."""
    if chosen == CPU:
        return [CPU]
    chain = [chosen] + ([CUDA] if chosen == TENSORRT else [])
    return chain + [CPU]


def accelerator_missing_message(accelerator: int, accelerator_type: str | None, available: tuple[str, ...]) -> str:
    kind = f" of type {accelerator_type}" if accelerator_type else ""
    return (
        f"the pod requests {accelerator} accelerator(s){kind}, but this car's ONNX Runtime offers only "
        f"{', '.join(available) or 'no execution providers'}: no {' or '.join(ACCELERATOR_PREFERENCE)}. "
        "It was not run on the CPU instead; schedule it on a car whose hello lists an accelerator provider"
    )


class ProviderProbe:
    """Asks a child Python which execution providers its onnxruntime offers; remembers the answer.

    Concurrent callers share one child; a failed probe is remembered as "none" (the car then takes no
    accelerator work, and its runner will report the real error on a CPU shard).
    """

    def __init__(self, python: str = sys.executable, timeout_seconds: float = 60.0) -> None:
        self.python = python
        self.timeout_seconds = timeout_seconds
        self._result: tuple[str, ...] | None = None
        self._probing: asyncio.Future[tuple[str, ...]] | None = None  # the child being asked

    @property
    def known(self) -> tuple[str, ...] | None:
        """The answer if the probe has run, else None (never waits)."""
        return self._result

    async def providers(self) -> tuple[str, ...]:
        if self._result is not None:
            return self._result
        task = self._probing
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = self._probing = asyncio.ensure_future(self._probe())
        # Shielded: one caller giving up (cancelled) must not cancel the probe the others wait for.
        self._result = await asyncio.shield(task)
        return self._result

    async def _probe(self) -> tuple[str, ...]:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-c", _PROBE, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = await asyncio.wait_for(proc.communicate(), self.timeout_seconds)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                raise RuntimeError(err.decode("utf-8", "replace").strip()[-300:] or f"exit {proc.returncode}")
            found = json.loads(out)
            if not isinstance(found, list) or not all(isinstance(p, str) for p in found):
                raise ValueError(f"unexpected answer {out[:200]!r}")
        except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
            logger.warning("cannot list ONNX Runtime's execution providers (%s); offering none", exc)
            return ()
        # Only names the car link can carry (a provider is a CamelCase word there); anything else is not ours.
        providers = tuple(p for p in found if _NAME.match(p))
        logger.info("ONNX Runtime offers %s", ", ".join(providers) or "no execution providers")
        return providers


@functools.cache
def shared_probe() -> ProviderProbe:
    """The process's one probe. A process-wide cache is right here: the answer is a fact about the installed
    onnxruntime, which cannot change while the process lives."""
    return ProviderProbe()

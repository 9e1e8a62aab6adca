"""Runs one shard's model in a sandboxed child process and supervises it (the car agent's side of runner.py).

What it is for: `SandboxedRun` starts `python -m fleetlet_car.runtime.runner` with

- an empty environment except PATH, PYTHONPATH (from this interpreter's sys.path) and thread settings;
- the pod's resources as limits ("the pod's requests become the sandbox's limits", see resources.py): its
  memory is the most RSS the runner's process group may hold, polled from /proc every ~100 ms by a watchdog
  here (over it: SIGKILL to the group, reason OOMKilled, with the numbers); its cpu is ONNX Runtime's intra-op
  thread count and the child's CPU affinity (that many CPUs; a fraction rounds up to a whole core, which a
  cgroup's cpu.max would enforce exactly on a real car);
- resource limits set in the child before exec: RLIMIT_AS only as a generous backstop (the memory limit plus
  the runtime's own measured overhead), RLIMIT_CPU, RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC when not
  root (the kernel ignores it for root, and it counts every process of the uid);
- a wall-clock limit enforced here; its own session and process group; no inherited fds; a private work dir;
- no network: before exec the child calls unshare(CLONE_NEWNET), landing in a fresh namespace with only a
  down loopback. If the kernel refuses, the run is refused (reason SandboxUnavailable) unless
  `allow_network_fallback` is set; then a seccomp filter makes socket() fail for every family but AF_UNIX and
  the runner adds a Python audit hook that refuses sockets. The layer actually in force is observed by the
  runner and reported as `RunResult.network_isolation` ("netns", "seccomp+audit-hook" or "audit-hook");
- the execution provider the pod's accelerator asks for (runtime/providers.py): an accelerator pod runs on
  TensorRT or CUDA or fails with AcceleratorUnavailable, never silently on the CPU; `RunResult.provider` is
  the provider the runner's session really used.

It reports progress as `Progress` events (an async iterator and/or a callback), stops gracefully (SIGTERM: the
runner checkpoints and exits) or immediately (`kill_now`: SIGKILL to the whole process group, synchronously, no
I/O first — the safety reflex calls it when the car starts to drive), and returns a `RunResult` whose `reason`
is a pod-status reason (Completed, Stopped, Killed, OOMKilled, DeadlineExceeded, CPULimitExceeded,
DigestMismatch, ModelError, InputError, AcceleratorUnavailable, SandboxUnavailable, Error).

What it must never do: give the model a network, pass the agent's environment (credentials) to the child, block
the event loop on file I/O, or delay an immediate stop behind anything.

Caveats: RSS counts pages shared between the group's processes once per process (conservative). GPU memory is
not RSS: with an accelerator, RLIMIT_AS is skipped (CUDA maps huge virtual ranges) and the device's own memory
is bounded by the pod's cgroup and the driver. The child runs with the agent's uid; on a car the agent should
itself run as an unprivileged user with only CAP_SYS_ADMIN for unshare, or in a user namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from . import protocol
from .resources import address_space_backstop
from .results import sha256_file

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_STDERR_TAIL = 8192


class Reason(StrEnum):
    COMPLETED = "Completed"
    STOPPED = "Stopped"  # graceful stop; a checkpoint was written
    KILLED = "Killed"  # immediate stop (safety reflex) or a graceful stop that ran out of grace
    OOM_KILLED = "OOMKilled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    CPU_LIMIT_EXCEEDED = "CPULimitExceeded"
    DIGEST_MISMATCH = "DigestMismatch"
    MODEL_ERROR = "ModelError"
    INPUT_ERROR = "InputError"
    ACCELERATOR_UNAVAILABLE = "AcceleratorUnavailable"
    SANDBOX_UNAVAILABLE = "SandboxUnavailable"
    ERROR = "Error"


_EXIT_REASONS = {
    protocol.EXIT_OK: Reason.COMPLETED,
    protocol.EXIT_STOPPED: Reason.STOPPED,
    protocol.EXIT_MODEL_ERROR: Reason.MODEL_ERROR,
    protocol.EXIT_INPUT_ERROR: Reason.INPUT_ERROR,
    protocol.EXIT_DIGEST_MISMATCH: Reason.DIGEST_MISMATCH,
    protocol.EXIT_SANDBOX: Reason.SANDBOX_UNAVAILABLE,
    protocol.EXIT_OOM: Reason.OOM_KILLED,
    protocol.EXIT_ACCELERATOR: Reason.ACCELERATOR_UNAVAILABLE,
}


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = 2 << 30  # RSS of the runner's process group (the pod's memory), watchdog-enforced
    cpu_seconds: int | None = None  # RLIMIT_CPU (SIGXCPU at the limit)
    wall_seconds: float | None = None  # enforced by the parent: SIGTERM (checkpoint), then SIGKILL
    max_open_files: int = 256
    max_processes: int | None = None  # RLIMIT_NPROC; applied only when not root
    grace_seconds: float = 10.0  # SIGTERM -> SIGKILL when stopping gracefully or at the deadline
    memory_poll_seconds: float = 0.1  # how often the watchdog reads the group's RSS
    address_space_bytes: int | None = None  # RLIMIT_AS; None: memory_bytes + the runtime's overhead (backstop)


@dataclass(frozen=True)
class ShardRef:
    """What the run computes, by identity: the simulated compute derives its result from exactly this."""

    model_sha256: str
    input_sha256: str
    start: int
    end: int


@dataclass(frozen=True)
class RunSpec:
    model_path: Path
    input_path: Path
    work_dir: Path
    input_format: Literal["npy", "npz"] = "npy"
    model_sha256: str | None = None  # verified by the runner before loading
    input_sha256: str | None = None
    batch_size: int = 256
    threads: int = 1  # ONNX Runtime intra-op threads; replicas must use the same count to match bit-for-bit
    cpus: tuple[int, ...] | None = None  # CPU affinity; None: the first `threads` CPUs this process may use
    checkpoint_every_items: int = 0  # 0 = only by time
    checkpoint_every_seconds: float = 30.0
    limits: Limits = field(default_factory=Limits)
    allow_network_fallback: bool = False
    accelerator: int = 0  # accelerators the pod requests: > 0 runs on TensorRT/CUDA or fails, never on the CPU
    accelerator_type: str | None = None  # named in the AcceleratorUnavailable message
    resume_from: Path | None = None  # a checkpoint fetched from elsewhere, copied into work_dir before start
    shard: ShardRef | None = None  # the shard's identity (the real runner reads the files; a simulation cannot)

    def affinity(self) -> tuple[int, ...]:
        """The CPUs the child is pinned to."""
        if self.cpus:
            return tuple(sorted(self.cpus))
        allowed = sorted(os.sched_getaffinity(0))
        return tuple(allowed[: max(1, min(self.threads, len(allowed)))])


@dataclass(frozen=True)
class Progress:
    kind: Literal["progress", "checkpoint", "resumed"]
    items_done: int
    items_total: int
    checkpoint_path: Path | None = None


@dataclass(frozen=True)
class RunResult:
    reason: Reason
    message: str
    exit_code: int | None  # None when ended by a signal
    signal: int | None
    items_done: int
    items_total: int | None
    result_path: Path | None
    result_sha256: str | None
    checkpoint_path: Path | None  # the latest checkpoint, if one is left to resume from
    network_isolation: str | None  # the layer the runner observed; None if it never got that far
    duration_seconds: float
    loop_seconds: float | None  # wall time in the inference loop (excludes start-up and loading)
    loop_cpu_seconds: float | None  # CPU time the runner spent in that loop
    provider: str | None = None  # the execution provider the session really ran on; None if none was opened
    threads: int = 1
    cpus: tuple[int, ...] = ()
    peak_rss_bytes: int | None = None  # the most RSS the watchdog saw in the runner's process group

    @property
    def succeeded(self) -> bool:
        return self.reason is Reason.COMPLETED


def _child_pythonpath() -> str:
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory that holds fleetlet_car
    paths = [pkg_root] + [p for p in sys.path if p and os.path.isdir(p)]
    return os.pathsep.join(dict.fromkeys(paths))


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# (audit arch, socket syscall number) per machine; seccomp is skipped on others.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def _socket_seccomp_program() -> tuple[Any, _SockFprog] | None:
    """A BPF program: socket(domain != AF_UNIX) -> EACCES; every other syscall allowed.

    struct seccomp_data (little-endian): u32 nr @0, u32 arch @4, u64 ip @8, u64 args[6] @16.
    """
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_socket = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    deny, allow = 0x00050000 | errno.EACCES, 0x7FFF0000
    prog = [
        (ld, 0, 0, 4),  # 0: A = arch
        (jeq, 1, 0, audit_arch),  # 1: native arch -> 3
        (ret, 0, 0, deny),  # 2: a foreign ABI: refuse (Python never uses one)
        (ld, 0, 0, 0),  # 3: A = syscall nr
        (jge, 3, 0, 0x40000000),  # 4: x32 ABI -> deny (8)
        (jeq, 0, 3, nr_socket),  # 5: not socket -> allow (9)
        (ld, 0, 0, 16),  # 6: A = low 32 bits of args[0] (domain)
        (jeq, 1, 0, 1),  # 7: AF_UNIX -> allow (9)
        (ret, 0, 0, deny),  # 8
        (ret, 0, 0, allow),  # 9
    ]
    filters = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    return filters, _SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))


class _Preexec:
    """Runs in the forked child before exec. Everything it needs is resolved beforehand in the parent, so the
    child only makes system calls (no imports, no dlopen, no allocation-heavy work)."""

    def __init__(self, spec: RunSpec, unshare: Callable[[int], int] | None) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._unshare = unshare if unshare is not None else libc.unshare
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self._fallback = spec.allow_network_fallback
        self._seccomp = _socket_seccomp_program() if spec.allow_network_fallback else None
        lim = spec.limits
        rl: list[tuple[int, int, int]] = [(resource.RLIMIT_CORE, 0, 0)]
        rl.append((resource.RLIMIT_NOFILE, lim.max_open_files, lim.max_open_files))
        backstop = lim.address_space_bytes
        if backstop is None and lim.memory_bytes is not None:
            backstop = address_space_backstop(lim.memory_bytes, spec.threads)
        if backstop is not None and spec.accelerator <= 0:  # CUDA maps huge virtual ranges: the RSS watchdog rules
            rl.append((resource.RLIMIT_AS, backstop, backstop))
        if lim.cpu_seconds is not None:
            rl.append((resource.RLIMIT_CPU, lim.cpu_seconds, lim.cpu_seconds + 5))
        if lim.max_processes is not None and os.geteuid() != 0:
            rl.append((resource.RLIMIT_NPROC, lim.max_processes, lim.max_processes))
        self._rlimits = rl
        self._cpus = set(spec.affinity())
        self._refusal = (
            b"fleetlet sandbox: unshare(CLONE_NEWNET) refused; not running without network isolation "
            b"(give the agent CAP_SYS_ADMIN or set allow_network_fallback)\n"
        )

    def __call__(self) -> None:
        for res, soft, hard in self._rlimits:
            resource.setrlimit(res, (soft, hard))
        os.sched_setaffinity(0, self._cpus)
        os.umask(0o077)
        if self._unshare(CLONE_NEWNET) == 0:
            return
        if not self._fallback:
            os.write(2, self._refusal)
            os._exit(protocol.EXIT_SANDBOX)
        if self._seccomp is not None:
            _, fprog = self._seccomp
            if self._prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, required for an unprivileged filter
                self._prctl(22, 2, ctypes.addressof(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        # Whether the filter took is observed by the runner (it tries a socket) and reported, not assumed.


class SandboxedRun:
    """One sandboxed run of a shard. Use: `await run.start()`, iterate `run.events()` (or pass `on_progress`),
    `await run.stop(immediate=…)` if needed, `await run.wait()` for the `RunResult`.

    Safe to stop more than once; `wait()` may be awaited by several tasks.
    """

    def __init__(
        self,
        spec: RunSpec,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        _unshare: Callable[[int], int] | None = None,  # tests inject a refusing unshare
    ) -> None:
        self.spec = spec
        self._on_progress = on_progress
        self._unshare = _unshare
        self._proc: asyncio.subprocess.Process | None = None
        self._events: asyncio.Queue[Progress | None] = asyncio.Queue()
        self._supervisor: asyncio.Task[RunResult] | None = None
        self._stop_kind: Literal["graceful", "immediate"] | None = None
        self._kill_requested = False  # a kill before the child exists must still land (the reflex may fire early)
        self._deadline_hit = False
        self._started_at = 0.0
        # Filled from the runner's JSON lines.
        self._done = 0
        self._total: int | None = None
        self._network: str | None = None
        self._result_event: dict[str, Any] | None = None
        self._error_event: dict[str, Any] | None = None
        self._checkpoint: Path | None = None
        self._provider: str | None = None
        self._stderr: deque[bytes] = deque(maxlen=64)
        # The memory watchdog's findings: the peak RSS seen, and (rss, limit) once it killed the group.
        self._peak_rss: int | None = None
        self._memory_exceeded: tuple[int, int] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("this SandboxedRun was already started; create a new one to run again")
        spec = self.spec
        model_path, input_path = await asyncio.to_thread(self._prepare_work_dir)
        argv = [
            sys.executable, "-B", "-m", protocol.RUNNER_MODULE,
            "--model", str(model_path),
            "--input", str(input_path),
            "--format", spec.input_format,
            "--batch-size", str(spec.batch_size),
            "--threads", str(spec.threads),
            "--checkpoint-items", str(spec.checkpoint_every_items),
            "--checkpoint-seconds", str(spec.checkpoint_every_seconds),
            "--parent-netns", os.readlink("/proc/self/ns/net"),
        ]  # fmt: skip
        if spec.model_sha256:
            argv += ["--model-sha256", spec.model_sha256]
        if spec.input_sha256:
            argv += ["--input-sha256", spec.input_sha256]
        if spec.allow_network_fallback:
            argv.append("--allow-network-fallback")
        if spec.accelerator > 0:
            argv += ["--accelerator", str(spec.accelerator)]
            if spec.accelerator_type:
                argv += ["--accelerator-type", spec.accelerator_type]
        threads = str(spec.threads)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "PYTHONPATH": _child_pythonpath(),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "LC_ALL": "C.UTF-8",
        }
        preexec = _Preexec(spec, self._unshare)
        self._started_at = time.monotonic()
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(spec.work_dir),
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=preexec,
        )
        logger.info("started sandboxed runner pid %d in %s", self._proc.pid, spec.work_dir)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"sandbox-{self._proc.pid}")
        if self._kill_requested:
            self.kill_now()  # the stop came while the child was being created: it never runs unguarded

    def _prepare_work_dir(self) -> tuple[Path, Path]:
        """Create the private work dir (and seed a checkpoint); return the absolute model and input paths."""
        work = Path(self.spec.work_dir)
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.spec.resume_from is not None:
            shutil.copyfile(self.spec.resume_from, work / protocol.CHECKPOINT_NAME)
        return Path(self.spec.model_path).resolve(), Path(self.spec.input_path).resolve()

    def kill_now(self) -> None:
        """SIGKILL the runner's whole process group, synchronously. Cheap, no I/O; safe to call repeatedly.
        Called before the child exists, it is remembered and applied the moment the child is created."""
        self._kill_requested = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if self._stop_kind is None or self._stop_kind == "graceful":
            self._stop_kind = "immediate"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid

    async def stop(self, immediate: bool = False) -> None:
        """Stop the run. immediate: SIGKILL now (the kill is sent before the first await). Otherwise SIGTERM:
        the runner writes a checkpoint and exits; after `limits.grace_seconds` it is killed."""
        if immediate:
            self.kill_now()
        else:
            await self._terminate()
        if self._proc is not None:
            await self._proc.wait()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if self._stop_kind is None:
            self._stop_kind = "graceful"
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self.spec.limits.grace_seconds)
        except TimeoutError:
            logger.warning(
                "runner pid %d ignored SIGTERM for %.1fs; killing it",
                proc.pid,
                self.spec.limits.grace_seconds,
            )
            self.kill_now()

    async def events(self) -> AsyncIterator[Progress]:
        """Progress events until the run ends. Iterate it from one task only."""
        while True:
            ev = await self._events.get()
            if ev is None:
                self._events.put_nowait(None)  # let a later iteration end too
                return
            yield ev

    async def wait(self) -> RunResult:
        if self._supervisor is None:
            raise RuntimeError("call start() before wait()")
        return await asyncio.shield(self._supervisor)

    async def _supervise(self) -> RunResult:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        readers = asyncio.gather(self._read_stdout(proc.stdout), self._read_stderr(proc.stderr))
        limit = self.spec.limits.memory_bytes
        watchdog = asyncio.create_task(self._watch_memory(proc, limit)) if limit is not None else None
        try:
            wall = self.spec.limits.wall_seconds
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), wall)
            except TimeoutError:
                self._deadline_hit = True
                logger.info("runner pid %d passed its %.1fs wall-clock limit; stopping it", proc.pid, wall)
                await self._terminate()
                await proc.wait()
            await readers
            return await self._result(proc.returncode)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._events.put_nowait(None)

    async def _watch_memory(self, proc: asyncio.subprocess.Process, limit: int) -> None:
        """Poll the runner group's RSS; over ``limit``, SIGKILL the group (reason OOMKilled).

        The /proc reads are a few small in-memory files per poll (no disk), so they run on the loop: a thread
        hop would cost more than the reads.
        """
        interval = self.spec.limits.memory_poll_seconds
        while proc.returncode is None:
            rss = group_rss_bytes(proc.pid)
            if rss is not None:
                self._peak_rss = max(self._peak_rss or 0, rss)
                if rss > limit and self._memory_exceeded is None:
                    self._memory_exceeded = (rss, limit)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    logger.info("runner pid %d used %d bytes of memory, over its limit of %d: killed",
                                proc.pid, rss, limit)
                    return
            await asyncio.sleep(interval)

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            try:
                msg = json.loads(raw)
                kind = msg["event"]
            except (ValueError, KeyError, TypeError):
                logger.debug("runner said: %r", raw[:200])
                continue
            if kind == "sandbox":
                self._network = msg.get("network")
            elif kind == "session":
                self._provider = str(msg.get("provider")) if msg.get("provider") else None
            elif kind in ("progress", "checkpoint", "resumed"):
                self._done, self._total = int(msg["done"]), int(msg["total"])
                ckpt = Path(msg["path"]) if kind == "checkpoint" else None
                if ckpt is not None:
                    self._checkpoint = ckpt
                self._publish(Progress(kind, self._done, self._total, ckpt))
            elif kind == "result":
                self._result_event = msg
                self._done, self._total = int(msg["done"]), int(msg["total"])
            elif kind == "error":
                self._error_event = msg

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self._stderr.append(raw)

    def _publish(self, ev: Progress) -> None:
        self._events.put_nowait(ev)
        if self._on_progress is not None:
            try:
                self._on_progress(ev)
            except Exception:
                logger.exception("progress callback failed; the run goes on")

    async def _result(self, returncode: int | None) -> RunResult:
        exit_code = returncode if returncode is not None and returncode >= 0 else None
        sig = -returncode if returncode is not None and returncode < 0 else None
        stderr_tail = b"".join(self._stderr).decode("utf-8", "replace")[-_STDERR_TAIL:].strip()
        err = self._error_event or {}
        message = str(err.get("message") or "")
        if self._memory_exceeded is not None:
            rss, limit = self._memory_exceeded
            reason = Reason.OOM_KILLED
            message = (
                f"memory use reached {_mib(rss)} (resident set of the runner's process group), over the pod's "
                f"limit of {_mib(limit)}: killed. Raise the pod's memory request/limit or use smaller batches"
            )
        elif self._deadline_hit:
            reason = Reason.DEADLINE_EXCEEDED
            message = f"wall-clock limit of {self.spec.limits.wall_seconds}s exceeded"
        elif self._stop_kind == "immediate":
            reason = Reason.KILLED
            message = "stopped immediately (SIGKILL to the process group)"
        elif exit_code is not None and exit_code in _EXIT_REASONS:
            reason = _EXIT_REASONS[exit_code]
        elif sig == signal.SIGXCPU:
            reason = Reason.CPU_LIMIT_EXCEEDED
            message = f"CPU-time limit of {self.spec.limits.cpu_seconds}s exceeded"
        elif sig == signal.SIGKILL:
            # Nobody here sent it: on a car that is the kernel's OOM killer (cgroup memory limit).
            reason = Reason.OOM_KILLED
            message = "killed by SIGKILL not sent by Fleetlet (most likely the kernel OOM killer)"
        elif any(m in stderr_tail.lower() for m in protocol.OOM_MARKERS):
            reason = Reason.OOM_KILLED
        else:
            reason = Reason.ERROR
        if not message:
            if reason is Reason.COMPLETED:
                message = "completed"
            else:
                message = stderr_tail[-500:] or f"runner exited with {returncode}"
        if reason is Reason.COMPLETED and self._result_event is None:
            reason, message = Reason.ERROR, "runner exited 0 without reporting a result"

        result_path = result_sha = None
        loop_seconds = loop_cpu_seconds = None
        if reason is Reason.COMPLETED and self._result_event is not None:
            result_path = Path(self._result_event["path"])
            loop_seconds = float(self._result_event.get("loop_seconds", 0.0))
            loop_cpu_seconds = float(self._result_event.get("loop_cpu_seconds", 0.0))
            # Trust but verify: the digest reported upstream is the one computed here.
            result_sha = await asyncio.to_thread(sha256_file, result_path)
            if result_sha != self._result_event.get("sha256"):
                logger.warning(
                    "runner reported a different digest than its result file has; using the file's"
                )
        ckpt = Path(self.spec.work_dir) / protocol.CHECKPOINT_NAME
        checkpoint = ckpt if await asyncio.to_thread(ckpt.is_file) else None
        if reason is not Reason.COMPLETED:
            logger.info("runner pid %s ended: %s: %s", self.pid, reason, message)
        return RunResult(
            reason=reason,
            message=message,
            exit_code=exit_code,
            signal=sig,
            items_done=self._done,
            items_total=self._total,
            result_path=result_path,
            result_sha256=result_sha,
            checkpoint_path=checkpoint,
            network_isolation=self._network,
            duration_seconds=time.monotonic() - self._started_at,
            loop_seconds=loop_seconds,
            loop_cpu_seconds=loop_cpu_seconds,
            provider=self._provider,
            threads=self.spec.threads,
            cpus=self.spec.affinity(),
            peak_rss_bytes=self._peak_rss,
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def group_rss_bytes(pid: int) -> int | None:
    """RSS of ``pid`` and every process below it (the sandbox's process group: the runner and anything it
    spawned), from /proc; None once ``pid`` is gone. Children are found through each thread's
    ``task/<tid>/children`` (CONFIG_PROC_CHILDREN), which costs a few reads instead of a scan of /proc."""
    total, seen, todo = 0, set(), [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return total

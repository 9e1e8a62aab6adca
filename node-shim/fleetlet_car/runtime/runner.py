"""The sandboxed child that runs one shard: `python -m fleetlet_car.runtime.runner …` (started by sandbox.py).

What it is for: load an ONNX model with ONNX Runtime on the given number of threads and the execution provider
the pod's accelerator asks for (TensorRT or CUDA for an accelerator pod, failing with AcceleratorUnavailable
where none is offered or the session did not get it: never silently on the CPU), read the shard (`npy`: one
array fed to the model's single input; `npz`: named arrays sharing axis 0 fed to the inputs of the same names),
run it in batches, checkpoint every N items or T seconds (atomically: items done + outputs so far), resume from a
checkpoint left in its work dir, and write the result (`result.npy` for one output, `result.npz` for several)
deterministically. It talks to its parent only through JSON lines on stdout:

    {"event": "sandbox", "network": "netns", ...}          first, what isolation is in force
    {"event": "session", "provider": "CPUExecutionProvider"} the provider the session really runs on
    {"event": "progress", "done": 512, "total": 4096}       at most every ~0.5 s
    {"event": "checkpoint", "done": 1024, "path": "..."}
    {"event": "result", "path": "...", "sha256": "...", "done": 4096, "loop_seconds": 1.2}
    {"event": "error", "reason": "ModelError", "message": "..."}   then a non-zero exit code (EXIT_*)

SIGTERM asks for a graceful stop: it finishes the current batch, writes a checkpoint and exits EXIT_STOPPED.

What it must never do: open a network connection (the parent puts it in an empty network namespace; when it is
not, it refuses to run unless told that a fallback is allowed, and then blocks sockets itself), load custom-op
libraries, unpickle anything, or read files other than the model and the shard it was given.

Determinism: see results.py. Same model + same input + same build/CPU/thread count gives identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import (
    CHECKPOINT_NAME,
    EXIT_ACCELERATOR,
    EXIT_DIGEST_MISMATCH,
    EXIT_INPUT_ERROR,
    EXIT_INTERNAL,
    EXIT_MODEL_ERROR,
    EXIT_OK,
    EXIT_OOM,
    EXIT_SANDBOX,
    EXIT_STOPPED,
    OOM_MARKERS,
)
from .providers import CPU, accelerator_missing_message, choose_provider, session_providers
from .results import sha256_file, write_arrays

_DONE_KEY = "__done__"
_FINGERPRINT_KEY = "__fingerprint__"
_OUT_PREFIX = "out:"

# ONNX tensor element types -> numpy, for the input dtypes a shard may need to be cast to.
_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class RunnerError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or any(m in text for m in OOM_MARKERS)


def _deny_sockets_hook(event: str, args: tuple[Any, ...]) -> None:
    # Audit hooks cannot be removed once added; every socket the interpreter creates goes through this event.
    if event == "socket.__new__" and len(args) > 1 and args[1] != socket.AF_UNIX:
        raise PermissionError("network access is disabled in the Fleetlet sandbox")


def check_network(parent_netns: str, allow_fallback: bool) -> str:
    """Confirm the isolation the parent set up; return the layer(s) in force. Raises RunnerError if none."""
    own = os.readlink("/proc/self/ns/net")
    if own != parent_netns:
        return "netns"
    if not allow_fallback:
        raise RunnerError(
            EXIT_SANDBOX,
            "SandboxUnavailable",
            "the runner shares the car's network namespace (unshare(CLONE_NEWNET) was refused); refusing to run. "
            "Give the agent CAP_SYS_ADMIN or enable allow_network_fallback",
        )
    layers = []
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except PermissionError:
        layers.append("seccomp")  # the parent's seccomp filter refused socket(AF_INET) in the kernel
    sys.addaudithook(_deny_sockets_hook)
    layers.append("audit-hook")
    return "+".join(layers)


def _verify_digest(path: Path, expected: str | None, what: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise RunnerError(
            EXIT_DIGEST_MISMATCH,
            "DigestMismatch",
            f"{what} {path.name} hashes to sha256:{actual}, expected sha256:{expected}; re-fetch it",
        )


def load_session(
    model_path: Path, threads: int, accelerator: int = 0, accelerator_type: str | None = None
) -> tuple[Any, str]:
    """The session and the execution provider it really runs on (its first, as ONNX Runtime reports)."""
    import onnxruntime as ort  # imported here so that importing this module stays cheap

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    available = tuple(ort.get_available_providers())
    chosen = choose_provider(available, accelerator)
    if chosen is None:
        raise RunnerError(
            EXIT_ACCELERATOR, "AcceleratorUnavailable",
            accelerator_missing_message(accelerator, accelerator_type, available),
        )  # fmt: skip
    try:
        model_bytes = model_path.read_bytes()
        session = ort.InferenceSession(model_bytes, so, providers=session_providers(chosen))
    except Exception as e:
        if _is_oom(e):
            raise RunnerError(EXIT_OOM, "OOMKilled", f"out of memory loading the model: {e}") from e
        if chosen != CPU:
            raise RunnerError(
                EXIT_ACCELERATOR, "AcceleratorUnavailable",
                f"{chosen} could not open the model ({str(e)[:400]}); it was not run on the CPU instead",
            ) from e  # fmt: skip
        raise RunnerError(
            EXIT_MODEL_ERROR, "ModelError", f"ONNX Runtime cannot load the model: {str(e)[:500]}"
        ) from e
    used = list(session.get_providers())
    # ONNX Runtime falls back to the CPU quietly when a provider fails to initialise (a missing CUDA library,
    # no device): what the session reports is what runs, and an accelerator pod must not run on the CPU.
    provider = used[0] if used else CPU
    if chosen != CPU and provider != chosen and provider not in session_providers(chosen)[:-1]:
        raise RunnerError(
            EXIT_ACCELERATOR, "AcceleratorUnavailable",
            f"ONNX Runtime offered {chosen} but the session runs on {', '.join(used) or 'nothing'} (the "
            f"accelerator failed to initialise); the pod requests {accelerator} accelerator(s) and was not "
            "run on the CPU instead",
        )  # fmt: skip
    return session, provider


def load_shard(path: Path, fmt: str, session: Any) -> dict[str, np.ndarray]:
    """The model's feeds for the whole shard, cast to the model's input types, items on axis 0."""
    inputs = session.get_inputs()
    try:
        if fmt == "npy":
            if len(inputs) != 1:
                names = [i.name for i in inputs]
                raise RunnerError(
                    EXIT_INPUT_ERROR,
                    "InputError",
                    f"npy input needs a single-input model; it takes {names}: use npz",
                )
            arrays = {inputs[0].name: np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                missing = [i.name for i in inputs if i.name not in z.files]
                if missing:
                    raise RunnerError(
                        EXIT_INPUT_ERROR, "InputError", f"npz input lacks arrays for model inputs {missing}"
                    )
                arrays = {i.name: z[i.name] for i in inputs}
    except RunnerError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise RunnerError(EXIT_INPUT_ERROR, "InputError", f"cannot read the {fmt} shard: {e}") from e
    lengths = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise RunnerError(
            EXIT_INPUT_ERROR, "InputError", f"input arrays must share axis 0 (items): {lengths}"
        )
    for i in inputs:
        want = _ORT_TYPES.get(i.type)
        a = arrays[i.name]
        if want is not None and a.dtype != want:
            if not np.can_cast(a.dtype, want, casting="same_kind"):
                raise RunnerError(
                    EXIT_INPUT_ERROR, "InputError", f"input {i.name!r} is {a.dtype}, the model needs {i.type}"
                )
            arrays[i.name] = a.astype(want)
        arrays[i.name] = np.ascontiguousarray(arrays[i.name])
    return arrays


def _fingerprint(model_path: Path, input_path: Path, args: argparse.Namespace) -> str:
    # Ties a checkpoint to its model and shard, so a stale checkpoint from another assignment is never resumed.
    parts = [
        args.model_sha256 or sha256_file(model_path),
        args.input_sha256 or sha256_file(input_path),
        args.format,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _load_checkpoint(path: Path, fingerprint: str, total: int) -> tuple[int, dict[str, np.ndarray]]:
    if not path.is_file():
        return 0, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z[_FINGERPRINT_KEY]) != fingerprint:
                sys.stderr.write("checkpoint belongs to another model or shard; starting over\n")
                return 0, {}
            done = int(z[_DONE_KEY])
            outs = {k[len(_OUT_PREFIX) :]: z[k] for k in z.files if k.startswith(_OUT_PREFIX)}
    except Exception as e:  # a torn or foreign file: recomputing is always safe
        sys.stderr.write(f"ignoring unreadable checkpoint ({e}); starting over\n")
        return 0, {}
    if not 0 <= done <= total or any(a.shape[0] != done for a in outs.values()):
        sys.stderr.write("checkpoint does not fit this shard; starting over\n")
        return 0, {}
    return done, outs


def _write_checkpoint(path: Path, fingerprint: str, done: int, outputs: dict[str, np.ndarray]) -> None:
    arrays: dict[str, np.ndarray] = {
        _FINGERPRINT_KEY: np.array(fingerprint),
        _DONE_KEY: np.array(done, dtype=np.int64),
    }
    for name, arr in outputs.items():
        arrays[_OUT_PREFIX + name] = arr
    write_arrays(path, arrays)


def _join(chunks: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate each output's chunks, keeping the joined array as the only chunk (later joins are cheaper)."""
    for name, parts in chunks.items():
        if len(parts) != 1:
            chunks[name] = [np.concatenate(parts, axis=0)]
    return {name: parts[0] for name, parts in chunks.items()}


def _check_outputs(names: list[str], results: list[np.ndarray], items: int) -> None:
    for name, r in zip(names, results, strict=True):
        if r.ndim == 0 or r.shape[0] != items:
            raise RunnerError(
                EXIT_MODEL_ERROR,
                "ModelError",
                f"output {name!r} has shape {r.shape}; outputs must keep the {items} items on axis 0",
            )


def run(args: argparse.Namespace) -> int:
    stop = {"requested": False}

    def on_term(signum: int, frame: Any) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)
    work = Path.cwd()
    model_path, input_path = Path(args.model), Path(args.input)
    layer = check_network(args.parent_netns, args.allow_network_fallback)
    emit("sandbox", network=layer, pid=os.getpid(), threads=args.threads)

    _verify_digest(model_path, args.model_sha256, "model")
    _verify_digest(input_path, args.input_sha256, "input")
    session, provider = load_session(model_path, args.threads, args.accelerator, args.accelerator_type)
    emit("session", provider=provider)
    feeds_all = load_shard(input_path, args.format, session)
    total = next(iter(feeds_all.values())).shape[0]
    if total == 0:
        raise RunnerError(EXIT_INPUT_ERROR, "InputError", "the shard has no items (axis 0 is empty)")
    out_names = [o.name for o in session.get_outputs()]

    ckpt_path = work / CHECKPOINT_NAME
    fingerprint = _fingerprint(model_path, input_path, args)
    done, resumed = _load_checkpoint(ckpt_path, fingerprint, total)
    if done:
        emit("resumed", done=done, total=total)
    # Per-batch results are kept as lists and joined only at checkpoints and at the end: writing each batch
    # into a preallocated array cost ~15 % of throughput on small models (page faults + a copy per batch).
    chunks: dict[str, list[np.ndarray]] = {
        name: [resumed[name]] if name in resumed else [] for name in out_names
    }
    checked = False
    batch = args.batch_size
    last_progress = last_ckpt = time.monotonic()
    ckpt_items = done
    loop_start, loop_cpu_start = time.perf_counter(), time.process_time()
    while done < total:
        end = min(done + batch, total)
        feeds = {name: a[done:end] for name, a in feeds_all.items()}
        try:
            results = session.run(None, feeds)
        except Exception as e:
            if _is_oom(e):
                raise RunnerError(EXIT_OOM, "OOMKilled", f"out of memory running the model: {e}") from e
            raise RunnerError(
                EXIT_MODEL_ERROR, "ModelError", f"model failed on items {done}..{end}: {e}"
            ) from e
        if not checked:
            _check_outputs(out_names, results, end - done)
            checked = True
        for name, r in zip(out_names, results, strict=True):
            chunks[name].append(r)
        done = end
        now = time.monotonic()
        if stop["requested"] or (
            done < total
            and (
                (args.checkpoint_items and done - ckpt_items >= args.checkpoint_items)
                or (args.checkpoint_seconds and now - last_ckpt >= args.checkpoint_seconds)
            )
        ):
            _write_checkpoint(ckpt_path, fingerprint, done, _join(chunks))
            emit("checkpoint", done=done, total=total, path=str(ckpt_path))
            last_ckpt, ckpt_items = now, done
            if stop["requested"]:
                emit("stopped", done=done, total=total)
                return EXIT_STOPPED
        if now - last_progress >= args.progress_interval and done < total:
            emit("progress", done=done, total=total)
            last_progress = now
    loop_seconds = time.perf_counter() - loop_start
    loop_cpu_seconds = time.process_time() - loop_cpu_start

    outputs = _join(chunks)
    result_path = work / ("result.npy" if len(out_names) == 1 else "result.npz")
    write_arrays(result_path, {name: outputs[name] for name in out_names})
    digest = sha256_file(result_path)
    emit("progress", done=done, total=total)
    emit(
        "result",
        path=str(result_path),
        sha256=digest,
        done=done,
        total=total,
        loop_seconds=loop_seconds,
        loop_cpu_seconds=loop_cpu_seconds,
    )
    ckpt_path.unlink(missing_ok=True)
    return EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fleetlet_car.runtime.runner", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--format", choices=["npy", "npz"], default="npy")
    p.add_argument("--model-sha256")
    p.add_argument("--input-sha256")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-items", type=int, default=0)
    p.add_argument("--checkpoint-seconds", type=float, default=30.0)
    p.add_argument("--progress-interval", type=float, default=0.5)
    p.add_argument("--parent-netns", required=True)
    p.add_argument("--allow-network-fallback", action="store_true")
    p.add_argument("--accelerator", type=int, default=0, help="accelerators requested: run on TensorRT/CUDA")
    p.add_argument("--accelerator-type", help="the accelerator type the pod asks for (named in errors)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except RunnerError as e:
        emit("error", reason=e.reason, message=str(e))
        return e.code
    except MemoryError as e:
        emit("error", reason="OOMKilled", message=f"out of memory: {e}; raise the shard's memory limit")
        return EXIT_OOM
    except Exception as e:
        if _is_oom(e):
            emit("error", reason="OOMKilled", message=f"out of memory: {e}")
            return EXIT_OOM
        emit("error", reason="Error", message=f"{type(e).__name__}: {e}")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

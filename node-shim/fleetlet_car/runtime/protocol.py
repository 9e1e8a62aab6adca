"""The contract between sandbox.py (parent) and runner.py (child): exit codes and file names.

Kept apart so that the parent never imports the runner module (runpy would warn, and the parent must stay
free of ONNX Runtime). It must never import anything heavy.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3  # graceful stop: a checkpoint was written
EXIT_MODEL_ERROR = 10
EXIT_INPUT_ERROR = 11
EXIT_DIGEST_MISMATCH = 12
EXIT_SANDBOX = 13
EXIT_OOM = 14
EXIT_ACCELERATOR = 15  # an accelerator was requested and no accelerator execution provider ran it

CHECKPOINT_NAME = "checkpoint.npz"
RUNNER_MODULE = "fleetlet_car.runtime.runner"

# Lower-case fragments of allocation-failure messages (Python, ONNX Runtime, glibc).
OOM_MARKERS = ("bad_alloc", "failed to allocate", "memoryerror", "out of memory", "cannot allocate")

"""What a shard may use on the car: the pod's resources turned into the sandbox's limits (pure arithmetic).

"The pod's requests become the sandbox's limits": ``memory`` is the RSS the runner's process group may hold
(enforced by the sandbox's watchdog), with RLIMIT_AS only a generous backstop above it; ``cpu`` becomes ONNX
Runtime's intra-op thread count, ``ceil(cpu)`` (at least 1), and the child's CPU affinity, that many CPUs.

Why threads follow the pod spec and never the car: replicas of one shard on different cars must give
byte-identical results, and ONNX Runtime's float reductions depend on the thread count. So the count is a
function of the pod spec alone; a car with fewer CPUs than that still runs that many threads (oversubscribed).

This module must never read the clock, the network or any file, and never import ONNX Runtime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fleetlet.api.v1alpha1.meta import QUANTITY_PATTERN

_QUANTITY = re.compile(QUANTITY_PATTERN)
_SUFFIX: dict[str, float] = {
    "": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}  # fmt: skip

# The runner's own virtual-memory overhead, measured (bench-style, by hand) on this build: a runner that has
# imported numpy and onnxruntime 1.32 and run a small model shows VmSize ≈ 207 MiB with 1 intra-op thread and
# ≈ 70 MiB more per extra thread (an 8 MiB stack plus a 64 MiB glibc malloc arena each), while its RSS stays
# ≈ 73 MiB (read from /proc/self/status VmSize/VmRSS after 10 runs, threads 1, 2, 4, 8). The backstop adds
# about twice that, so it never fires before the RSS watchdog on an honest workload.
AS_BASE_OVERHEAD_BYTES = 512 << 20
AS_PER_THREAD_BYTES = 128 << 20


def parse_quantity(value: str) -> float:
    """A Kubernetes quantity as a number: ``"500m"`` -> 0.5, ``"1Gi"`` -> 1073741824.0."""
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '500m', '2', '512Mi', '1Gi')")
    return float(m.group(1)) * _SUFFIX[m.group(3) or ""]


def memory_bytes(value: str) -> int:
    """The memory quantity in whole bytes (rounded up); refuses zero."""
    amount = math.ceil(parse_quantity(value))
    if amount <= 0:
        raise ValueError(f"memory {value!r} must be above zero")
    return amount


def cpu_threads(value: str) -> int:
    """Intra-op threads for a cpu quantity: ``ceil(cpu)``, at least 1 (``"500m"`` -> 1, ``"1500m"`` -> 2).

    A fractional cpu rounds up to a whole core: a process can be pinned to whole CPUs only. On a real car a
    cgroup (cpu.max) would enforce the fraction; here the pin bounds the shard to the rounded-up count.
    """
    cores = parse_quantity(value)
    if cores <= 0:
        raise ValueError(f"cpu {value!r} must be above zero")
    return max(1, math.ceil(cores - 1e-9))


def address_space_backstop(memory_limit: int, threads: int) -> int:
    """RLIMIT_AS for a sandbox whose RSS limit is ``memory_limit``: the limit plus the runtime's own overhead."""
    return memory_limit + AS_BASE_OVERHEAD_BYTES + AS_PER_THREAD_BYTES * max(1, threads)


@dataclass
class CpuAllocator:
    """Hands out CPUs to concurrent sandboxes, least-used first, so two shards do not share a core while
    another idles. Not thread-safe: the agent calls it on its event loop."""

    cpus: tuple[int, ...]
    _use: dict[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.cpus:
            raise ValueError("a CPU allocator needs at least one CPU")
        self._use = dict.fromkeys(sorted(self.cpus), 0)

    def take(self, n: int) -> tuple[int, ...]:
        """``n`` CPUs (all of them when ``n`` exceeds the car's count), the least used first."""
        use = self._use
        assert use is not None
        picked = sorted(use, key=lambda c: (use[c], c))[: max(1, min(n, len(use)))]
        for c in picked:
            use[c] += 1
        return tuple(sorted(picked))

    def give_back(self, cpus: Iterable[int]) -> None:
        use = self._use
        assert use is not None
        for c in cpus:
            if use.get(c, 0) > 0:
                use[c] -= 1

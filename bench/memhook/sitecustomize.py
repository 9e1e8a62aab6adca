"""Benchmark-only memory hook: ``bench_shim.py --memory-breakdown`` puts this directory on the PYTHONPATH of the
fleetlet-shim process it starts (and sets PYTHONTRACEMALLOC and FLEETLET_BENCH_MEMDUMP). Nothing else loads it:
without FLEETLET_BENCH_MEMDUMP it does nothing, and no component imports it.

On SIGUSR2 it writes ``<prefix>.<n>.json`` (RSS, glibc malloc statistics, tracemalloc totals) and, while
tracemalloc traces, ``<prefix>.<n>.snap`` (a tracemalloc snapshot), after a full garbage collection.
"""

from __future__ import annotations

import os

_PREFIX = os.environ.get("FLEETLET_BENCH_MEMDUMP")

if _PREFIX:
    import ctypes
    import gc
    import json
    import signal
    import sys
    import tracemalloc
    from typing import Any

    _FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
               "keepcost")

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]

    def _mallinfo() -> dict[str, int]:
        try:
            fn = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            return {}
        fn.restype = _MallInfo2
        info = fn()
        return {name: int(getattr(info, name)) for name in _FIELDS}

    def _rss_kib() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    _count = [0]

    def _dump(signum: int, frame: Any) -> None:
        gc.collect()
        n = _count[0]
        _count[0] += 1
        info: dict[str, Any] = {"rss_kib": _rss_kib(), "mallinfo2": _mallinfo(),
                                "allocated_blocks": sys.getallocatedblocks()}
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            info["traced_bytes"], info["traced_peak_bytes"] = current, peak
            info["tracemalloc_overhead_bytes"] = tracemalloc.get_tracemalloc_memory()
            tracemalloc.take_snapshot().dump(f"{_PREFIX}.{n}.snap")
        with open(f"{_PREFIX}.{n}.json", "w") as f:
            json.dump(info, f)

    signal.signal(signal.SIGUSR2, _dump)

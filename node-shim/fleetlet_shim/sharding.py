"""Which shim replica serves which car: rendezvous (highest-random-weight) hashing on the car's name.

Every replica computes the same answer with no coordination, each car has exactly one owner (no overlap, no
gaps), and changing the replica count moves only ~1/N of the cars. A car that dials the wrong replica is told
which one owns it.
"""

from __future__ import annotations

import hashlib


def _weight(car: str, replica: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}/{car}".encode(), digest_size=8).digest(), "big")


def owner(car: str, replicas: int) -> int:
    """The index (0..replicas-1) of the replica that serves ``car``."""
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    if replicas == 1:
        return 0
    return max(range(replicas), key=lambda r: _weight(car, r))


def owns(car: str, replica: int, replicas: int) -> bool:
    return owner(car, replicas) == replica

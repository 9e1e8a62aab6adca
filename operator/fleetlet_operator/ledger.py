"""A FleetJob's ledger: the durable record of its settled shards, in ConfigMaps of 1,024 shards each.

Why ConfigMaps: the record must survive an operator restart (a SIGKILL included), must not grow the FleetJob's
status with the number of shards (etcd objects are limited to about 1.5 MiB; 100,000 shard results would not fit)
and must go away with the job. One ConfigMap per 1,024 shards (``fleetlet-ledger-<job uid>-<chunk>``, owned by
the FleetJob, so the garbage collector removes it) holds a compact JSON map ``shard -> entry`` of about 150 bytes
per shard: ~150 KiB per ConfigMap. Entries are only ever written by this operator (one replica), each chunk
with the resourceVersion it was read at.

Writes are coalesced: a reconcile that settles 300 shards writes each touched chunk once. The ledger is always
written before the pods it records are deleted, so a crash between the two leaves pods that the next reconcile
recognises as already settled and simply deletes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .kube import OperatorApi
from .reconcile.model import LedgerEntry

CHUNK = 1024
DATA_KEY = "shards"


def chunk_of(shard: int) -> int:
    return shard // CHUNK


def configmap_name(job_uid: str, chunk: int) -> str:
    return f"fleetlet-ledger-{job_uid}-{chunk}"


@dataclass
class Ledger:
    """One job's ledger in memory (loaded once, then kept in step with every write)."""

    namespace: str
    job_name: str
    job_uid: str
    entries: dict[int, LedgerEntry] = field(default_factory=dict)
    versions: dict[int, str] = field(default_factory=dict)  # chunk -> resourceVersion as last read or written

    @classmethod
    async def load(cls, api: OperatorApi, namespace: str, job_name: str, job_uid: str) -> Ledger:
        ledger = cls(namespace, job_name, job_uid)
        for cm in await api.list_ledger(namespace, job_uid):
            name = cm["metadata"]["name"]
            chunk = int(name.rsplit("-", 1)[1])
            ledger.versions[chunk] = cm["metadata"]["resourceVersion"]
            for shard, body in json.loads((cm.get("data") or {}).get(DATA_KEY) or "{}").items():
                ledger.entries[int(shard)] = LedgerEntry.parse(body)
        return ledger

    def settled(self) -> int:
        return sum(1 for e in self.entries.values() if e.settled)

    async def write(self, api: OperatorApi, updates: Mapping[int, LedgerEntry], owner: dict[str, Any]) -> int:
        """Record ``updates``; one write per touched chunk. Returns the number of API writes made."""
        touched: dict[int, list[int]] = {}
        for shard, entry in updates.items():
            if self.entries.get(shard) != entry:
                touched.setdefault(chunk_of(shard), []).append(shard)
        writes = 0
        for chunk in sorted(touched):
            merged = {s: e for s, e in self.entries.items() if chunk_of(s) == chunk}
            merged.update({s: updates[s] for s in touched[chunk]})
            data = json.dumps({str(s): e.wire() for s, e in sorted(merged.items()) if e.wire()},
                              separators=(",", ":"))
            rv = await api.write_ledger(self.namespace, configmap_name(self.job_uid, chunk), self.job_uid,
                                        self.job_name, {DATA_KEY: data}, owner, self.versions.get(chunk))
            self.versions[chunk] = rv
            for s in touched[chunk]:
                self.entries[s] = updates[s]
            writes += 1
        return writes

    def entries_for(self, shards: Iterable[int]) -> dict[int, LedgerEntry]:
        return {s: self.entries[s] for s in shards if s in self.entries}

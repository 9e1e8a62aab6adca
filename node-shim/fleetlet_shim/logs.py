"""The last lines of each pod's log, as its car sent them: what ``kubectl logs`` shows.

Bounded per pod; a resend after a reconnect (same offsets) is not stored twice. Never holds a pod's lines after
the pod is forgotten.
"""

from __future__ import annotations

from collections import deque


class PodLogs:
    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self._lines: dict[str, deque[str]] = {}
        self._next: dict[str, int] = {}

    def add(self, uid: str, offset: int, lines: list[str]) -> None:
        buf = self._lines.setdefault(uid, deque(maxlen=self.max_lines))
        expected = self._next.get(uid, 0)
        skip = max(0, expected - offset)  # a resend after reconnect repeats lines we already hold
        for line in lines[skip:]:
            buf.append(line)
        self._next[uid] = max(expected, offset + len(lines))

    def get(self, uid: str) -> list[str]:
        return list(self._lines.get(uid, ()))

    def drop(self, uid: str) -> None:
        self._lines.pop(uid, None)
        self._next.pop(uid, None)

"""The car's own meter of the energy its work costs: per assignment and per local day of the owner.

What it is for: while any work runs the car draws ``computePowerW × load + idlePowerW`` (its hardware spec;
``load`` is the share of the computer the running shards use, at most 1) more than it would parked and asleep.
``EnergyMeter`` integrates that over wall time and splits it equally between the running assignments (their
``PodStatus.energy_kwh``) and by local day in the owner's time zone (``Telemetry.energy_today_kwh`` /
``energy_day``, which restart from zero at local midnight), so the owner's daily energy cap can be enforced on
the car itself and the owner paid for what the work cost.

It is pure arithmetic over an injected clock (POSIX seconds), so tests drive it across midnight without
waiting. A simulated car's battery physics is metered separately by the simulator; this is what the agent
itself reports.

What it must never do: block (the safety reflex's stop callback stops an assignment's metering from the
vehicle thread: the lock is held only for arithmetic), or count time twice when the clock steps backwards
(such steps are ignored).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

J_PER_KWH = 3.6e6


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


class EnergyMeter:
    """See the module docstring. ``start``/``stop`` may be called from any thread."""

    def __init__(
        self,
        compute_power_w: float,
        idle_power_w: float = 0.0,
        *,
        work_load: float = 1.0,
        timezone: str = "UTC",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if compute_power_w < 0 or idle_power_w < 0 or not 0 < work_load <= 1:
            raise ValueError("powers must be >= 0 and work_load within (0, 1]")
        self.compute_power_w = compute_power_w
        self.idle_power_w = idle_power_w
        self.work_load = work_load
        self._clock = clock
        self._lock = threading.Lock()
        self._zone = _zone(timezone)
        self._running: set[str] = set()
        self._per_assignment: dict[str, float] = {}
        self._t = clock()
        self._day = self._label(self._t)
        self._today_kwh = 0.0
        self._total_kwh = 0.0

    # ---- what changes it ----------------------------------------------------------------------------------

    def start(self, uid: str) -> None:
        """``uid``'s work draws power from now on."""
        with self._lock:
            self._advance(self._clock())
            self._running.add(uid)
            self._per_assignment.setdefault(uid, 0.0)

    def stop(self, uid: str) -> None:
        """``uid``'s work stopped drawing power (idempotent; cheap enough for the reflex's stop path)."""
        with self._lock:
            if uid in self._running:
                self._advance(self._clock())
                self._running.discard(uid)

    def forget(self, uid: str) -> None:
        """Drop ``uid``'s figure (its final status carried it)."""
        self.stop(uid)
        with self._lock:
            self._per_assignment.pop(uid, None)

    def set_timezone(self, timezone: str) -> None:
        """Count days in another zone from now on. Today's figure carries over: changing the zone must not
        hand the owner's cap a fresh day."""
        with self._lock:
            self._advance(self._clock())
            self._zone = _zone(timezone)
            self._day = self._label(self._t)

    # ---- what it reads ------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    def power_w(self) -> float:
        """The work's draw now, W (0 when nothing runs)."""
        n = len(self._running)
        if n == 0:
            return 0.0
        return self.compute_power_w * min(1.0, n * self.work_load) + self.idle_power_w

    def assignment_kwh(self, uid: str) -> float:
        with self._lock:
            self._advance(self._clock())
            return self._per_assignment.get(uid, 0.0)

    def today(self) -> tuple[float, str]:
        """(kWh of work energy since local midnight, that day as YYYY-MM-DD in the owner's zone)."""
        with self._lock:
            self._advance(self._clock())
            return self._today_kwh, self._day

    def total_kwh(self) -> float:
        with self._lock:
            self._advance(self._clock())
            return self._total_kwh

    def seconds_until_today_reaches(self, kwh: float) -> float | None:
        """How long until today's energy reaches ``kwh`` at the present draw; None if nothing draws power."""
        with self._lock:
            self._advance(self._clock())
            power = self.power_w()
            if power <= 0:
                return None
            return max(0.0, (kwh - self._today_kwh) * J_PER_KWH / power)

    # ---- persistence (an agent restart must not hand the owner's cap a fresh day) --------------------------

    def snapshot(self) -> dict[str, Any]:
        kwh, day = self.today()
        return {"day": day, "kwhToday": kwh}

    def restore(self, saved: dict[str, Any]) -> None:
        """Adopt a saved figure for today; one for another day is ignored."""
        with self._lock:
            self._advance(self._clock())
            if saved.get("day") == self._day:
                self._today_kwh = max(self._today_kwh, float(saved.get("kwhToday", 0.0)))

    # ---- arithmetic ---------------------------------------------------------------------------------------

    def _label(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self._zone).date().isoformat()

    def _next_midnight(self, ts: float) -> float:
        local = datetime.fromtimestamp(ts, self._zone)
        tomorrow = datetime.combine(local.date() + timedelta(days=1), clock_time(0), tzinfo=self._zone)
        return max(tomorrow.astimezone(UTC).timestamp(), ts + 1e-3)

    def _advance(self, now: float) -> None:
        """Integrate the draw from the last reading to ``now``, day by local day. Lock held."""
        start = self._t
        if now <= start:
            return  # a clock stepping back is ignored: time is never counted twice
        self._t = now
        power = self.power_w()
        n = len(self._running)
        while power > 0 and start < now:
            end = min(now, self._next_midnight(start))
            day = self._label(start)
            if day != self._day:
                self._day, self._today_kwh = day, 0.0
            kwh = power * (end - start) / J_PER_KWH
            self._today_kwh += kwh
            self._total_kwh += kwh
            for uid in self._running:
                self._per_assignment[uid] = self._per_assignment.get(uid, 0.0) + kwh / n
            start = end
        day = self._label(now)
        if day != self._day:
            self._day, self._today_kwh = day, 0.0

"""Seeded cellular link model for SIMULATED cars: link quality, outages, and cars that vanish for good.

Outages arrive as a Poisson process per car (``outage_rate_per_h``) and last a log-normally distributed time
(median ``outage_median_s``); a car vanishes for good (scrapped, sold, SIM cancelled) at ``vanish_rate_per_h``.
Both are drawn as "time of the next event" per car, so the cost of a step does not grow with the step count
and only cars with an event due draw new random numbers. Runs repeat for the same seed and the same sequence
of steps.

This module must never open a socket or sleep: the fleet runner decides what a lost link means (no telemetry,
no Lease renewal) by reading ``link_up``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .physics import S_PER_DAY, S_PER_H

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class ConnectivityConfig:
    outage_rate_per_h: float = 0.05  # one outage every ~20 h per car
    outage_median_s: float = 45.0
    outage_sigma: float = 1.0  # log-normal spread: most outages are short, a few last many minutes
    outage_max_s: float = 2.0 * S_PER_H
    vanish_rate_per_h: float = 0.0
    quality_alpha: float = 8.0  # per-car base quality ~ Beta(alpha, beta): mostly good, some garages poor
    quality_beta: float = 2.0
    driving_quality_factor: float = 0.85  # handovers while moving


class ConnectivityModel:
    """Link state for ``n`` cars on the fleet clock."""

    def __init__(self, n: int, rng: np.random.Generator, config: ConnectivityConfig | None = None) -> None:
        self.config = config or ConnectivityConfig()
        self._rng = rng
        c = self.config
        self.base_quality: FloatArray = np.clip(rng.beta(c.quality_alpha, c.quality_beta, n), 0.05, 1.0)
        self._phase = rng.uniform(0.0, 2.0 * math.pi, n)
        self.link_up: BoolArray = np.ones(n, dtype=bool)
        self.vanished: BoolArray = np.zeros(n, dtype=bool)
        self.outage_until_s: FloatArray = np.zeros(n)
        self.next_outage_s: FloatArray = self._exponential_s(c.outage_rate_per_h, n)
        self.vanish_at_s: FloatArray = self._exponential_s(c.vanish_rate_per_h, n)
        self.outages_total = 0

    def _exponential_s(self, rate_per_h: float, size: int) -> FloatArray:
        if rate_per_h <= 0.0:
            return np.full(size, np.inf)
        return self._rng.exponential(S_PER_H / rate_per_h, size)

    def step(self, now_s: float) -> None:
        """Bring link state up to ``now_s``: start due outages, end finished ones, vanish due cars."""
        c = self.config
        ended = ~self.link_up & (self.outage_until_s <= now_s)
        self.link_up[ended] = True
        due = np.flatnonzero(self.next_outage_s <= now_s)
        if due.size:
            duration = np.minimum(
                self._rng.lognormal(math.log(c.outage_median_s), c.outage_sigma, due.size), c.outage_max_s
            )
            start = self.next_outage_s[due]
            self.outage_until_s[due] = start + duration
            self.link_up[due] = self.outage_until_s[due] <= now_s
            self.next_outage_s[due] = start + duration + self._exponential_s(c.outage_rate_per_h, due.size)
            self.outages_total += int(due.size)
        gone = ~self.vanished & (self.vanish_at_s <= now_s)
        if gone.any():
            self.vanished |= gone
            logger.info("simulated cars vanished for good: %d", int(gone.sum()))
        self.link_up &= ~self.vanished

    def quality(self, now_s: float, driving: BoolArray) -> FloatArray:
        """Link quality 0..1: 0 while down, else the car's base quality with a slow daily wobble."""
        wobble = 0.9 + 0.1 * np.cos(2.0 * math.pi * now_s / S_PER_DAY + self._phase)
        q = self.base_quality * wobble * np.where(driving, self.config.driving_quality_factor, 1.0)
        return np.where(self.link_up, np.clip(q, 0.0, 1.0), 0.0)

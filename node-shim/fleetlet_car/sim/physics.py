"""Physics of the simulated car: battery energy bookkeeping, charging, and first-order thermal models.

Every function here is pure and works on numpy arrays (one element per simulated car) as well as on plain
floats, so the one-car simulator and the 100,000-car fleet share one code path and cannot drift apart.
Units are in the names: ``_w`` watts, ``_kwh`` kilowatt-hours, ``_c`` degrees Celsius, ``_s`` seconds,
``_h`` hours, ``_kmh`` km/h.

This module is for SIMULATED cars only. It must never be used to decide anything about a real car (the agent
on a real car reads its own sensors through ``fleetlet_car.vehicle``), must never hold state, and must never
do I/O.

The models, in short:

- Energy: energy (kWh) = power (W) x time (s) / 3.6e6. State of charge moves by energy / usable capacity.
- Charging: an AC home charger (7.4 or 11 kW) delivers its rated power up to ``TAPER_START_SOC`` and tapers
  linearly to ``TAPER_END_FRACTION`` of it at 100 %; ``CHARGE_EFFICIENCY`` of the AC power reaches the DC bus.
  While plugged in, the charger feeds the car's own loads first (so work done while charging draws on the grid,
  yet is metered as work energy all the same); at the owner's charge limit it holds the pack where it is.
- Driving: consumption per km grows with speed (about 0.15 kWh/km in town, 0.19 at 90 km/h) and in the cold.
- Thermal: temperatures relax exponentially toward a steady state (ambient plus load x thermal resistance)
  with a time constant of minutes for the computer and hours for the pack. The exact exponential update is
  used, so any step size is stable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Num = TypeVar("Num", float, FloatArray)

J_PER_KWH = 3.6e6
S_PER_H = 3600.0
S_PER_DAY = 86400.0

# Charging.
HOME_CHARGER_W = (7400.0, 11000.0)  # single-phase 32 A, three-phase 16 A
CHARGE_EFFICIENCY = 0.9  # AC at the wall -> DC into the pack
TAPER_START_SOC = 0.8
TAPER_END_FRACTION = 0.1  # share of rated power still delivered at 100 %
CHARGE_LOSS_TO_PACK = (
    0.4  # share of charging losses that heats the pack (the rest is in the on-board charger)
)

# Loads other than work (W).
STANDBY_POWER_W = 15.0  # a parked, asleep car
DRIVE_AUX_POWER_W = 400.0  # cabin, pumps, electronics while driving
PRECONDITION_POWER_W = 2500.0  # cabin and pack preconditioning before a trip ("Preparing")
TRACTION_LOSS_TO_PACK = 0.04  # I^2R share of traction power that heats the pack
DRIVING_COMPUTE_LOAD = 0.5  # the car's own driving software keeps its computer half busy while driving

# Thermal constants.
COMPUTE_TAU_S = 300.0
BATTERY_TAU_S = 3.0 * S_PER_H
COMPUTE_R_PARKED_K_PER_W = 0.16  # 250 W of work -> +40 K over the cabin air with the coolant pump on low
COMPUTE_R_DRIVING_K_PER_W = 0.08  # full cooling loop while driving
PACK_HEAT_CAPACITY_J_PER_K_PER_KWH = 6000.0  # ~450 kJ/K for a 75 kWh pack
SUN_GAIN_C = 15.0  # cabin heat soak above ambient at solar noon for a car fully in the sun


@dataclass(frozen=True, slots=True)
class Climate:
    """A daily ambient temperature curve: ``mean_c`` +/- ``amplitude_c``, warmest at ``peak_hour`` local."""

    mean_c: float = 15.0
    amplitude_c: float = 6.0
    peak_hour: float = 15.0


# Coarse regions the fleet factory draws from: (IANA zone, UTC offset in hours ignoring DST, climate).
REGIONS: dict[str, tuple[str, float, Climate]] = {
    "eu-west": ("Europe/Dublin", 0.0, Climate(13.0, 5.0, 15.0)),
    "eu-central": ("Europe/Berlin", 1.0, Climate(15.0, 7.0, 15.0)),
    "eu-south": ("Europe/Madrid", 1.0, Climate(22.0, 8.0, 16.0)),
    "us-east": ("America/New_York", -5.0, Climate(18.0, 7.0, 15.0)),
    "us-west": ("America/Los_Angeles", -8.0, Climate(20.0, 9.0, 15.0)),
    "ap-northeast": ("Asia/Tokyo", 9.0, Climate(19.0, 5.0, 14.0)),
}


def energy_kwh(power_w: Num, dt_s: float) -> Num:
    """Energy of ``power_w`` held for ``dt_s`` seconds."""
    return power_w * dt_s / J_PER_KWH


def ambient_c(mean_c: Num, amplitude_c: Num, peak_hour: Num, local_hour: Num) -> Num:
    """The daily ambient curve at ``local_hour`` (0..24)."""
    return mean_c + amplitude_c * np.cos(2.0 * math.pi * (local_hour - peak_hour) / 24.0)  # type: ignore[no-any-return]  # numpy ufuncs on a float return Any


def sun_gain_c(sun_exposure: Num, local_hour: Num) -> Num:
    """Cabin heat soak above ambient: zero at night, highest at 13:00 for a car fully in the sun."""
    return sun_exposure * SUN_GAIN_C * np.maximum(0.0, np.sin(math.pi * (local_hour - 7.0) / 12.0))  # type: ignore[no-any-return]  # numpy ufuncs on a float return Any


def charge_taper(state_of_charge: Num) -> Num:
    """Fraction of rated charger power accepted: 1 up to ``TAPER_START_SOC``, linear down to the end fraction."""
    over = np.clip((state_of_charge - TAPER_START_SOC) / (1.0 - TAPER_START_SOC), 0.0, 1.0)
    return 1.0 - (1.0 - TAPER_END_FRACTION) * over  # type: ignore[no-any-return]  # numpy ufuncs on a float return Any


def drive_consumption_kwh_per_km(speed_kmh: Num, ambient: Num, factor: Num) -> Num:
    """Traction energy per km: ~0.15 kWh/km in town, ~0.19 at 90 km/h, +1 % per degree under 15 °C."""
    base = 0.145 + 5.5e-6 * speed_kmh * speed_kmh
    cold = 1.0 + 0.01 * np.maximum(0.0, 15.0 - ambient)
    return base * cold * factor  # type: ignore[no-any-return]  # numpy ufuncs on a float return Any


def relax(temperature_c: Num, target_c: Num, dt_s: float, tau_s: float) -> Num:
    """Exact first-order step of ``temperature_c`` toward ``target_c`` over ``dt_s`` (stable for any step)."""
    return target_c + (temperature_c - target_c) * math.exp(-dt_s / tau_s)


def pack_conductance_w_per_k(battery_capacity_kwh: Num) -> Num:
    """Heat the pack loses per kelvin over ambient, from its heat capacity and ``BATTERY_TAU_S``."""
    return battery_capacity_kwh * PACK_HEAT_CAPACITY_J_PER_K_PER_KWH / BATTERY_TAU_S


@dataclass(frozen=True, slots=True)
class BatteryStep:
    """What one battery step did, per car (arrays) or for one car (floats)."""

    state_of_charge: FloatArray
    charger_ac_w: FloatArray  # drawn from the wall
    battery_w: FloatArray  # into the pack (+) or out of it (-), DC
    charging: npt.NDArray[np.bool_]


def battery_step(
    state_of_charge: FloatArray,
    capacity_kwh: FloatArray,
    load_w: FloatArray,
    plugged_in: npt.NDArray[np.bool_],
    charger_rated_w: FloatArray,
    charge_limit: FloatArray,
    efficiency: FloatArray,
    dt_s: float,
) -> BatteryStep:
    """Advance the pack by ``dt_s`` (> 0) with ``load_w`` drawn on the DC bus.

    Plugged in under the charge limit: the charger delivers its tapered power, loads are served from it and the
    rest goes into the pack. At or above the limit: the charger serves the loads (up to its rating) and the pack
    holds. Unplugged: the pack serves every load. The state of charge never leaves [0, 1], and charging never
    pushes it past the limit.
    """
    soc = np.asarray(state_of_charge, dtype=np.float64)
    below_limit = plugged_in & (soc < charge_limit) & (charger_rated_w > 0.0)
    at_limit = plugged_in & ~below_limit & (charger_rated_w > 0.0)
    charger_ac_w = np.where(
        below_limit,
        charger_rated_w * charge_taper(soc),
        np.where(at_limit, np.minimum(charger_rated_w, load_w / efficiency), 0.0),
    )
    battery_w = charger_ac_w * efficiency - load_w
    new_soc = soc + energy_kwh(battery_w, dt_s) / capacity_kwh
    # Charging stops at the limit; a car that was already above it (limit lowered) is not pulled down by it.
    new_soc = np.where(below_limit & (new_soc > charge_limit), np.maximum(charge_limit, soc), new_soc)
    clipped = np.clip(new_soc, 0.0, 1.0)
    # Keep the books honest when a bound cut the step short: the pack moved only as far as the clip allows.
    battery_w = np.where(clipped != new_soc, (clipped - soc) * capacity_kwh * J_PER_KWH / dt_s, battery_w)
    return BatteryStep(clipped, charger_ac_w, battery_w, below_limit)


def compute_target_c(air_c: Num, compute_heat_w: Num, driving: npt.NDArray[np.bool_] | bool) -> Num:
    """Steady-state computer temperature for ``compute_heat_w`` in cabin air at ``air_c``."""
    r = np.where(driving, COMPUTE_R_DRIVING_K_PER_W, COMPUTE_R_PARKED_K_PER_W)
    return air_c + r * compute_heat_w  # type: ignore[return-value]  # np.where on floats gives a 0-d array


def battery_target_c(ambient: Num, pack_heat_w: Num, capacity_kwh: Num) -> Num:
    """Steady-state pack temperature for ``pack_heat_w`` of internal heat."""
    return ambient + pack_heat_w / pack_conductance_w_per_k(capacity_kwh)

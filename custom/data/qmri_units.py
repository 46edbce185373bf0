"""Units of quantitative MRI (qMRI) maps: detection and conversion to the units the physics expects.

``custom.physics`` takes PD and MT as fractions in [0, 1] and R1, R2*, R2 as rates in 1/s. Real maps come in
other units: the hMRI toolbox writes PD and MT in percent (p.u.; white-matter PD = 69, MT about 1.5) and R1,
R2* in 1/s, older versions R2* in 1/ms; other pipelines write relaxation *times* (T1, T2 in s or ms).

:func:`to_si` converts a map given its kind and declared units, or detects the units (``units="auto"``) from
the robust value range (99th percentile of the nonzero finite magnitudes, :func:`nonzero_magnitude_p99`). A
range that fits no known unit is an error naming the file, the kind and the observed value, never a silent guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from os import PathLike

import numpy as np

__all__ = [
    "KINDS",
    "UNITS",
    "AUTO_RANGES",
    "canonical_kind",
    "canonical_units",
    "nonzero_magnitude_p99",
    "detect_units",
    "to_si",
]

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("PD", "MT", "R1", "R2s", "R2")
"""Map kinds: proton density, magnetisation-transfer saturation, and the R1, R2*, R2 relaxation rates."""

_FRACTION_KINDS = ("PD", "MT")
_RATE_KINDS = ("R1", "R2s", "R2")

UNITS: dict[str, tuple[str, ...]] = {
    "PD": ("fraction", "percent"),
    "MT": ("fraction", "percent"),
    "R1": ("1/s", "1/ms", "s", "ms"),
    "R2s": ("1/s", "1/ms", "s", "ms"),
    "R2": ("1/s", "1/ms", "s", "ms"),
}
"""Units accepted per kind. ``s`` / ``ms`` declare a relaxation *time* map (T1, T2*, T2), inverted to a rate."""

AUTO_RANGES: dict[str, Mapping[str, tuple[float, float]]] = {
    # fraction: brain PD up to ~1 (CSF), a little above with noise / imperfect normalisation.
    # percent: hMRI writes PD in p.u., CSF about 100, up to ~120 with noise.
    "PD": {"fraction": (0.05, 1.5), "percent": (5.0, 130.0)},
    # MT saturation: WM about 0.015 as a fraction, 1.5 p.u. in hMRI; the 99th percentile stays below ~0.1 / 15.
    "MT": {"fraction": (1.0e-4, 0.15), "percent": (0.15, 20.0)},
    # R1: CSF ~0.25 to WM ~1.1 1/s (0.1-5 covers noise and deep GM); the same in 1/ms is 1e-4 to 5e-3.
    "R1": {"1/s": (0.1, 5.0), "1/ms": (1.0e-4, 5.0e-3)},
    # R2*: 1-200 1/s (iron-rich nuclei and noise reach ~100); older hMRI wrote 1/ms: 0.001-0.2.
    "R2s": {"1/s": (1.0, 200.0), "1/ms": (1.0e-3, 0.2)},
    "R2": {"1/s": (1.0, 200.0), "1/ms": (1.0e-3, 0.2)},
}
"""Ranges of :func:`nonzero_magnitude_p99` (inclusive) that ``units="auto"`` accepts for each unit; they do not
overlap.

Time maps (``s``/``ms``) are never auto-detected: a T1 map in seconds has the same range as an R1 map in 1/s.
"""

_KIND_ALIASES = {
    "pd": "PD",
    "mt": "MT",
    "mtsat": "MT",
    "r1": "R1",
    "r2s": "R2s",
    "r2*": "R2s",
    "r2star": "R2s",
    "r2": "R2",
}

_UNIT_ALIASES = {
    "auto": "auto",
    "fraction": "fraction",
    "frac": "fraction",
    "percent": "percent",
    "%": "percent",
    "pu": "percent",
    "p.u.": "percent",
    "1/s": "1/s",
    "s-1": "1/s",
    "s^-1": "1/s",
    "hz": "1/s",
    "1/ms": "1/ms",
    "ms-1": "1/ms",
    "ms^-1": "1/ms",
    "s": "s",
    "sec": "s",
    "seconds": "s",
    "ms": "ms",
    "msec": "ms",
    "milliseconds": "ms",
}


def canonical_kind(kind: str) -> str:
    """Canonical map kind (``"PD"``, ``"MT"``, ``"R1"``, ``"R2s"`` or ``"R2"``) from a case-insensitive name."""
    key = str(kind).strip().lower()
    if key not in _KIND_ALIASES:
        raise ValueError(f"unknown qMRI map kind {kind!r}; expected one of {KINDS}")
    return _KIND_ALIASES[key]


def canonical_units(units: str, kind: str) -> str:
    """Canonical unit name for ``kind`` (or ``"auto"``); raises ValueError for a unit that does not fit the kind."""
    key = str(units).strip().lower().replace(" ", "")
    if key not in _UNIT_ALIASES:
        raise ValueError(f"unknown units {units!r} for {kind}; expected 'auto' or one of {UNITS[kind]}")
    unit = _UNIT_ALIASES[key]
    if unit != "auto" and unit not in UNITS[kind]:
        raise ValueError(f"units {units!r} do not apply to a {kind} map; expected one of {UNITS[kind]}")
    return unit


def nonzero_magnitude_p99(array: np.ndarray) -> float:
    """99th percentile of the nonzero finite magnitudes ``|array|`` (0.0 when there are none), in the map's units.

    Magnitudes are used, so a map with negative noise values is judged by the size of its values. (Not the
    torch :func:`custom.fields.region_percentile` (alias ``robust_max``), which scales images.)
    """
    values = np.abs(np.asarray(array)[np.isfinite(array)])
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    return float(np.percentile(values, 99.0))


def _where(path: str | PathLike[str] | None) -> str:
    return f"file {str(path)!r}" if path is not None else "an in-memory array (no path given)"


def detect_units(array: np.ndarray, kind: str, path: str | PathLike[str] | None = None) -> tuple[str, float]:
    """Units of a ``kind`` map judged from its value range; returns ``(units, nonzero_magnitude_p99)``.

    Raises:
        ValueError: the map has no nonzero finite value, or its range fits none of :data:`AUTO_RANGES`; the
            message names the file (``path``), the kind and the observed range.
    """
    kind = canonical_kind(kind)
    arr = np.asarray(array)
    top = nonzero_magnitude_p99(arr)
    if top == 0.0:
        raise ValueError(f"cannot detect the units of the {kind} map in {_where(path)}: it has no nonzero value")
    for unit, (low, high) in AUTO_RANGES[kind].items():
        if low <= top <= high:
            return unit, top
    finite = arr[np.isfinite(arr)]
    known = ", ".join(f"{u}: {lo:g}-{hi:g}" for u, (lo, hi) in AUTO_RANGES[kind].items())
    raise ValueError(
        f"the {kind} map in {_where(path)} has values in [{float(finite.min()):.4g}, {float(finite.max()):.4g}] "
        f"(99th percentile of nonzero values {top:.4g}), which fits no known unit ({known}); "
        f"declare the units explicitly if the map is valid"
    )


def _invert_time(arr: np.ndarray, seconds_per_unit: float) -> tuple[np.ndarray, int]:
    """Rate in 1/s from a time map (``seconds_per_unit`` s per stored unit); non-positive times give 0."""
    ok = arr > 0
    safe = np.where(ok, arr, 1.0)
    rate = np.where(ok, 1.0 / (safe * seconds_per_unit), 0.0).astype(arr.dtype, copy=False)
    return rate, int(arr.size - np.count_nonzero(ok))


def to_si(
    array: np.ndarray,
    kind: str,
    units: str = "auto",
    path: str | PathLike[str] | None = None,
) -> tuple[np.ndarray, str]:
    """Convert a qMRI map to the units of ``custom.physics``: PD, MT as fractions; R1, R2*, R2 in 1/s.

    Args:
        array: the map (any shape; integer arrays become float32, float arrays keep their precision).
        kind: ``"PD"``, ``"MT"``, ``"R1"``, ``"R2s"`` (also ``"R2*"``) or ``"R2"``, case-insensitive.
        units: ``"auto"`` (detect from the value range, see :data:`AUTO_RANGES`), ``"fraction"``, ``"percent"``
            (PD/MT), ``"1/s"``, ``"1/ms"`` (rates), or ``"s"``, ``"ms"`` for a relaxation-time map (T1, T2*, T2),
            which is inverted to a rate with non-positive times mapped to 0.
        path: the file the map came from, used in messages and errors.

    Returns:
        ``(converted, description)``: the converted array (a new array) and one sentence saying what was done,
        which is also logged at INFO level. Non-finite values are replaced by 0 and counted in the description.

    Raises:
        ValueError: unknown kind or units, units that do not fit the kind, or (``"auto"``) a value range that
            fits no known unit; the message names ``path``, the kind and the observed range.
    """
    kind = canonical_kind(kind)
    unit = canonical_units(units, kind)
    arr = np.array(array, copy=True)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        arr[bad] = 0.0
    how = "declared"
    if unit == "auto":
        unit, top = detect_units(arr, kind, path)
        how = f"detected from the 99th percentile of nonzero values, {top:.4g}"
    target = "fraction" if kind in _FRACTION_KINDS else "1/s"
    if unit == "percent":
        arr /= 100.0
        action = "divided by 100"
    elif unit == "1/ms":
        arr *= 1000.0
        action = "multiplied by 1000"
    elif unit in ("s", "ms"):
        arr, n_zero = _invert_time(arr, 1.0 if unit == "s" else 1.0e-3)
        action = f"inverted a relaxation-time map to a rate ({n_zero} non-positive times set to 0)"
    else:
        action = "left unchanged"
    description = f"{kind} map from {_where(path)}: units {unit} ({how}); {action} -> {target}"
    if n_bad:
        description += f"; {n_bad} non-finite values set to 0"
    log.debug(description)  # per map and subject: detail, not progress
    return arr, description

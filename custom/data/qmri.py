"""Loading and checking one subject's qMRI maps (PD, R1, R2*, MT, optional R2) from NIfTI files.

Every problem is reported as a :class:`QMRIError` that names the file and what is wrong with it: a missing or
unreadable file, a map that is not 3D, NaN/inf voxels, values that fit no known unit, negative PD, maps whose
shapes or affines differ. Unit conversions (e.g. PD in percent, R2* in 1/ms) are done by
:func:`custom.data.qmri_units.to_si` and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import Transform

from custom.data.qmri_units import to_si
from custom.errors import InputError

__all__ = ["MAP_KINDS", "QMRIError", "QMRIVolume", "load_map", "load_qmri_maps"]

logger = logging.getLogger(__name__)

MAP_KINDS: tuple[str, ...] = ("PD", "R1", "R2s", "MT", "R2")
REQUIRED_KINDS: tuple[str, ...] = ("PD", "R1", "R2s", "MT")
# Small negative values come from noise in fitted maps; below this (as a fraction of the map's robust maximum)
# they are treated as an error rather than clipped.
NEGATIVE_TOLERANCE = 0.05
AFFINE_TOLERANCE_MM = 1e-3


class QMRIError(InputError):
    """A qMRI input problem, with the offending file in the message."""


@dataclass
class QMRIVolume:
    """One subject's maps in SI units (PD, MT fractions; R1, R2*, R2 in 1/s) on a common voxel grid."""

    maps: dict[str, np.ndarray]
    affine: np.ndarray
    paths: dict[str, Path]
    conversions: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.maps.values())).shape


def load_map(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D NIfTI map as float32 (array, affine); a 4D map with one volume is squeezed."""
    path = Path(path)
    if not path.is_file():
        raise QMRIError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for corrupt or foreign files
        raise QMRIError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise QMRIError(f"{path}: expected a 3D map, got shape {data.shape}")
    if data.size == 0:
        raise QMRIError(f"{path}: empty image")
    return data, np.asarray(img.affine, dtype=np.float64)


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        raise QMRIError(
            f"{path}: {int(bad.sum())} NaN/inf voxels of {data.size}; mask or fill them (e.g. with 0) before use"
        )


def _check_non_negative(data: np.ndarray, kind: str, path: Path) -> tuple[np.ndarray, str | None]:
    """Clip small negative values (fit noise); large ones are an error."""
    low = float(data.min())
    if low >= 0:
        return data, None
    scale = float(np.percentile(np.abs(data[data != 0]), 99)) if np.any(data != 0) else 1.0
    if low < -NEGATIVE_TOLERANCE * max(scale, 1e-12):
        raise QMRIError(f"{path}: {kind} has negative values down to {low:.4g} (robust max {scale:.4g})")
    count = int((data < 0).sum())
    return np.clip(data, 0.0, None), f"{path.name}: clipped {count} small negative {kind} values (min {low:.3g})"


def load_qmri_maps(
    paths: Mapping[str, str | Path],
    units: str | Mapping[str, str] = "auto",
) -> QMRIVolume:
    """Load, check and convert one subject's qMRI maps.

    Args:
        paths: files by kind, keys among ``PD``, ``R1``, ``R2s``, ``MT`` (required) and ``R2`` (optional).
        units: ``"auto"`` (detect from value ranges) or a unit per kind, e.g.
            ``{"PD": "percent", "MT": "percent", "R1": "1/s", "R2s": "1/ms"}``; see
            :func:`custom.data.qmri_units.to_si`.

    Returns:
        a :class:`QMRIVolume` with float32 maps in fractions and 1/s, the common affine and the conversions done.
    """
    unknown = sorted(set(paths) - set(MAP_KINDS))
    if unknown:
        raise QMRIError(f"unknown qMRI map kinds {unknown}; expected among {MAP_KINDS}")
    missing = [k for k in REQUIRED_KINDS if k not in paths]
    if missing:
        where = ", ".join(str(p) for p in paths.values()) or "no files"
        raise QMRIError(f"subject is missing the {'/'.join(missing)} map(s) (given: {where})")

    maps: dict[str, np.ndarray] = {}
    resolved: dict[str, Path] = {}
    conversions: list[str] = []
    ref_kind, ref_shape, ref_affine = None, None, None
    for kind in MAP_KINDS:
        if kind not in paths:
            continue
        path = Path(paths[kind])
        data, affine = load_map(path)
        if ref_shape is None:
            ref_kind, ref_shape, ref_affine = kind, data.shape, affine
        elif data.shape != ref_shape:
            raise QMRIError(
                f"{path}: shape {data.shape} differs from the {ref_kind} map {resolved[ref_kind]} {ref_shape}"
            )
        elif not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
            raise QMRIError(
                f"{path}: affine differs from the {ref_kind} map {resolved[ref_kind]}; resample the maps to one grid"
            )
        _check_finite(data, path)
        unit = units if isinstance(units, str) else units.get(kind, "auto")
        try:
            data, note = to_si(data, kind, units=unit, path=path)
        except ValueError as err:
            raise QMRIError(str(err)) from err
        if note:
            conversions.append(note)
        data, clip_note = _check_non_negative(np.asarray(data, dtype=np.float32), kind, path)
        if clip_note:
            conversions.append(clip_note)
        if kind in ("PD", "MT") and float(np.percentile(data, 99.9)) > 1.5:
            raise QMRIError(f"{path}: {kind} above 1.5 as a fraction after unit conversion; check the units")
        maps[kind] = data
        resolved[kind] = path
    return QMRIVolume(maps=maps, affine=ref_affine, paths=resolved, conversions=conversions)


class LoadQMRId(Transform):
    """MONAI-style dictionary transform: load a subject's qMRI maps (and optional mask / MPRAGE) as tensors.

    Input item: file paths under ``pd``, ``r1``, ``r2s``, ``mt`` and optionally ``r2``, ``mask``, ``mprage``
    (as written by :func:`custom.data.qmri_datalist.qmri_datalist`). Output: the same keys holding
    ``MetaTensor`` s of shape (1, X, Y, Z), float32, maps in SI units (fractions, 1/s), with the affine in
    their metadata; problems raise :class:`QMRIError` naming the file.

    Args:
        units: ``"auto"`` or a unit per map kind (see :func:`load_qmri_maps`).
    """

    KEY_TO_KIND = {"pd": "PD", "r1": "R1", "r2s": "R2s", "mt": "MT", "r2": "R2"}

    def __init__(self, units: str | Mapping[str, str] = "auto") -> None:
        self.units = units

    def __call__(self, data: Mapping[str, object]) -> dict[str, object]:
        import torch
        from monai.data import MetaTensor

        out = dict(data)
        paths = {kind: data[key] for key, kind in self.KEY_TO_KIND.items() if data.get(key)}
        volume = load_qmri_maps(paths, units=self.units)  # type: ignore[arg-type]
        affine = torch.as_tensor(volume.affine, dtype=torch.float64)

        def meta_tensor(array: np.ndarray, path: Path) -> MetaTensor:
            return MetaTensor(
                torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
                affine=affine.clone(),
                meta={"filename_or_obj": str(path)},
            )

        for key, kind in self.KEY_TO_KIND.items():
            if kind in volume.maps:
                out[key] = meta_tensor(volume.maps[kind], volume.paths[kind])
        for key in ("mask", "mprage"):
            if not data.get(key):
                continue
            path = Path(str(data[key]))
            array, aff = load_map(path)
            if array.shape != volume.shape:
                raise QMRIError(f"{path}: shape {array.shape} differs from the qMRI maps' {volume.shape}")
            if not np.allclose(aff, volume.affine, atol=AFFINE_TOLERANCE_MM):
                raise QMRIError(f"{path}: affine differs from the qMRI maps'; resample it to their grid")
            _check_finite(array, path)
            if key == "mask":
                array = (array > 0.5).astype(np.float32)
            out[key] = meta_tensor(array, path)
        return out

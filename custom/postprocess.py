"""Post-processing of label maps: removal of small connected components.

MONAI's ``RemoveSmallObjects`` needs scikit-image, which this project does not depend on; ``scipy.ndimage``
(already a dependency) labels the components just as well, and working on the physical volume (mL) rather than
a voxel count keeps one threshold meaningful across voxel sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["min_component_voxels", "remove_small_components"]


def min_component_voxels(min_volume_ml: float, spacing_mm: Sequence[float]) -> int:
    """Smallest component size in voxels that reaches ``min_volume_ml`` millilitres at voxel ``spacing_mm``.

    Raises:
        ValueError: a negative volume or a non-positive spacing.
    """
    if min_volume_ml < 0 or not math.isfinite(min_volume_ml):
        raise ValueError(f"min_volume_ml must be a finite volume >= 0 (mL), got {min_volume_ml}")
    spacing = [float(s) for s in spacing_mm]
    if not spacing or any(s <= 0 or not math.isfinite(s) for s in spacing):
        raise ValueError(f"voxel spacing must be positive (mm), got {spacing_mm}")
    voxel_ml = math.prod(spacing) / 1000.0
    return int(math.ceil(min_volume_ml / voxel_ml - 1e-9))


def remove_small_components(
    labels: np.ndarray,
    min_voxels: int,
    classes: Iterable[int] | None = None,
    background: int = 0,
) -> tuple[np.ndarray, int]:
    """Set every connected component (26-connectivity in 3D) smaller than ``min_voxels`` to ``background``.

    Args:
        labels: integer label map ``(X, Y, Z)`` (any number of dimensions).
        min_voxels: components with fewer voxels are removed; ``<= 1`` leaves the map unchanged.
        classes: labels to clean (default: every label other than ``background``).
        background: value written in place of a removed component.

    Returns:
        The cleaned copy of ``labels`` and the number of components removed.
    """
    out = np.array(labels, copy=True)
    if min_voxels <= 1:
        return out, 0
    if classes is None:
        classes = [int(c) for c in np.unique(out) if int(c) != background]
    structure = ndimage.generate_binary_structure(out.ndim, out.ndim)  # full (26 in 3D) connectivity
    removed = 0
    for cls in classes:
        components, count = ndimage.label(out == cls, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.reshape(-1), minlength=count + 1)
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]  # 0 is "not this class"
        if small.size:
            out[np.isin(components, small)] = background
            removed += int(small.size)
    return out, removed

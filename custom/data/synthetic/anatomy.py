"""Random subject anatomy: the template's tissue probabilities under a random affine and smooth deformation.

Each subject gets a random small affine (rotations of a few degrees, scaling +-5 %, a few mm of translation) and a
random smooth displacement field (a few mm RMS), applied together to the template probability maps in one
resampling. Lengths in mm.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from custom.data.synthetic.fields import random_rotation, smooth_field
from custom.data.synthetic.template import Template
from custom.data.synthetic.tissues import TISSUES

__all__ = [
    "ROTATION_DEG",
    "SCALING",
    "TRANSLATION_MM",
    "DISPLACEMENT_RMS_MM",
    "sampling_coordinates",
    "warp_tissues",
    "tissue_labels",
    "tissue_fractions",
]

ROTATION_DEG = 4.0
"""Rotations about each axis are uniform in +-ROTATION_DEG degrees."""

SCALING = 0.05
"""Scaling along each axis is uniform in 1 +- SCALING."""

TRANSLATION_MM = 3.0
"""Translations along each axis are uniform in +-TRANSLATION_MM mm."""

DISPLACEMENT_RMS_MM = (1.5, 3.5)
"""RMS of the smooth random displacement field (per component), uniform in this range, mm."""


def sampling_coordinates(template: Template, rng: np.random.Generator) -> np.ndarray:
    """Source-voxel coordinates ``(3, *shape)`` sampled by each output voxel under a random subject warp.

    World position p (mm) of an output voxel reads the template at ``c + M (p - c) + t + u(p)``: ``M`` a rotation
    (+-ROTATION_DEG) times a scaling (1 +- SCALING), ``c`` the brain centre, ``t`` a translation
    (+-TRANSLATION_MM) and ``u`` a smooth displacement field with an RMS in DISPLACEMENT_RMS_MM.
    """
    matrix = random_rotation(rng, ROTATION_DEG) @ np.diag(rng.uniform(1 - SCALING, 1 + SCALING, size=3))
    shift = rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, size=3)
    rms = rng.uniform(*DISPLACEMENT_RMS_MM)
    shape = template.shape
    axes = [
        (template.affine[d, 3] + template.resolution * np.arange(shape[d]) - template.center[d]).astype(np.float32)
        for d in range(3)
    ]
    grids = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    src_res = float(abs(template.source_affine[0, 0]))
    src_origin = template.source_affine[:3, 3]
    coords = np.empty((3, *shape), dtype=np.float32)
    for r in range(3):
        coords[r] = matrix[r, 0] * grids[0] + matrix[r, 1] * grids[1] + matrix[r, 2] * grids[2]
        coords[r] += smooth_field(shape, rng, n_basis=5, rms=rms)
        coords[r] += template.center[r] + shift[r] - src_origin[r]
        coords[r] /= src_res
    return coords


def warp_tissues(template: Template, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random subject anatomy: background / GM / WM / CSF partial-volume probabilities summing to 1 (float32).

    The brain mask is resampled everywhere, GM and WM only where the mask is nonzero (linear interpolation).
    """
    coords = sampling_coordinates(template, rng)
    mask = ndimage.map_coordinates(template.mask, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    np.clip(mask, 0.0, 1.0, out=mask)
    inside = mask > 1e-4
    sub = coords[:, inside]
    gm = np.zeros_like(mask)
    wm = np.zeros_like(mask)
    gm[inside] = ndimage.map_coordinates(template.gm, sub, order=1, mode="constant", cval=0.0, output=np.float32)
    wm[inside] = ndimage.map_coordinates(template.wm, sub, order=1, mode="constant", cval=0.0, output=np.float32)
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return {"bg": 1.0 - mask, "GM": gm, "WM": wm, "CSF": csf}


def tissue_labels(probs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Argmax labels (uint8): 0 background, 1 GM, 2 WM, 3 CSF."""
    stack = np.stack([probs["bg"], probs["GM"], probs["WM"], probs["CSF"]])
    return np.argmax(stack, axis=0).astype(np.uint8)


def tissue_fractions(probs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Partial-volume fraction of the brain (GM + WM + CSF) taken by each tissue."""
    brain = float(sum(probs[t].sum(dtype=np.float64) for t in TISSUES))
    return {t: float(probs[t].sum(dtype=np.float64)) / brain for t in TISSUES}

"""Stroke-like lesions: 1-3 smooth irregular blobs in the grey/white matter of mostly one hemisphere."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from custom.data.synthetic.fields import smooth_noise
from custom.data.synthetic.template import Template

__all__ = ["make_lesion"]


def _world_axes(template: Template) -> list[np.ndarray]:
    return [template.affine[d, 3] + template.resolution * np.arange(template.shape[d]) for d in range(3)]


def _lesion_centre(
    parenchyma: np.ndarray, template: Template, rng: np.random.Generator, side: float, near: np.ndarray | None
) -> np.ndarray | None:
    """A voxel index in GM/WM of the hemisphere ``side`` (+1 right, -1 left), supratentorial, >= 12 mm off the
    midline, within 35 mm of ``near`` (a voxel index) when given; None when there is no candidate."""
    x, y, z = _world_axes(template)
    ok = parenchyma > 0.8
    ok &= (side * x > 12.0)[:, None, None]
    ok &= ((z > -8.0) & (z < 55.0))[None, None, :]
    ok &= ((y > -90.0) & (y < 50.0))[None, :, None]
    if near is not None:
        cx, cy, cz = ((np.arange(n) - near[d]) * template.resolution for d, n in enumerate(template.shape))
        close = cx[:, None, None] ** 2 + cy[None, :, None] ** 2 + cz[None, None, :] ** 2 < 35.0**2
        if np.any(ok & close):
            ok &= close
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return None
    return np.array(np.unravel_index(rng.choice(candidates), template.shape))


def _blob(shape_box: tuple[int, ...], offset: np.ndarray, rng: np.random.Generator, resolution: float) -> np.ndarray:
    """Soft irregular blob in a box: a randomly rotated ellipsoid (semi-axes 5-10 mm) with a noisy border.

    ``offset`` is the blob centre's position (voxels) inside the box. Values fall from 1 to 0 across about one
    voxel at the border (partial volume).
    """
    radii = rng.uniform(5.0, 10.0, size=3)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    axes = [(np.arange(n) - offset[d]) * resolution for d, n in enumerate(shape_box)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    q = np.sum((grid @ rot / radii) ** 2, axis=-1)
    mean_r = float(np.mean(radii))
    noise = smooth_noise(shape_box, rng, sigma_vox=3.0 / resolution)
    signed = (1.0 - np.sqrt(q)) * mean_r + 0.25 * mean_r * noise
    return np.clip(0.5 + signed / resolution, 0.0, 1.0).astype(np.float32)


def make_lesion(probs: Mapping[str, np.ndarray], template: Template, rng: np.random.Generator) -> np.ndarray:
    """Stroke-like lesion: 1-3 soft blobs, mostly in one hemisphere, confined to GM/WM (float32 fraction map).

    The returned map is the fraction of each voxel taken by lesion tissue (<= GM + WM there).
    """
    parenchyma = probs["GM"] + probs["WM"]
    lesion = np.zeros(template.shape, dtype=np.float32)
    side = 1.0 if rng.random() < 0.5 else -1.0
    first: np.ndarray | None = None
    for b in range(int(rng.integers(1, 4))):
        blob_side = side if (b == 0 or rng.random() < 0.85) else -side
        centre = _lesion_centre(parenchyma, template, rng, blob_side, first if blob_side == side else None)
        if centre is None:
            continue
        first = centre if first is None else first
        half = int(math.ceil(15.0 / template.resolution)) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, template.shape)
        box = tuple(slice(a, b_) for a, b_ in zip(lo, hi, strict=True))
        blob = _blob(tuple(hi - lo), centre - lo, rng, template.resolution)
        np.maximum(lesion[box], blob, out=lesion[box])
    return lesion * parenchyma

"""Random smooth fields and rotations shared by the anatomy, lesion, texture and bias-field draws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["smooth_field", "smooth_noise", "random_rotation"]


def smooth_field(shape: Sequence[int], rng: np.random.Generator, n_basis: int, rms: float) -> np.ndarray:
    """Random smooth zero-mean field on a grid: a sum of separable cosines (DCT-II basis, frequencies < n_basis).

    Coefficients are normal with weights 1 / (1 + i + j + k) so low frequencies dominate; the field is then
    scaled to the given RMS over the grid. The shortest half-wavelength is the field of view / (n_basis - 1).
    """
    bases = []
    for n in shape:
        pos = (np.arange(n, dtype=np.float64) + 0.5) / n
        bases.append(np.cos(np.pi * pos[:, None] * np.arange(n_basis)[None, :]))
    i, j, k = np.meshgrid(*(np.arange(n_basis),) * 3, indexing="ij")
    coef = rng.standard_normal((n_basis,) * 3) / (1.0 + i + j + k)
    coef[0, 0, 0] = 0.0
    field = np.einsum("ijk,xi,yj,zk->xyz", coef, *bases, optimize=True)
    field -= field.mean()
    std = field.std()
    return (field * (rms / std if std > 0 else 0.0)).astype(np.float32)


def smooth_noise(shape: Sequence[int], rng: np.random.Generator, sigma_vox: float) -> np.ndarray:
    """Gaussian-filtered white noise normalised to unit standard deviation (float32)."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    if sigma_vox > 0:
        noise = ndimage.gaussian_filter(noise, sigma_vox, truncate=3.0)
    std = float(noise.std())
    return noise / std if std > 0 else noise


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation matrix from uniform angles in +-max_deg degrees about x, y and z (applied in that order)."""
    ax, ay, az = np.radians(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx

"""The MNI152 2009a template (from ``nilearn``, read from disk) and the output grid of the synthetic data."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Template", "output_grid", "load_template"]


@dataclass(frozen=True)
class Template:
    """Source anatomy and the output grid.

    Attributes:
        gm, wm, mask: template GM / WM probabilities and brain mask (float32, on the source grid).
        source_affine: voxel -> RAS+ world (mm) of the source arrays.
        affine: voxel -> world (mm) of the output grid (isotropic ``resolution``).
        shape: output grid shape.
        resolution: output voxel size, mm.
        center: world position (mm) of the brain's centre of mass, the centre of the random affine.
    """

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    source_affine: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]
    resolution: float
    center: np.ndarray

    @property
    def voxel_ml(self) -> float:
        """Volume of one output voxel, mL."""
        return self.resolution**3 / 1000.0


def output_grid(source_affine: np.ndarray, source_shape: Sequence[int], resolution: float) -> tuple:
    """Output grid covering the source field of view with isotropic ``resolution`` mm voxels.

    The first voxel's outer corner coincides with the source's, so the source grid itself is returned when the
    voxel sizes match. Returns ``(affine, shape)``.
    """
    src_res = float(abs(source_affine[0, 0]))
    shape = tuple(max(1, int(math.floor(n * src_res / resolution + 1e-6))) for n in source_shape)
    affine = np.array(source_affine, dtype=np.float64)
    corner = affine[:3, 3] - src_res / 2.0
    affine[:3, :3] = np.diag([resolution] * 3)
    affine[:3, 3] = corner + resolution / 2.0
    return affine, shape


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=4)
def load_template(resolution: float = 2.0) -> Template:
    """MNI152 2009a GM, WM and brain mask from ``nilearn`` (on disk) and the output grid for ``resolution`` mm.

    ``resolution`` 1 or 2 uses nilearn's matching template directly; any other value resamples the 2 mm one
    (smoothed first when coarser, to avoid aliasing). Arrays are cached and read-only.
    """
    from nilearn import datasets

    resolution = float(resolution)
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive voxel size in mm, got {resolution}")
    src = 1 if resolution == 1.0 else 2
    mask_img = datasets.load_mni152_brain_mask(resolution=src)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=src).get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=src).get_fdata(dtype=np.float32))
    mask = (np.asarray(mask_img.get_fdata(dtype=np.float32)) > 0.5).astype(np.float32)
    gm, wm = np.clip(gm, 0.0, 1.0), np.clip(wm, 0.0, 1.0)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    source_affine = np.asarray(mask_img.affine, dtype=np.float64)
    affine, shape = output_grid(source_affine, mask.shape, resolution)
    factor = resolution / float(abs(source_affine[0, 0]))
    if factor > 1.0:
        sigma = 0.42 * math.sqrt(factor**2 - 1.0)  # FWHM of the smoothing ~ the new voxel size
        gm, wm, mask = (ndimage.gaussian_filter(a, sigma) for a in (gm, wm, mask))
    com = np.array(ndimage.center_of_mass(mask > 0.5))
    center = (source_affine @ np.append(com, 1.0))[:3]
    return Template(
        gm=_readonly(gm),
        wm=_readonly(wm),
        mask=_readonly(mask),
        source_affine=_readonly(source_affine),
        affine=_readonly(affine),
        shape=shape,
        resolution=resolution,
        center=_readonly(center),
    )

"""Embedded synthetic dataset: qMRI maps, IXI-like and ARC-like images, built from the MNI152 2009a template.

The anatomy comes from the MNI152 2009a template shipped inside ``nilearn`` (read from disk, no network): the
grey- and white-matter probability maps and the brain mask; CSF is the brain mask minus GM and WM (partial
volume), everything outside the mask is background. Each subject gets

* a random small affine (rotations of a few degrees, scaling +-5 %, a few mm of translation) and a random smooth
  displacement field (a few mm RMS), applied together to the template probability maps in one resampling;
* per-tissue qMRI values drawn around the 3 T literature values of ``paper/NOTES.md`` (between-subject variation
  of about 5-10 %), partial-volume mixing (voxel value = sum over tissues of probability x tissue value) and a
  mild spatially correlated texture (3 % RMS);
* for stroke subjects, 1-3 smooth irregular lesion blobs in the grey/white matter of mostly one hemisphere with
  their own qMRI values, blended with the surrounding tissue at the border.

Three layouts, mimicking the real datasets so their datalist builders can be exercised (see
:func:`generate_dataset`): hMRI-style qMRI maps (PD and MT in percent, rates in 1/s), IXI-like T1/T2/PD images
from three sites with fixed per-site protocols (:data:`SITE_PROTOCOLS`), and an ARC-like BIDS dataset with
T1w/T2w/FLAIR images and lesion masks (:data:`ARC_PROTOCOL`). Each dataset draws its own anatomies (no subject is
shared between the pretraining and the downstream sets, as with the real data). Subject ``k`` of a dataset is
generated from a random generator seeded with ``(seed, dataset, k)`` alone, so it is the same whatever the
number of subjects asked for.

Units: lengths in mm, times in seconds, rates in 1/s, PD and MT as fractions in memory (percent on disk in the
qMRI layout, as the hMRI toolbox writes them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from custom import physics
from custom.sequences import SequenceSample, sample_sequence, simulate

__all__ = [
    "TISSUES",
    "QMRI_KINDS",
    "TISSUE_QMRI",
    "LESION_QMRI",
    "PLAUSIBLE_FRACTIONS",
    "SiteProtocol",
    "SITE_PROTOCOLS",
    "ARC_PROTOCOL",
    "IXI_SITES",
    "Template",
    "Subject",
    "load_template",
    "make_subject",
    "subject_rng",
    "acquire",
    "save_nifti",
    "generate_dataset",
]

log = logging.getLogger(__name__)

TISSUES: tuple[str, ...] = ("GM", "WM", "CSF")
"""Tissue classes; label values are 0 background, 1 GM, 2 WM, 3 CSF."""

QMRI_KINDS: tuple[str, ...] = ("PD", "R1", "R2s", "R2", "MT")
"""qMRI maps of every subject: PD (fraction), R1, R2*, R2 (1/s), MT saturation (fraction)."""

TISSUE_QMRI: dict[str, dict[str, tuple[float, float]]] = {
    # 3 T literature ranges of paper/NOTES.md (Weiskopf et al. 2013; hMRI toolbox; Callaghan et al. 2015).
    # Each subject draws a value uniformly in (low, high), then multiplies it by exp(0.04 N(0, 1)).
    "GM": {"PD": (0.77, 0.82), "R1": (0.60, 0.68), "R2s": (15.0, 20.0), "R2": (12.0, 12.0), "MT": (0.0075, 0.009)},
    "WM": {"PD": (0.69, 0.71), "R1": (0.95, 1.10), "R2s": (20.0, 23.0), "R2": (13.0, 13.0), "MT": (0.014, 0.018)},
    "CSF": {"PD": (0.95, 1.00), "R1": (0.24, 0.30), "R2s": (2.0, 10.0), "R2": (0.6, 0.6), "MT": (0.0, 0.002)},
}
"""Per-tissue qMRI value ranges: PD and MT as fractions, R1, R2*, R2 in 1/s."""

LESION_QMRI: dict[str, tuple[float, float]] = {
    # Chronic stroke lesion of NOTES.md (PD 0.85-1.00, R1 0.30-0.50, R2* 5-15, R2 3-6, MT 0.001-0.005), narrowed
    # to the part that models gliotic, FLAIR-hyperintense tissue: R1 0.44-0.50 1/s, R2 3-4.5 1/s, PD 0.88-0.97.
    # Nearer R1 = 0.30 1/s a lesion has the T1 of CSF and a CSF-nulling FLAIR nulls it too (a cavity); there the
    # lesion would be darker than white matter on FLAIR, which the ARC-like data should not show.
    "PD": (0.88, 0.97),
    "R1": (0.44, 0.50),
    "R2s": (5.0, 15.0),
    "R2": (3.0, 4.5),
    "MT": (0.001, 0.005),
}
"""qMRI value ranges of inserted stroke lesions (fractions and 1/s)."""

BETWEEN_SUBJECT_LOG_SD = 0.04
"""Standard deviation of the log-normal factor applied on top of the uniform draw in a tissue's range."""

TEXTURE_RMS = 0.03
"""Relative RMS amplitude of the multiplicative texture of each qMRI map."""

TEXTURE_SIGMA_MM = 2.0
"""Gaussian correlation length (sigma) of the texture, mm."""

ROTATION_DEG = 4.0
"""Rotations about each axis are uniform in +-ROTATION_DEG degrees."""

SCALING = 0.05
"""Scaling along each axis is uniform in 1 +- SCALING."""

TRANSLATION_MM = 3.0
"""Translations along each axis are uniform in +-TRANSLATION_MM mm."""

DISPLACEMENT_RMS_MM = (1.5, 3.5)
"""RMS of the smooth random displacement field (per component), uniform in this range, mm."""

PLAUSIBLE_FRACTIONS: dict[str, tuple[float, float]] = {"GM": (0.40, 0.60), "WM": (0.28, 0.42), "CSF": (0.08, 0.25)}
"""Accepted partial-volume tissue fractions of the brain (the MNI152 2009a template itself has about GM 0.53,
WM 0.36, CSF 0.11: its averaged GM map absorbs much of the sulcal CSF). A subject outside is logged as a warning."""

IXI_SITES: tuple[str, ...] = ("Guys", "HH", "IOP")
"""IXI sites in the order subjects cycle through them (subject k -> site k mod 3)."""

_DATASET_STREAMS = {"qmri": 0, "ixi": 1, "arc": 2}


def _deg(x: float) -> float:
    return math.radians(x)


def _mprage(
    name: str, tr: float, ti: float, tx: float, te: float, flip_deg: float, n: int, efficiency: float = 0.95
) -> SequenceSample:
    """A fixed MPRAGE protocol, simulated with its inversion pulse (``efficiency``: Mz -> -efficiency Mz)."""
    td = physics.mprage_delay_time(tr, ti, tx, n)
    params = {"tr": tr, "ti": ti, "tx": tx, "te": te, "flip": _deg(flip_deg), "n": float(n), "td": td}
    params["efficiency"] = efficiency
    return SequenceSample("mprage", params, preset=name)


@dataclass(frozen=True)
class SiteProtocol:
    """A fixed acquisition setup: one protocol per contrast plus the scanner's noise, bias field and scale.

    Attributes:
        scanner: free-text description.
        sequences: contrast name (file suffix) -> fixed :class:`SequenceSample` (seconds, radians).
        noise_fraction: Rician sigma as a fraction of the 99th percentile of the noise-free brain signal.
        bias_rms: RMS of the log of the smooth multiplicative receive (bias) field over the field of view.
        scale: intensity of the brain's 99th percentile in the written image (arbitrary scanner units).
    """

    scanner: str
    sequences: Mapping[str, SequenceSample]
    noise_fraction: float
    bias_rms: float
    scale: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable description (for metadata and the summary)."""
        return {
            "scanner": self.scanner,
            "sequences": {k: v.to_dict() for k, v in self.sequences.items()},
            "noise_fraction": self.noise_fraction,
            "bias_rms": self.bias_rms,
            "scale": self.scale,
        }


SITE_PROTOCOLS: dict[str, SiteProtocol] = {
    # Real IXI: Guys Philips 1.5 T, HH Philips 3 T, IOP GE 1.5 T; T1 3D gradient echo, T2 and PD from a
    # dual-echo FSE. Tissue values here are the 3 T ones for every site; the sites differ in protocol, noise,
    # bias field and intensity scale. T1w: WM > GM > CSF; T2w: CSF > GM > WM; PDw: CSF >= GM > WM, low contrast.
    # The MPRAGE protocols (IOP T1, ARC T1w) are played with the inversion pulse (efficiency 0.95,
    # custom.physics.mprage_inversion): WM/GM about 1.55 and CSF/GM about 0.37 at the tissue means (eq. 4 gave
    # 1.17-1.19 and 0.7); the GRE protocols reach about 1.27-1.31 WM/GM.
    "Guys": SiteProtocol(
        scanner="Philips-like 1.5 T: T1 spoiled 3D GRE, T2/PD dual-echo FSE",
        sequences={
            "T1": SequenceSample("gre", {"tr": 0.015, "te": 0.0046, "flip": _deg(30.0)}, preset="ixi-Guys"),
            "T2": SequenceSample("fse", {"tr": 5.725, "te": 0.100}, preset="ixi-Guys"),
            "PD": SequenceSample("fse", {"tr": 5.725, "te": 0.008}, preset="ixi-Guys"),
        },
        noise_fraction=0.02,
        bias_rms=0.10,
        scale=1000.0,
    ),
    "HH": SiteProtocol(
        scanner="Philips-like 3 T: T1 spoiled 3D GRE, T2/PD dual-echo FSE",
        sequences={
            "T1": SequenceSample("gre", {"tr": 0.010, "te": 0.003, "flip": _deg(35.0)}, preset="ixi-HH"),
            "T2": SequenceSample("fse", {"tr": 5.0, "te": 0.090}, preset="ixi-HH"),
            "PD": SequenceSample("fse", {"tr": 5.0, "te": 0.010}, preset="ixi-HH"),
        },
        noise_fraction=0.015,
        bias_rms=0.20,
        scale=700.0,
    ),
    "IOP": SiteProtocol(
        scanner="GE-like 1.5 T: T1 inversion-prepared fast GRE (MPRAGE-like), T2/PD dual-echo FSE",
        sequences={
            "T1": _mprage("ixi-IOP", tr=2.0, ti=1.0, tx=0.007, te=0.003, flip_deg=7.0, n=128),
            "T2": SequenceSample("fse", {"tr": 6.0, "te": 0.105}, preset="ixi-IOP"),
            "PD": SequenceSample("fse", {"tr": 6.0, "te": 0.012}, preset="ixi-IOP"),
        },
        noise_fraction=0.03,
        bias_rms=0.15,
        scale=1500.0,
    ),
}
"""Fixed IXI-like acquisition per site (contrast keys are the IXI folder / file suffixes T1, T2, PD)."""

ARC_PROTOCOL = SiteProtocol(
    scanner="Siemens-like 3 T: T1w MPRAGE, T2w FSE, CSF-nulled T2w FLAIR",
    sequences={
        "T1w": _mprage("arc", tr=2.25, ti=1.1, tx=0.007, te=0.003, flip_deg=7.0, n=128),
        "T2w": SequenceSample("fse", {"tr": 4.0, "te": 0.100}, preset="arc"),
        # TI = T1_csf ln(2 / (1 + exp(-TR / T1_csf))) ~ 2.25 s nulls CSF (T1 ~ 3.7 s); long TE for T2 weighting.
        "FLAIR": SequenceSample("flair", {"tr": 9.0, "te": 0.130, "ti": 2.25}, preset="arc"),
    },
    noise_fraction=0.02,
    bias_rms=0.15,
    scale=1000.0,
)
"""Fixed ARC-like acquisition (lesions: dark on T1w, bright on T2w and FLAIR; CSF dark on FLAIR)."""


# ----------------------------------------------------------------------------------------------------------
# Template and grids
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Random fields and geometry
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# qMRI maps
# ----------------------------------------------------------------------------------------------------------


def _draw(low: float, high: float, rng: np.random.Generator) -> float:
    jitter = float(np.clip(rng.standard_normal(), -2.0, 2.0))
    return rng.uniform(low, high) * math.exp(BETWEEN_SUBJECT_LOG_SD * jitter)


def sample_tissue_values(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Per-subject qMRI values of GM, WM, CSF and lesion (PD, MT fractions; R1, R2*, R2 in 1/s)."""
    values = {t: {k: _draw(*TISSUE_QMRI[t][k], rng) for k in QMRI_KINDS} for t in TISSUES}
    values["lesion"] = {k: _draw(*LESION_QMRI[k], rng) for k in QMRI_KINDS}
    for v in values.values():
        v["PD"] = min(v["PD"], 1.0)
    return values


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every true voxel of ``mask`` (the whole grid when it has none)."""
    if not np.any(mask):
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def mix_maps(
    probs: Mapping[str, np.ndarray],
    lesion: np.ndarray | None,
    values: Mapping[str, Mapping[str, float]],
    template: Template,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Partial-volume qMRI maps with texture: sum over tissues of fraction x value, times (1 + 3 % texture).

    Lesion tissue replaces the same fraction of the GM and WM in its voxels. Background is 0.
    """
    fractions = {t: probs[t] for t in TISSUES}
    if lesion is not None:
        parenchyma = probs["GM"] + probs["WM"]
        keep = 1.0 - np.divide(lesion, parenchyma, out=np.zeros_like(lesion), where=parenchyma > 0)
        fractions = {"GM": probs["GM"] * keep, "WM": probs["WM"] * keep, "CSF": probs["CSF"], "lesion": lesion}
    sigma = TEXTURE_SIGMA_MM / template.resolution
    box = _bounding_box(probs["bg"] < 1.0)
    box_shape = tuple(b.stop - b.start for b in box)
    maps = {}
    for kind in QMRI_KINDS:
        out = np.zeros(template.shape, dtype=np.float32)
        for tissue, frac in fractions.items():
            out += np.float32(values[tissue][kind]) * frac
        out[box] *= 1.0 + TEXTURE_RMS * smooth_noise(box_shape, rng, sigma)
        np.clip(out, 0.0, None, out=out)
        maps[kind] = out
    np.clip(maps["PD"], 0.0, 1.0, out=maps["PD"])
    np.clip(maps["MT"], 0.0, 1.0, out=maps["MT"])
    return maps


@dataclass
class Subject:
    """One synthetic subject on the output grid.

    Attributes:
        maps: qMRI maps, PD and MT as fractions, R1 / R2s / R2 in 1/s (float32).
        labels: 0 background, 1 GM, 2 WM, 3 CSF (uint8; the lesion does not change them).
        mask: brain mask (uint8).
        lesion: lesion fraction map (float32) or None for a healthy subject.
        values: the subject's tissue qMRI values.
        fractions: GM / WM / CSF partial-volume fractions of the brain.
    """

    maps: dict[str, np.ndarray]
    labels: np.ndarray
    mask: np.ndarray
    lesion: np.ndarray | None
    values: dict[str, dict[str, float]]
    fractions: dict[str, float] = field(default_factory=dict)

    @property
    def lesion_mask(self) -> np.ndarray | None:
        """Binary lesion mask (uint8): lesion fraction >= 0.5, or None."""
        return None if self.lesion is None else (self.lesion >= 0.5).astype(np.uint8)


def make_subject(template: Template, rng: np.random.Generator, stroke: bool = False) -> Subject:
    """Draw one subject: warped anatomy, tissue values, optional lesion, textured partial-volume qMRI maps."""
    probs = warp_tissues(template, rng)
    values = sample_tissue_values(rng)
    lesion = make_lesion(probs, template, rng) if stroke else None
    maps = mix_maps(probs, lesion, values, template, rng)
    fractions = tissue_fractions(probs)
    for tissue, (low, high) in PLAUSIBLE_FRACTIONS.items():
        if not low <= fractions[tissue] <= high:
            log.warning("synthetic subject has an implausible %s fraction %.3f", tissue, fractions[tissue])
    return Subject(
        maps=maps,
        labels=tissue_labels(probs),
        mask=(probs["bg"] < 0.5).astype(np.uint8),
        lesion=lesion,
        values=values,
        fractions=fractions,
    )


# ----------------------------------------------------------------------------------------------------------
# Image acquisition
# ----------------------------------------------------------------------------------------------------------


def bias_field(shape: Sequence[int], rng: np.random.Generator, rms: float) -> np.ndarray:
    """Smooth multiplicative receive field ``exp(f)``, ``f`` a low-frequency field with the given RMS (float32)."""
    return np.exp(smooth_field(shape, rng, n_basis=3, rms=rms))


def acquire(
    subject: Subject,
    sample: SequenceSample,
    site: SiteProtocol,
    bias: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulated magnitude image in scanner units (float32 holding integers) of one protocol.

    The noise-free signal (``custom.sequences.simulate`` with the bias field as receive gain B1) gets Rician noise
    with sigma = ``site.noise_fraction`` x its brain 99th percentile, is scaled so that percentile becomes
    ``site.scale`` (times a +-3 % receiver-gain jitter) and rounded. Air outside the head is noise only.
    """
    maps = {k: torch.from_numpy(v) for k, v in subject.maps.items()}
    clean = simulate(sample, maps["PD"], maps["R1"], maps["R2s"], maps["MT"], r2=maps["R2"], b1=torch.from_numpy(bias))
    reference = float(np.percentile(clean.numpy()[subject.mask > 0], 99.0))
    if reference <= 0:
        raise RuntimeError(f"protocol {sample} gives an empty image")
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noisy = physics.rician_noise(clean, site.noise_fraction * reference, generator=generator)
    gain = site.scale / reference * (1.0 + 0.03 * float(np.clip(rng.standard_normal(), -2, 2)))
    return np.round(noisy.numpy() * gain).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Atomic writing
# ----------------------------------------------------------------------------------------------------------


def _atomic(path: Path, suffix: str, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp)`` on a fresh hidden name in ``path``'s folder, then move it onto ``path`` atomically.

    The temporary name ends with ``suffix`` (nibabel picks the format from it) and is created by ``write`` itself,
    so the file gets the usual permissions (umask), unlike a ``mkstemp`` file (0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".tmp-{secrets.token_hex(8)}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_nifti(path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> Path:
    """Write ``data`` as NIfTI-1 (``.nii.gz``) atomically: temporary file in the same folder, then ``os.replace``.

    The header has the affine as qform and sform (code 1, scanner), zooms = voxel sizes in mm, units mm / s.
    """
    path = Path(path)
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_zooms(tuple(float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))))
    img.header.set_xyzt_units("mm", "sec")
    return _atomic(path, ".nii.gz", lambda tmp: nib.save(img, tmp))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    path = Path(path)
    return _atomic(path, path.suffix or ".txt", write)


class _Writer:
    """Writes files on a small thread pool (gzip compression releases the GIL) and collects their paths."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.pending: list[Future[Path]] = []
        self.written: list[Path] = []

    def nifti(self, path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> Path:
        self.pending.append(self.pool.submit(save_nifti, path, data, affine, dtype))
        return path

    def text(self, path: Path, text: str) -> Path:
        self.pending.append(self.pool.submit(write_text, path, text))
        return path

    def wait(self) -> None:
        for future in self.pending:
            self.written.append(future.result())
        self.pending.clear()


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------

QMRI_UNITS_ON_DISK = {"PD": "percent", "MT": "percent", "R1": "1/s", "R2s": "1/s", "R2": "1/s"}
"""Units of the qMRI layout's files (hMRI toolbox conventions)."""


def subject_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """Random generator of subject ``index`` of ``dataset`` ("qmri", "ixi" or "arc"), seeded by these alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _DATASET_STREAMS[dataset], int(index)]))


def qmri_subject_id(index: int) -> str:
    """``sub-001`` for subject index 0."""
    return f"sub-{index + 1:03d}"


def is_stroke_qmri(index: int) -> bool:
    """Every second qMRI subject (sub-002, sub-004, ...) carries a stroke lesion."""
    return index % 2 == 1


def ixi_subject_id(index: int, seed: int) -> str:
    """``IXI{NNN}-{Site}-{NNNN}``: NNN = index + 2, site cycling Guys/HH/IOP, NNNN deterministic in (seed, index)."""
    number = int(np.random.default_rng([int(seed), 101, int(index)]).integers(0, 10000))
    return f"IXI{index + 2:03d}-{IXI_SITES[index % len(IXI_SITES)]}-{number:04d}"


def arc_subject_id(index: int) -> str:
    """``sub-M2001`` for subject index 0."""
    return f"sub-M2{index + 1:03d}"


def write_qmri(out: Path, index: int, template: Template, seed: int, writer: _Writer) -> tuple[Path, Subject]:
    """qMRI subject ``index`` in hMRI-toolbox style under ``out/qmri/sub-XXX/`` (PD, MT in percent)."""
    rng = subject_rng(seed, "qmri", index)
    subject = make_subject(template, rng, stroke=is_stroke_qmri(index))
    sid = qmri_subject_id(index)
    folder = out / "qmri" / sid
    for kind in QMRI_KINDS:
        scale = 100.0 if QMRI_UNITS_ON_DISK[kind] == "percent" else 1.0
        writer.nifti(folder / f"{sid}_{kind}.nii.gz", subject.maps[kind] * np.float32(scale), template.affine)
    writer.nifti(folder / f"{sid}_mask.nii.gz", subject.mask, template.affine, np.uint8)
    writer.nifti(folder / f"{sid}_labels.nii.gz", subject.labels, template.affine, np.uint8)
    if subject.lesion_mask is not None:
        writer.nifti(folder / f"{sid}_lesion.nii.gz", subject.lesion_mask, template.affine, np.uint8)
    return folder, subject


def write_ixi(out: Path, index: int, template: Template, seed: int, writer: _Writer) -> tuple[str, Subject]:
    """IXI-like subject ``index``: ``IXI-{T1,T2,PD}/IXI...-{contrast}.nii.gz`` and ``labels/IXI..._labels.nii.gz``."""
    rng = subject_rng(seed, "ixi", index)
    subject = make_subject(template, rng, stroke=False)
    name = ixi_subject_id(index, seed)
    site = SITE_PROTOCOLS[IXI_SITES[index % len(IXI_SITES)]]
    bias = bias_field(template.shape, rng, site.bias_rms)
    for contrast, sample in site.sequences.items():
        image = acquire(subject, sample, site, bias, rng)
        writer.nifti(out / "ixi" / f"IXI-{contrast}" / f"{name}-{contrast}.nii.gz", image, template.affine)
    writer.nifti(out / "ixi" / "labels" / f"{name}_labels.nii.gz", subject.labels, template.affine, np.uint8)
    return name, subject


def _bids_sidecar(sample: SequenceSample) -> str:
    p = sample.params
    meta: dict[str, object] = {"RepetitionTime": p["tr"], "EchoTime": p.get("te")}
    if "ti" in p:
        meta["InversionTime"] = p["ti"]
    if "flip" in p:
        meta["FlipAngle"] = round(math.degrees(p["flip"]), 3)
    meta["SimulatedSequence"] = sample.to_dict()
    meta["Manufacturer"] = "synthetic (custom.data.synthetic)"
    return json.dumps(meta, indent=2) + "\n"


def arc_sessions(index: int, rng: np.random.Generator) -> list[str]:
    """Session ids (4 digits, increasing); every third subject (index 0, 3, ...) has a second session."""
    first = int(rng.integers(100, 3000))
    sessions = [f"ses-{first:04d}"]
    if index % 3 == 0:
        sessions.append(f"ses-{first + int(rng.integers(30, 900)):04d}")
    return sessions


def write_arc(out: Path, index: int, template: Template, seed: int, writer: _Writer) -> dict[str, Any]:
    """ARC-like BIDS subject ``index`` with a lesion: T1w/T2w/FLAIR per session and a lesion mask per session.

    A second session re-draws the noise, the receiver gain and the bias field; anatomy and lesion are the same.
    """
    rng = subject_rng(seed, "arc", index)
    subject = make_subject(template, rng, stroke=True)
    sid = arc_subject_id(index)
    sessions = arc_sessions(index, rng)
    lesion_mask = subject.lesion_mask
    lesion = subject.lesion
    assert lesion_mask is not None and lesion is not None
    for ses in sessions:
        anat = out / "arc" / sid / ses / "anat"
        bias = bias_field(template.shape, rng, ARC_PROTOCOL.bias_rms)
        for contrast, sample in ARC_PROTOCOL.sequences.items():
            image = acquire(subject, sample, ARC_PROTOCOL, bias, rng)
            writer.nifti(anat / f"{sid}_{ses}_{contrast}.nii.gz", image, template.affine)
            writer.text(anat / f"{sid}_{ses}_{contrast}.json", _bids_sidecar(sample))
        deriv = out / "arc" / "derivatives" / "lesion_masks" / sid / ses / "anat"
        writer.nifti(deriv / f"{sid}_{ses}_desc-lesion_mask.nii.gz", lesion_mask, template.affine, np.uint8)
    return {
        "participant_id": sid,
        "sex": "M" if rng.random() < 0.6 else "F",
        "age": int(rng.integers(35, 80)),
        "sessions": sessions,
        "lesion_ml": float(lesion.sum(dtype=np.float64)) * template.voxel_ml,
    }


def write_arc_metadata(out: Path, participants: Sequence[Mapping[str, object]], writer: _Writer) -> None:
    """BIDS ``dataset_description.json`` (raw and derivative) and ``participants.tsv`` / ``.json``."""
    arc = out / "arc"
    description = {
        "Name": "Synthetic ARC-like stroke dataset (seqinv embedded data)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["seqinv contributors"],
        "GeneratedBy": [{"Name": "custom.data.synthetic", "Description": "MNI152 2009a template, qMRI simulation"}],
    }
    writer.text(arc / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    derivative = {
        "Name": "Synthetic lesion masks",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "custom.data.synthetic"}],
    }
    deriv = arc / "derivatives" / "lesion_masks" / "dataset_description.json"
    writer.text(deriv, json.dumps(derivative, indent=2) + "\n")
    rows = ["participant_id\tsex\tage\tlesion_volume_ml"]
    rows += [f"{p['participant_id']}\t{p['sex']}\t{p['age']}\t{float(p['lesion_ml']):.2f}" for p in participants]
    writer.text(arc / "participants.tsv", "\n".join(rows) + "\n")
    sidecar = {
        "sex": {"Description": "sex of the (synthetic) participant", "Levels": {"M": "male", "F": "female"}},
        "age": {"Description": "age at first session", "Units": "years"},
        "lesion_volume_ml": {"Description": "partial-volume lesion volume", "Units": "mL"},
    }
    writer.text(arc / "participants.json", json.dumps(sidecar, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------------


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def write_preview(
    out: Path,
    qmri_dirs: Sequence[str | os.PathLike[str]],
    ixi_names: Sequence[str],
    arc_rows: Sequence[Mapping[str, object]],
    seed: int,
    resolution: float,
) -> Path:
    """``out/preview.png`` read back from the written files: the first qMRI subject's maps (converted to SI with
    :func:`custom.data.qmri_units.to_si`) and labels, the first IXI subject of each site present, the first ARC
    subject with its lesion outlined, and one image per sequence type of the ``clinical`` and ``paper`` presets
    simulated from the first qMRI subject (``sample_sequence`` seeded with ``seed + 4 * preset_index + i``)."""
    from custom.data.preview import write_montage
    from custom.data.qmri_units import to_si

    images: dict[str, np.ndarray] = {}
    outlines: dict[str, np.ndarray] = {}
    cmaps: dict[str, str] = {}
    maps: dict[str, np.ndarray] = {}
    if qmri_dirs:
        folder = Path(qmri_dirs[0])
        sid = folder.name
        for kind in QMRI_KINDS:
            maps[kind], _ = to_si(_load(folder / f"{sid}_{kind}.nii.gz"), kind, path=folder / f"{sid}_{kind}.nii.gz")
        for kind, unit in (("PD", "fraction"), ("R1", "1/s"), ("R2s", "1/s"), ("MT", "fraction")):
            images[f"qMRI {sid} {kind} ({unit})"] = maps[kind]
        key = f"qMRI {sid} tissue labels (0 bg, 1 GM, 2 WM, 3 CSF)"
        images[key] = _load(folder / f"{sid}_labels.nii.gz")
        cmaps[key] = "viridis"
    for site in IXI_SITES:
        names = [n for n in ixi_names if f"-{site}-" in n]
        for contrast in SITE_PROTOCOLS[site].sequences if names else ():
            path = out / "ixi" / f"IXI-{contrast}" / f"{names[0]}-{contrast}.nii.gz"
            images[f"IXI {names[0]} {contrast}"] = _load(path)
    if arc_rows:
        sid, ses = str(arc_rows[0]["participant_id"]), str(arc_rows[0]["sessions"][0])  # type: ignore[index]
        deriv = out / "arc" / "derivatives" / "lesion_masks" / sid / ses / "anat"
        lesion = _load(deriv / f"{sid}_{ses}_desc-lesion_mask.nii.gz")
        for contrast in ARC_PROTOCOL.sequences:
            key = f"ARC {sid} {ses} {contrast} (red: lesion)"
            images[key] = _load(out / "arc" / sid / ses / "anat" / f"{sid}_{ses}_{contrast}.nii.gz")
            outlines[key] = lesion
    if maps:
        tensors = {k: torch.from_numpy(v) for k, v in maps.items()}
        for p, preset in enumerate(("clinical", "paper")):
            for i, name in enumerate(("fse", "gre", "flair", "mprage")):
                sample = sample_sequence(name, preset=preset, generator=seed + 4 * p + i)
                img = simulate(sample, tensors["PD"], tensors["R1"], tensors["R2s"], tensors["MT"], r2=tensors["R2"])
                images[f"{preset}: {sample}"] = img.numpy()
    title = f"seqinv synthetic data (seed {seed}, {resolution:g} mm voxels)"
    return write_montage(out / "preview.png", images, title=title, outlines=outlines, cmaps=cmaps, columns=4)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads: the simulation's element-wise operations on ~1M voxels are
    memory bound and slow down badly when their threads compete with the file writers (or other processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def generate_dataset(
    out_dir: str | os.PathLike[str],
    subjects: int = 4,
    seed: int = 0,
    resolution: float = 2.0,
    preview: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Write the synthetic qMRI, IXI-like and ARC-like datasets under ``out_dir``.

    Layout (``NNN`` zero-padded numbers; see the module docstring for the simulation):

    * ``qmri/sub-001/sub-001_{PD,R1,R2s,MT,R2}.nii.gz`` (PD, MT in percent; R1, R2*, R2 in 1/s), ``_mask`` and
      ``_labels`` (0 bg, 1 GM, 2 WM, 3 CSF); every second subject also has a stroke lesion and ``_lesion``.
    * ``ixi/IXI-{T1,T2,PD}/IXI{NNN}-{Site}-{NNNN}-{T1,T2,PD}.nii.gz`` and ``ixi/labels/IXI..._labels.nii.gz``;
      subject k is acquired at site ``IXI_SITES[k % 3]`` with :data:`SITE_PROTOCOLS`.
    * ``arc/`` BIDS: ``sub-M2NNN/ses-NNNN/anat/sub-M2NNN_ses-NNNN_{T1w,T2w,FLAIR}.nii.gz`` (+ JSON sidecars),
      ``derivatives/lesion_masks/.../*_desc-lesion_mask.nii.gz``, ``participants.tsv``,
      ``dataset_description.json``; every third subject has a second session.
    * ``preview.png`` when ``preview`` is true.

    Images and maps are float32, labels and masks uint8, all on one grid (RAS+, isotropic ``resolution`` mm
    voxels); every file is written atomically. Existing files are overwritten; other files are left alone.

    Args:
        out_dir: output folder (created).
        subjects: number of subjects of each dataset.
        seed: random seed; the data arrays are identical for equal seeds, and subject k does not depend on
            ``subjects``.
        resolution: isotropic voxel size, mm (1 and 2 use nilearn's templates as they are; other values
            resample the 2 mm template).
        preview: also write ``out_dir/preview.png``.
        progress: show a tqdm progress bar over subjects on stderr.

    Returns:
        A JSON-serialisable summary: ``out_dir``, ``seed``, ``resolution_mm``, ``shape``, ``subjects``, ``qmri``
        (subject folders), ``qmri_stroke`` (their ids), ``ixi`` (count), ``ixi_subjects``, ``ixi_sites`` (count
        per site), ``arc`` (count), ``arc_sessions`` (count), ``arc_subjects`` (id, sessions, lesion mL),
        ``tissue_fractions`` (mean GM / WM / CSF fraction of the brain), ``files`` (number written),
        ``preview`` (path or None), ``seconds`` and ``seconds_per_subject``.
    """
    start = time.perf_counter()
    if int(subjects) < 0:
        raise ValueError(f"subjects must be >= 0, got {subjects}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(float(resolution))
    qmri_dirs: list[str] = []
    ixi_names: list[str] = []
    arc_rows: list[dict[str, Any]] = []
    fractions: list[dict[str, float]] = []
    loop_start = time.perf_counter()
    with _torch_threads(1), ThreadPoolExecutor(max_workers=2) as pool:
        writer = _Writer(pool)
        for k in tqdm(range(int(subjects)), desc="synthetic subjects", unit="subj", disable=not progress):
            folder, subject = write_qmri(out, k, template, seed, writer)
            qmri_dirs.append(str(folder))
            fractions.append(subject.fractions)
            name, subject = write_ixi(out, k, template, seed, writer)
            ixi_names.append(name)
            fractions.append(subject.fractions)
            arc_rows.append(write_arc(out, k, template, seed, writer))
            writer.wait()
        loop_seconds = time.perf_counter() - loop_start
        if subjects:
            write_arc_metadata(out, arc_rows, writer)
        writer.wait()
    summary: dict[str, object] = {
        "out_dir": str(out),
        "seed": int(seed),
        "resolution_mm": float(resolution),
        "shape": list(template.shape),
        "subjects": int(subjects),
        "qmri": qmri_dirs,
        "qmri_stroke": [qmri_subject_id(k) for k in range(int(subjects)) if is_stroke_qmri(k)],
        "ixi": len(ixi_names),
        "ixi_subjects": ixi_names,
        "ixi_sites": {s: sum(f"-{s}-" in n for n in ixi_names) for s in IXI_SITES},
        "arc": len(arc_rows),
        "arc_sessions": sum(len(r["sessions"]) for r in arc_rows),
        "arc_subjects": arc_rows,
        "tissue_fractions": {t: float(np.mean([f[t] for f in fractions])) for t in TISSUES} if fractions else {},
        "files": len(writer.written),
        "preview": None,
    }
    if preview and subjects:
        with _torch_threads(1):
            path = write_preview(out, qmri_dirs, ixi_names, arc_rows, int(seed), float(resolution))
        summary["preview"] = str(path)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["seconds_per_subject"] = round(loop_seconds / max(int(subjects), 1), 3)
    return summary

"""One synthetic subject: tissue qMRI values, partial-volume mixing into qMRI maps, and the :class:`Subject`.

Per-tissue qMRI values are drawn around the 3 T literature values (:data:`~custom.data.synthetic.tissues.
TISSUE_QMRI`, between-subject variation of about 5-10 %) and mixed by partial volume (voxel value = sum over
tissues of probability x tissue value) with a mild spatially correlated texture (3 % RMS). Stroke lesions
(:mod:`custom.data.synthetic.lesions`) carry their own values and replace part of the grey/white matter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from custom.data.synthetic.anatomy import tissue_fractions, tissue_labels, warp_tissues
from custom.data.synthetic.fields import smooth_noise
from custom.data.synthetic.lesions import make_lesion
from custom.data.synthetic.template import Template
from custom.data.synthetic.tissues import (
    BETWEEN_SUBJECT_LOG_SD,
    LESION_QMRI,
    PLAUSIBLE_FRACTIONS,
    QMRI_KINDS,
    TEXTURE_RMS,
    TEXTURE_SIGMA_MM,
    TISSUE_QMRI,
    TISSUES,
)

__all__ = ["sample_tissue_values", "mix_maps", "Subject", "make_subject"]

log = logging.getLogger(__name__)


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

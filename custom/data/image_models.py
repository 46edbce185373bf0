"""Image models for downstream synthetic data that the pretraining simulator did not make (issue #16).

The pretraining data and the default downstream (IXI-like) images both come from the MRI signal equations
(:func:`custom.data.synthetic.acquire`). A downstream encoder test on such images only shows that the encoder
handles contrasts the simulator itself produces. This module renders the same synthetic subjects - same warp of
the MNI152 template, same tissue labels - with two independent image models:

* ``"gmm"`` (SynthSeg-like; Billot et al. 2023 as the idea only): every image draws its own mean intensity and
  standard deviation per tissue (:data:`GMM_MEAN_RANGE`, :data:`GMM_STD_RANGE`), so the tissue order is not fixed
  (WM may be darker or brighter than GM, CSF anywhere), mixes them with the partial-volume tissue probabilities,
  ``image = sum_k p_k (mu_k + sigma_k n_k)`` with white Gaussian ``n_k``, blurs the result to a random resolution
  (Gaussian, per-axis FWHM in :data:`GMM_FWHM_MM`), applies a smooth multiplicative bias field
  (:data:`GMM_BIAS_RMS`) and Rician noise (:data:`GMM_NOISE_FRACTION`). No sequence equation is involved.
* ``"template"``: the intensities of the MNI152 2009a T1 template itself (skull-stripped, shipped by ``nilearn``),
  resampled with the subject's own sampling coordinates (the ones its tissue maps were resampled with, so labels
  line up), with the site's bias field, Rician noise level and intensity scale. A real T1-weighted contrast.
* ``"physics"``: the existing path, :func:`custom.data.synthetic.acquire` with the site's protocol.

Every model returns a float32 volume on the subject's grid in the physics images' convention: zero signal
outside the brain mask (air holds Rician noise only, a Rayleigh floor), brain 99th percentile scaled to the
site's ``scale`` with a +-3 % receiver-gain jitter, rounded to integers. Everything is drawn from the ``rng``
passed in, so images are deterministic for a given generator state.

Subjects: :func:`make_subject_anatomy` wraps :func:`custom.data.synthetic.make_subject` (same draws from the same
generator, hence the identical :class:`~custom.data.synthetic.Subject`) and also gives the partial-volume tissue
probabilities and the source sampling coordinates that ``make_subject`` uses but does not keep; they are replayed
from a copy of the generator taken before ``make_subject`` ran, and checked against the subject's labels.

Units: lengths in mm; intensities, standard deviations, noise levels and bias RMS as fractions (see each
constant).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from custom import physics
from custom.data.synthetic import (
    SiteProtocol,
    Subject,
    Template,
    acquire,
    bias_field,
    make_subject,
    sampling_coordinates,
    tissue_labels,
    warp_tissues,
)

__all__ = [
    "site_images",
    "IMAGE_MODELS",
    "GMM_MEAN_RANGE",
    "GMM_MIN_SEPARATION",
    "GMM_STD_RANGE",
    "GMM_FWHM_MM",
    "GMM_BIAS_RMS",
    "GMM_NOISE_FRACTION",
    "GAIN_JITTER",
    "T1_CONTRASTS",
    "GmmParams",
    "SubjectAnatomy",
    "make_subject_anatomy",
    "sample_gmm_params",
    "gmm_image",
    "template_t1",
    "warped_template_t1",
    "template_image",
    "image_contrasts",
    "render_image",
]

IMAGE_MODELS: tuple[str, ...] = ("physics", "gmm", "template")
"""Names accepted by :func:`render_image`."""

GMM_MEAN_RANGE: tuple[float, float] = (0.05, 1.0)
"""Per-image, per-tissue mean intensity, uniform in this range, as a fraction of an arbitrary full scale (the
image is rescaled to the site's scale at the end, so only ratios matter). Each tissue is drawn independently, so
every order of GM / WM / CSF is equally likely. Background has no signal (0), as in the physics images; the lower
bound keeps every tissue above the air (a tissue as dark as air would erase the brain outline the brain mask and
the physics images keep)."""

GMM_MIN_SEPARATION: float = 0.10
"""Every pair of tissue means differs by at least this fraction of the largest mean (draws are repeated until it
holds; about 62 % of draws pass). Without it about 2 images in 5 would have two tissues within 10 % of each other,
nearly a contrast without a boundary to segment; with it the order stays random (the constraint is symmetric in
the tissues)."""

GMM_STD_RANGE: tuple[float, float] = (0.01, 0.08)
"""Per-image, per-tissue standard deviation of the voxel-wise white Gaussian texture, uniform in this range, in
the same full-scale fraction as :data:`GMM_MEAN_RANGE` (up to 8 %, i.e. roughly SynthSeg's 0-35 on 0-255 means
after the blur below has averaged it down; the lower bound keeps some within-tissue texture)."""

GMM_FWHM_MM: tuple[float, float] = (1.0, 5.0)
"""Full width at half maximum of the Gaussian blur, mm, drawn independently per axis: from about one voxel of the
default 2 mm grid (sharp 3D acquisitions) to 5 mm (thick-slice clinical 2D acquisitions in one direction). The
blur is applied to the noise-free image, before bias and noise, like a point-spread function."""

GMM_BIAS_RMS: tuple[float, float] = (0.0, 0.30)
"""RMS of the log of the smooth multiplicative bias field, uniform in this range (the physics sites use 0.10-0.20;
the wider range covers uncorrected 3 T / surface-coil shading as well as bias-corrected images)."""

GMM_NOISE_FRACTION: tuple[float, float] = (0.005, 0.05)
"""Rician noise sigma as a fraction of the 99th percentile of the noise-free brain signal, uniform in this range
(the physics sites use 0.015-0.03; IXI and ARC images fall in about 0.01-0.05)."""

GAIN_JITTER: float = 0.03
"""Receiver-gain jitter of the final intensity scale (relative SD, clipped at 2 SD), as in ``acquire``."""

T1_CONTRASTS: tuple[str, ...] = ("T1", "T1w")
"""Contrast names (IXI folder suffix, BIDS suffix) that the ``"template"`` model, a T1-weighted image, can fill."""

_MAX_DRAWS = 1000


# ----------------------------------------------------------------------------------------------------------
# Subject anatomy: the Subject plus the tissue probabilities and sampling coordinates behind it
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SubjectAnatomy:
    """A synthetic subject with the warp behind it; make one with :func:`make_subject_anatomy`.

    Attributes:
        subject: the :class:`~custom.data.synthetic.Subject` (``make_subject``'s result, unchanged).
        template: the template the subject was drawn from (its grid is the subject's grid).
        replay: a copy of the generator as it was before ``make_subject`` ran (never advanced; copied on use).

    ``coords`` and ``probs`` are computed on first use and cached (the physics model needs neither).
    """

    subject: Subject
    template: Template
    replay: np.random.Generator

    @functools.cached_property
    def coords(self) -> np.ndarray:
        """Source-voxel coordinates ``(3, *shape)`` float32 of the subject's warp (``sampling_coordinates``)."""
        return sampling_coordinates(self.template, copy.deepcopy(self.replay))

    @functools.cached_property
    def probs(self) -> dict[str, np.ndarray]:
        """Partial-volume probabilities ``bg``, ``GM``, ``WM``, ``CSF`` (and ``lesion`` for a stroke subject: the
        lesion replaces the same fraction of GM and WM, as in the qMRI maps), summing to 1 (float32)."""
        probs = warp_tissues(self.template, copy.deepcopy(self.replay))
        if not np.array_equal(tissue_labels(probs), self.subject.labels):
            raise RuntimeError(
                "replaying the subject's warp did not reproduce its labels: make_subject no longer starts with "
                "warp_tissues(template, rng); update custom.data.image_models.make_subject_anatomy"
            )
        lesion = self.subject.lesion
        if lesion is not None:
            parenchyma = probs["GM"] + probs["WM"]
            keep = 1.0 - np.divide(lesion, parenchyma, out=np.zeros_like(lesion), where=parenchyma > 0)
            probs = {**probs, "GM": probs["GM"] * keep, "WM": probs["WM"] * keep, "lesion": lesion}
        return probs


def make_subject_anatomy(template: Template, rng: np.random.Generator, stroke: bool = False) -> SubjectAnatomy:
    """``make_subject(template, rng, stroke)`` with its warp kept: advances ``rng`` exactly as ``make_subject``
    does, so a writer can swap one call for the other without changing any later draw or any written file."""
    replay = copy.deepcopy(rng)
    subject = make_subject(template, rng, stroke=stroke)
    return SubjectAnatomy(subject=subject, template=template, replay=replay)


# ----------------------------------------------------------------------------------------------------------
# Shared finishing step: receive field, Rician noise, scanner scale
# ----------------------------------------------------------------------------------------------------------


def _to_scanner_units(
    clean: np.ndarray, brain: np.ndarray, noise_fraction: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Rician noise with sigma = ``noise_fraction`` x the brain's 99th percentile of ``clean``, then that
    percentile scaled to ``scale`` (times the receiver-gain jitter) and rounded, as ``acquire`` does."""
    reference = float(np.percentile(clean[brain], 99.0)) if np.any(brain) else 0.0
    if not reference > 0:
        raise RuntimeError("the noise-free image has no signal in the brain")
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noisy = physics.rician_noise(torch.from_numpy(clean), noise_fraction * reference, generator=generator).numpy()
    gain = scale / reference * (1.0 + GAIN_JITTER * float(np.clip(rng.standard_normal(), -2.0, 2.0)))
    return np.round(noisy * gain).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# "gmm": random per-tissue Gaussian mixture
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GmmParams:
    """One image's draw of the Gaussian-mixture model.

    Attributes:
        means: tissue -> mean intensity (fraction of full scale; background is 0).
        stds: tissue -> standard deviation of its white Gaussian texture (same units).
        fwhm_mm: per-axis FWHM of the Gaussian blur, mm.
        bias_rms: RMS of the log bias field.
        noise_fraction: Rician sigma / brain 99th percentile of the noise-free image.
    """

    means: dict[str, float]
    stds: dict[str, float]
    fwhm_mm: tuple[float, float, float]
    bias_rms: float
    noise_fraction: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable description (for metadata)."""
        return {
            "means": dict(self.means),
            "stds": dict(self.stds),
            "fwhm_mm": list(self.fwhm_mm),
            "bias_rms": self.bias_rms,
            "noise_fraction": self.noise_fraction,
        }


def sample_gmm_params(rng: np.random.Generator, tissues: Sequence[str] = ("GM", "WM", "CSF")) -> GmmParams:
    """Draw one image's mixture: means (redrawn until :data:`GMM_MIN_SEPARATION` holds), stds, blur, bias, noise."""
    tissues = tuple(tissues)
    if not tissues or "bg" in tissues:
        raise ValueError(f"tissues must be non-empty foreground classes (background is fixed at 0), got {tissues}")
    for _ in range(_MAX_DRAWS):
        means = rng.uniform(*GMM_MEAN_RANGE, size=len(tissues))
        gaps = np.abs(means[:, None] - means[None, :])[np.triu_indices(len(tissues), k=1)]
        if gaps.size == 0 or gaps.min() >= GMM_MIN_SEPARATION * means.max():
            break
    else:  # pragma: no cover - needs thousands of classes
        raise RuntimeError(f"no tissue means {GMM_MIN_SEPARATION:.0%} apart in {_MAX_DRAWS} draws for {tissues}")
    stds = rng.uniform(*GMM_STD_RANGE, size=len(tissues))
    fwhm = rng.uniform(*GMM_FWHM_MM, size=3)
    return GmmParams(
        means={t: float(m) for t, m in zip(tissues, means, strict=True)},
        stds={t: float(s) for t, s in zip(tissues, stds, strict=True)},
        fwhm_mm=(float(fwhm[0]), float(fwhm[1]), float(fwhm[2])),
        bias_rms=float(rng.uniform(*GMM_BIAS_RMS)),
        noise_fraction=float(rng.uniform(*GMM_NOISE_FRACTION)),
    )


def _spacing3(spacing_mm: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(spacing_mm)] * 3 if np.isscalar(spacing_mm) else [float(s) for s in spacing_mm]  # type: ignore[arg-type]
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing_mm must be a positive voxel size or three of them (mm), got {spacing_mm}")
    return values[0], values[1], values[2]


def gmm_image(
    probs: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    spacing_mm: float | Sequence[float],
    *,
    scale: float = 1000.0,
    params: GmmParams | None = None,
) -> np.ndarray:
    """SynthSeg-like image of partial-volume tissue probabilities (float32 holding integers, the probs' shape).

    ``sum_k p_k (mu_k + sigma_k n_k)`` over the non-background classes of ``probs`` (background has no signal),
    clipped at 0, Gaussian blur with the drawn per-axis FWHM, times ``exp(bias)``, Rician noise, brain 99th
    percentile scaled to ``scale``. The brain is ``probs["bg"] < 0.5`` (the Subject's mask).

    Args:
        probs: class -> probability map (``bg`` plus tissues, e.g. :attr:`SubjectAnatomy.probs`), same shapes.
        rng: the only source of randomness.
        spacing_mm: voxel size, mm (one value or one per axis), to convert the blur FWHM to voxels.
        scale: intensity of the brain's 99th percentile (arbitrary scanner units, e.g. ``site.scale``).
        params: a fixed draw (default: ``sample_gmm_params(rng, classes)``).
    """
    if "bg" not in probs:
        raise ValueError(f"probs needs a 'bg' (background) map, got {sorted(probs)}")
    tissues = tuple(k for k in probs if k != "bg")
    params = params if params is not None else sample_gmm_params(rng, tissues)
    missing = [t for t in tissues if t not in params.means or t not in params.stds]
    if missing:
        raise ValueError(f"params have no mean/std for {missing}")
    spacing = _spacing3(spacing_mm)
    shape = probs["bg"].shape
    clean = np.zeros(shape, dtype=np.float32)
    for t in tissues:
        texture = rng.standard_normal(shape, dtype=np.float32)
        texture *= np.float32(params.stds[t])
        texture += np.float32(params.means[t])
        clean += np.asarray(probs[t], dtype=np.float32) * texture
    np.clip(clean, 0.0, None, out=clean)
    sigma_vox = [f / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for f, s in zip(params.fwhm_mm, spacing, strict=True)]
    clean = ndimage.gaussian_filter(clean, sigma_vox, truncate=3.0, mode="constant", cval=0.0)
    clean *= bias_field(shape, rng, params.bias_rms)
    return _to_scanner_units(clean, np.asarray(probs["bg"]) < 0.5, params.noise_fraction, scale, rng)


# ----------------------------------------------------------------------------------------------------------
# "template": the MNI152 T1 template's own intensities
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _template_t1(source_mm: int, resolution: float) -> np.ndarray:
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=source_mm).get_fdata(dtype=np.float32))
    factor = resolution / source_mm
    if factor > 1.0:  # the same anti-aliasing smoothing load_template gives the GM / WM / mask maps
        t1 = ndimage.gaussian_filter(t1, 0.42 * math.sqrt(factor**2 - 1.0))
    t1.setflags(write=False)
    return t1


def template_t1(template: Template) -> np.ndarray:
    """The MNI152 2009a T1 template (skull-stripped, ``nilearn.datasets.load_mni152_template``, about 0.3 CSF to
    0.9 WM) on ``template``'s source grid, smoothed like its GM / WM / mask maps (float32, read-only, cached)."""
    source_mm = int(round(abs(float(template.source_affine[0, 0]))))
    t1 = _template_t1(source_mm, float(template.resolution))
    if t1.shape != template.mask.shape:
        raise RuntimeError(f"MNI T1 template {t1.shape} is not on the tissue maps' grid {template.mask.shape}")
    return t1


def warped_template_t1(template: Template, coords: np.ndarray) -> np.ndarray:
    """The T1 template resampled at a subject's source-voxel ``coords`` (linear, 0 outside; float32)."""
    return ndimage.map_coordinates(template_t1(template), coords, order=1, mode="constant", cval=0.0, output=np.float32)


def template_image(
    template: Template,
    coords: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_fraction: float,
    bias: np.ndarray | None = None,
    scale: float = 1000.0,
) -> np.ndarray:
    """T1-weighted image of a subject from the MNI T1 template's intensities (float32 holding integers).

    The template T1 warped with the subject's ``coords``, zero where the warped brain mask is zero (the physics
    images' support), times the receive field ``bias`` (none when None), Rician noise with sigma =
    ``noise_fraction`` x the brain's 99th percentile, that percentile scaled to ``scale``. The brain is the warped
    mask >= 0.5 (the Subject's mask).
    """
    mask = ndimage.map_coordinates(template.mask, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    clean = warped_template_t1(template, coords)
    clean[mask <= 1e-4] = 0.0
    np.clip(clean, 0.0, None, out=clean)
    if bias is not None:
        clean *= bias
    return _to_scanner_units(clean, mask >= 0.5, noise_fraction, scale, rng)


# ----------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------


def _check_model(model: str) -> str:
    if model not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {model!r}; valid models: {', '.join(IMAGE_MODELS)}")
    return model


def image_contrasts(model: str, site: SiteProtocol) -> tuple[str, ...]:
    """The contrasts of ``site`` that ``model`` renders: all of them, except ``"template"`` (T1-weighted only)."""
    if _check_model(model) == "template":
        return tuple(c for c in site.sequences if c in T1_CONTRASTS)
    return tuple(site.sequences)


def site_images(
    model: str, subject: SubjectAnatomy | Subject, template: Template, site: SiteProtocol, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Every contrast ``model`` renders at ``site`` (:func:`image_contrasts`): contrast name -> image.

    One receive field is drawn first and shared by the subject's contrasts, then the contrasts are rendered in
    the site's order; for ``"physics"`` this is exactly :func:`custom.data.synthetic.acquire_session` (same draws
    from ``rng``, same images).
    """
    bias = bias_field(template.shape, rng, site.bias_rms)
    return {c: render_image(model, subject, template, site, c, rng, bias=bias) for c in image_contrasts(model, site)}


def render_image(
    model: str,
    subject: SubjectAnatomy | Subject,
    template: Template,
    site: SiteProtocol,
    contrast: str,
    rng: np.random.Generator,
    *,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """One image of ``subject`` under ``model`` (one of :data:`IMAGE_MODELS`), float32 on the subject's grid.

    * ``"physics"``: ``acquire(subject, site.sequences[contrast], site, bias, rng)``, the existing simulation.
    * ``"gmm"``: :func:`gmm_image` of the subject's tissue probabilities at ``template.resolution`` mm, scaled to
      ``site.scale``; ``contrast`` only names the file (each call draws a new random contrast) and ``bias`` is not
      used (the model draws its own bias field).
    * ``"template"``: :func:`template_image` with the site's ``noise_fraction``, ``scale`` and ``bias``;
      ``contrast`` must be T1-weighted (:data:`T1_CONTRASTS`); lesions are not shown, so stroke subjects are
      refused.

    Args:
        model: image model name.
        subject: a :class:`SubjectAnatomy` (any model) or a plain ``Subject`` (``"physics"`` only).
        template: the subject's template (grid).
        site: acquisition site (protocols, noise, bias RMS, scale).
        contrast: a key of ``site.sequences``.
        rng: the only source of randomness.
        bias: the site's receive field for ``"physics"`` / ``"template"`` (``bias_field(template.shape, rng,
            site.bias_rms)``), shared by a subject's contrasts; drawn from ``rng`` when None.
    """
    _check_model(model)
    if contrast not in site.sequences:
        raise ValueError(f"contrast {contrast!r} is not one of the site's {sorted(site.sequences)}")
    anatomy = subject if isinstance(subject, SubjectAnatomy) else None
    base = anatomy.subject if anatomy is not None else subject
    if not isinstance(base, Subject):
        raise TypeError(f"subject must be a SubjectAnatomy or Subject, got {type(subject).__name__}")
    if base.labels.shape != tuple(template.shape):
        raise ValueError(f"subject grid {base.labels.shape} differs from the template grid {template.shape}")
    if model == "physics":
        if bias is None:
            bias = bias_field(template.shape, rng, site.bias_rms)
        return acquire(base, site.sequences[contrast], site, bias, rng)
    if anatomy is None:
        raise TypeError(
            f"image model {model!r} needs the subject's warp: pass make_subject_anatomy(...), not a Subject"
        )
    if model == "gmm":
        return gmm_image(anatomy.probs, rng, template.resolution, scale=site.scale)
    if contrast not in T1_CONTRASTS:
        raise ValueError(f"image model 'template' is T1-weighted only; contrast {contrast!r} is not in {T1_CONTRASTS}")
    if base.lesion is not None:
        raise ValueError("image model 'template' cannot show lesions (the MNI T1 has none); use 'physics' or 'gmm'")
    if bias is None:
        bias = bias_field(template.shape, rng, site.bias_rms)
    return template_image(
        template, anatomy.coords, rng, noise_fraction=site.noise_fraction, bias=bias, scale=site.scale
    )

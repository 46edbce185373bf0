"""Intensity normalisation of simulated views and of images given to an encoder, in torch.

The authors' pretraining pipeline (docs/paper-notes.md, "Views, networks and losses") normalises every view in
three steps, which :func:`normalise_view` reproduces:

1. rescale by the view's own 0.5th and 95th percentiles to [0, 1], clipped (:func:`percentile_rescale`);
2. histogram-equalise to [0, 1] (:func:`histogram_equalise`, MONAI ``HistogramNormalize`` semantics);
3. after the augmentations, z-score the network input and the reconstruction target (:func:`zscore`).

Why not MONAI's transforms: ``HistogramNormalize`` and ``ScaleIntensityRangePercentiles`` convert to NumPy and
back (a device round trip for views simulated on the GPU, and ``np.percentile`` on ~2 M voxels per view);
these functions stay on the tensor's device and dtype, and use ``torch.kthvalue`` on a regular subsample
for the percentiles (no ``torch.quantile`` size limit).

Every function takes a plain tensor or ``MetaTensor`` of any shape and returns a plain tensor of the same
shape; intensities are unitless.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "VIEW_NORMS",
    "percentile",
    "clip_to_percentiles",
    "percentile_rescale",
    "histogram_equalise",
    "zscore",
    "normalise_view",
]

#: Names accepted by :func:`normalise_view`: ``histeq`` (authors' pipeline) and ``robust_max`` (divide by the
#: brain's 99.5th percentile, this project's earlier pipeline; kept to replay older runs).
VIEW_NORMS: tuple[str, ...] = ("histeq", "robust_max")
_SUBSAMPLE = 2**18  # voxels used for a percentile estimate (about 64^3)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def percentile(values: torch.Tensor, q: float, region: torch.Tensor | None = None) -> torch.Tensor:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values`` (inside ``region`` when given and non-empty).

    Estimated on a regular subsample of at most ~2**18 voxels; returns a 0-d tensor on the values' device.
    """
    v = _plain(values)
    if region is not None:
        selected = v[_plain(region).expand_as(v)]
        v = selected if selected.numel() > 0 else v
    v = v.reshape(-1).float()
    step = max(1, v.numel() // _SUBSAMPLE)
    v = v[::step]
    n = v.numel()
    k = min(max(int(math.ceil(q / 100.0 * n)), 1), n)
    return torch.kthvalue(v, k).values


def clip_to_percentiles(
    image: torch.Tensor, low: float, high: float, region: torch.Tensor | None = None
) -> torch.Tensor:
    """``image`` clamped to its ``low``-th and ``high``-th percentiles (inside ``region``), e.g. 0.5 / 99.5."""
    img = _plain(image)
    lo = percentile(img, low, region)
    hi = percentile(img, high, region)
    return torch.clamp(img, min=lo, max=torch.maximum(hi, lo))


def percentile_rescale(image: torch.Tensor, low: float = 0.5, high: float = 95.0) -> torch.Tensor:
    """Map the ``low``-th percentile to 0 and the ``high``-th to 1, clipped to [0, 1] (over every voxel).

    A constant image (``high`` percentile equal to ``low``) gives zeros.
    """
    img = _plain(image).float()
    lo = percentile(img, low)
    hi = percentile(img, high)
    span = hi - lo
    if not float(span) > 0:
        return torch.zeros_like(img)
    return torch.clamp((img - lo) / span, 0.0, 1.0)


def histogram_equalise(image: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation to [0, 1] with MONAI ``HistogramNormalize`` semantics.

    The histogram of ``bins`` equal bins over ``[min, max]`` is accumulated; the cumulative distribution is
    rescaled linearly to [0, 1] (so the lowest bin maps to 0 and the highest to 1) and every voxel is mapped by
    linear interpolation of it between the bins' centres (clamped beyond the first and last centre), as
    ``monai.transforms.utils.equalize_hist`` does with NumPy. A constant image gives zeros.
    """
    img = _plain(image).float()
    flat = img.reshape(-1)
    lo, hi = flat.min(), flat.max()
    if not float(hi - lo) > 0:
        return torch.zeros_like(img)
    hist = torch.histc(flat, bins=bins, min=float(lo), max=float(hi))
    cdf = torch.cumsum(hist, 0)
    cdf = (cdf - cdf[0]) / torch.clamp(cdf[-1] - cdf[0], min=torch.finfo(cdf.dtype).tiny)
    width = (hi - lo) / bins
    # position in units of bins from the first bin centre; interpolate the cdf between neighbouring centres
    pos = torch.clamp((flat - lo) / width - 0.5, 0.0, float(bins - 1))
    left = torch.floor(pos).long().clamp_(max=bins - 2) if bins > 1 else torch.zeros_like(pos, dtype=torch.long)
    frac = pos - left.to(pos.dtype)
    if bins > 1:
        out = cdf[left] * (1.0 - frac) + cdf[left + 1] * frac
    else:
        out = torch.zeros_like(flat)
    return out.reshape(img.shape)


def zscore(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(image - mean) / std`` over every voxel (MONAI ``NormalizeIntensity`` default); constant -> zeros."""
    img = _plain(image).float()
    std = img.std(unbiased=False)
    return (img - img.mean()) / torch.clamp(std, min=eps)


def normalise_view(
    image: torch.Tensor, norm: str = "histeq", scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Steps 1-2 of the view normalisation (before augmentations; z-scoring comes after them).

    Args:
        image: a simulated (or real) image crop, any shape.
        norm: ``"histeq"``: :func:`percentile_rescale` (0.5 / 95) then :func:`histogram_equalise`;
            ``"robust_max"``: divide by ``scale`` (the brain's 99.5th percentile, computed by the caller).
        scale: the divisor of ``robust_max``.
    """
    if norm == "histeq":
        return histogram_equalise(percentile_rescale(image, 0.5, 95.0))
    if norm == "robust_max":
        if scale is None:
            raise ValueError("normalise_view: norm 'robust_max' needs the scale")
        return _plain(image).float() / scale
    raise ValueError(f"unknown view normalisation {norm!r}; expected one of {VIEW_NORMS}")

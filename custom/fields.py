"""Smooth 3-D fields and robust image statistics, in torch on the data's device.

* :func:`polynomial_log_field` - a Legendre polynomial log-field over a volume (or a strided sub-box of it), the
  model of the receive field B1 of the simulation and of the bias-field augmentation
  (:mod:`custom.transforms`); :func:`poly_terms` lists its terms.
* :func:`region_percentile` - a percentile of an image inside a region (e.g. the brain's 99.5th percentile,
  the intensity scale of simulated images); ``robust_max`` is its older name, kept as an alias.
* :func:`subsample_stride` - the stride of a regular subsample of ~64^3 voxels for cheap global statistics.

Not to be confused with :func:`custom.data.qmri_units.nonzero_magnitude_p99` (NumPy; the 99th percentile of
the nonzero finite magnitudes of a qMRI map, used to detect its units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["poly_terms", "polynomial_log_field", "region_percentile", "robust_max", "subsample_stride"]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata (no copy), so the statistics return plain tensors."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def region_percentile(
    image: torch.Tensor, region: torch.Tensor | None = None, percentile: float = 99.5
) -> torch.Tensor:
    """The ``percentile``-th percentile of ``image`` inside ``region`` (a 0-d tensor on the image's device).

    Args:
        image: any tensor (plain or ``MetaTensor``), any shape; the result is a plain float32 tensor in the
            image's intensity units.
        region: boolean tensor broadcastable to ``image`` (e.g. a brain mask); ``None`` or an empty region
            uses every voxel.
        percentile: in [0, 100]. Computed exactly over every selected voxel with ``torch.kthvalue`` (no size
            limit, unlike ``torch.quantile``; :func:`custom.intensity.percentile` is the subsampled estimate).
    """
    values = _plain(image)
    if region is not None:
        selected = values[_plain(region).expand_as(values)]
        if selected.numel() > 0:
            values = selected
    values = values.reshape(-1).float()
    n = values.numel()
    k = min(max(int(math.ceil(percentile / 100.0 * n)), 1), n)
    return torch.kthvalue(values, k).values


robust_max = region_percentile
"""Older name of :func:`region_percentile` (with its default, the 99.5th percentile: a robust maximum)."""


def subsample_stride(shape: Sequence[int], target: int = 2**18) -> int:
    """Stride that leaves about ``target`` (64^3) voxels of a volume of spatial ``shape``, for cheap statistics."""
    n = int(np.prod(shape))
    return max(1, int(round((n / target) ** (1.0 / 3.0))))


def _legendre(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials ``P_0 .. P_degree`` at ``x`` (shape ``(degree + 1, len(x))``)."""
    out = [torch.ones_like(x), x]
    for n in range(1, degree):
        out.append(((2 * n + 1) * x * out[n] - n * out[n - 1]) / (n + 1))
    return torch.stack(out[: degree + 1])


def poly_terms(degree: int) -> list[tuple[int, int, int]]:
    """Exponent triples (i, j, k) with ``1 <= i + j + k <= degree`` (the constant term is left out).

    ``len(poly_terms(degree))`` is the number of coefficients of :func:`polynomial_log_field` (9 for degree 2,
    19 for degree 3).
    """
    return [
        (i, j, k)
        for i in range(degree + 1)
        for j in range(degree + 1 - i)
        for k in range(degree + 1 - i - j)
        if i + j + k > 0
    ]


def polynomial_log_field(
    coeffs: Sequence[float],
    shape: Sequence[int],
    *,
    degree: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    offset: Sequence[int] = (0, 0, 0),
    stride: int = 1,
    full_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Smooth 3-D field ``sum c_ijk P_i(u) P_j(v) P_k(w)`` over ``1 <= i + j + k <= degree`` (Legendre P).

    The coordinates ``u, v, w`` run over [-1, 1] across ``full_shape`` (default ``shape``); a sub-box of it is
    evaluated with ``offset`` (voxel index of the box's first voxel in the full volume) and ``stride`` (every
    ``stride``-th voxel), so a crop of the field equals the field of the crop. Used as a log-field: the
    multiplicative field is ``exp`` of it. ``len(coeffs)`` must equal ``len(poly_terms(degree))``
    (9 for degree 2, 19 for degree 3). Returns a tensor of ``shape`` on ``device``.
    """
    terms = poly_terms(degree)
    if len(coeffs) != len(terms):
        raise ValueError(f"degree {degree} needs {len(terms)} coefficients, got {len(coeffs)}")
    full = tuple(full_shape) if full_shape is not None else tuple(shape)
    table = np.zeros((degree + 1,) * 3, dtype=np.float64)
    for (i, j, k), c in zip(terms, coeffs, strict=True):
        table[i, j, k] = c
    c_t = torch.as_tensor(table, dtype=dtype).to(device)
    bases = []
    for n, off, f in zip(shape, offset, full, strict=True):
        idx = torch.arange(n, device=device, dtype=dtype) * stride + off
        bases.append(_legendre(2.0 * idx / max(f - 1, 1) - 1.0, degree))
    return torch.einsum("ijk,ix,jy,kz->xyz", c_t, *bases)

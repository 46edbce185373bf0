"""Batched view augmentations and normalisation: the per-sample pipeline's steps as batched torch operations.

Every function takes a batch of single-channel views ``(N, 1, *S)`` on any device and per-view parameters, and
applies what the per-sample path (:func:`custom.transforms.augmentations.mri_augmentations`,
:func:`custom.intensity.normalise_view`) applies to one view, to all of them at once:

* :func:`sample_spatial` / :func:`warp` - rotation, shear, scale (MONAI ``RandAffined``: the same matrices,
  ``R_x R_y R_z`` times the composed shear times the scale, about the crop centre, output the patch size), and the
  three axis flips (``RandFlipd``), as one ``affine_grid`` / ``grid_sample`` per batch; :func:`view_to_window` is
  the voxel map that the dense term needs.
* :func:`legendre_fields` / :func:`legendre_at_points` - :func:`custom.fields.polynomial_log_field` for a batch of
  coefficient sets (bias field, receive field B1).
* :func:`bias_field_`, :func:`gibbs_ringing_` (MONAI ``GibbsNoise``: the same spherical k-space mask, applied
  with a real FFT), :func:`rician_`, :func:`cuboid_dropout_` (:class:`~custom.transforms.RandCuboidDropoutd`).
* :func:`normalise_views` (0.5 / 95 percentile rescale then histogram equalisation, or a division by a scale) and
  :func:`zscore_views_`, with an optional validity mask for views whose crop is smaller than the window.

Functions whose name ends in ``_`` work in place (on the CPU a fresh whole-batch tensor per step costs more than
the arithmetic: ``custom.physics._Temporaries``); callers pass buffers they own.

:func:`augment_settings` reads the ``augment`` keyword arguments of the per-sample path (same names, same
defaults: those of :func:`~custom.transforms.augmentations.mri_augmentations`), and :func:`sample_artefacts` /
:func:`sample_spatial` draw every per-view parameter from one CPU ``torch.Generator`` (so the parameters of a
seed are the same whatever the device; only the noise fields are drawn on the device).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from custom.fields import _legendre, poly_terms
from custom.transforms.augmentations import mri_augmentations

__all__ = [
    "to_device",
    "augment_settings",
    "SpatialDraw",
    "sample_spatial",
    "warp",
    "view_to_window",
    "legendre_fields",
    "legendre_at_points",
    "ArtefactDraw",
    "sample_artefacts",
    "bias_field_",
    "gibbs_ringing_",
    "rician_",
    "cuboid_dropout_",
    "batched_percentile",
    "normalise_views",
    "zscore_views_",
]

_F64 = torch.float64
_NOT_AUGMENT = ("keys", "patch_size", "label_keys", "crop_keys")


def to_device(t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (and ``dtype``). A small CPU tensor bound for a GPU goes through pinned memory without
    blocking: a copy from pageable memory would wait for all the work queued on the device, and the batch call
    moves dozens of parameter tensors."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _on_host(t: torch.Tensor) -> bool:
    """True for CPU tensors: there, checking a flag costs less than a pass over the data; on a GPU it would wait."""
    return t.device.type == "cpu"


def augment_settings(augment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The per-sample path's augmentation settings: :func:`mri_augmentations`' defaults updated by ``augment``.

    Raises ``ValueError`` for the keys the view transforms set themselves and ``TypeError`` for unknown names,
    as the per-sample path does.
    """
    params = inspect.signature(mri_augmentations).parameters
    defaults = {k: p.default for k, p in params.items() if k not in _NOT_AUGMENT}
    given = dict(augment or {})
    for forbidden in _NOT_AUGMENT:
        if forbidden in given:
            raise ValueError(f"augment must not set {forbidden!r}; ContrastiveViewsd sets it")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"unknown augment settings {unknown}; expected names of mri_augmentations: {sorted(defaults)}")
    return {**defaults, **given}


def _uniform(low: float, high: float, shape: Sequence[int], g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=g, dtype=_F64)


def _randint(
    low: torch.Tensor | int, high: torch.Tensor | int, shape: Sequence[int], g: torch.Generator
) -> torch.Tensor:
    """Integers uniform in [low, high] inclusive (tensor bounds broadcast), int64."""
    u = torch.rand(tuple(shape), generator=g, dtype=_F64)
    low_t = torch.as_tensor(low, dtype=_F64)
    span = torch.as_tensor(high, dtype=_F64) - low_t + 1.0
    return torch.minimum(low_t + torch.floor(u * span), low_t + span - 1.0).long()


# ------------------------------------------------------------------------------------------------------------
# Spatial: rotation, shear, scale, flips
# ------------------------------------------------------------------------------------------------------------
def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """``R_x(a0) R_y(a1) R_z(a2)`` for ``(n, 3)`` angles in radians (MONAI ``create_rotate``, order ``"XYZ"``)."""
    n = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    eye = torch.eye(3, dtype=angles.dtype).expand(n, 3, 3)
    rx, ry, rz = eye.clone(), eye.clone(), eye.clone()
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = c[:, 1], s[:, 1], -s[:, 1], c[:, 1]
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = c[:, 2], -s[:, 2], s[:, 2], c[:, 2]
    return rx @ ry @ rz


_SHEAR_INDICES = ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))


def _shears(coefs: torch.Tensor) -> torch.Tensor:
    """MONAI ``create_shear`` for ``(n, 6)`` coefficients: elementary shears pre-multiplied in coefficient order."""
    n = coefs.shape[0]
    out = torch.eye(3, dtype=coefs.dtype).expand(n, 3, 3).clone()
    for c, (i, j) in enumerate(_SHEAR_INDICES):
        step = torch.eye(3, dtype=coefs.dtype).expand(n, 3, 3).clone()
        step[:, i, j] = coefs[:, c]
        out = step @ out
    return out


@dataclass
class SpatialDraw:
    """Per-view spatial parameters: ``matrix`` ``(n, 3, 3)`` float64 maps output offsets from the patch centre to
    input offsets from the crop centre (rotation, shear, scale, then the flips: ``A @ diag(+-1)``)."""

    matrix: torch.Tensor
    affine_applied: torch.Tensor
    flips: torch.Tensor


def sample_spatial(n: int, settings: Mapping[str, Any], g: torch.Generator) -> SpatialDraw:
    """Draw the rotation / shear / scale (with probability ``affine_prob``) and the flips of ``n`` views."""
    applied = torch.rand(n, generator=g, dtype=_F64) < float(settings["affine_prob"])
    a = torch.eye(3, dtype=_F64).expand(n, 3, 3).clone()
    rot = math.radians(float(settings["rotate_deg"]))
    if rot > 0:
        a = a @ _rotations(_uniform(-rot, rot, (n, 3), g))
    shear = float(settings["shear"])
    if shear > 0:
        a = a @ _shears(_uniform(-shear, shear, (n, 6), g))
    scale = float(settings["scale"])
    if scale > 0:
        a = a @ torch.diag_embed(1.0 + _uniform(-scale, scale, (n, 3), g))
    a = torch.where(applied[:, None, None], a, torch.eye(3, dtype=_F64).expand(n, 3, 3))
    flips = torch.rand((n, 3), generator=g, dtype=_F64) < float(settings["flip_prob"])
    signs = torch.where(flips, -1.0, 1.0).to(_F64)
    return SpatialDraw(matrix=a * signs[:, None, :], affine_applied=applied, flips=flips)


def view_to_window(matrix: torch.Tensor, centre_in: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """``(n, 4, 4)`` float64 voxel maps from a view's voxel index to its window's (crop's) voxel index.

    ``x_window = centre_in + matrix @ (i - (out_shape - 1) / 2)``; ``centre_in`` ``(n, 3)`` is the crop centre in
    window voxels.
    """
    n = matrix.shape[0]
    centre_out = (torch.tensor([float(s) for s in out_shape], dtype=_F64) - 1.0) / 2.0
    m = matrix.to(_F64)
    out = torch.eye(4, dtype=_F64).expand(n, 4, 4).clone()
    out[:, :3, :3] = m
    out[:, :3, 3] = centre_in.to(_F64) - m @ centre_out
    return out


def _integer_crop(matrix: torch.Tensor, centre_in: torch.Tensor, size_in: Sequence[int], out_shape: Sequence[int]):
    """For a view whose matrix is a diagonal of +-1 and whose samples fall on whole voxels inside the input: the
    input box start and the flipped axes (resampling is then a copy), else None."""
    diag = torch.diagonal(matrix)
    if not bool(torch.equal(matrix, torch.diag_embed(diag))) or not bool((diag.abs() == 1).all()):
        return None
    half_out = torch.tensor([(float(s) - 1.0) / 2.0 for s in out_shape], dtype=_F64)
    first = centre_in.to(_F64) - half_out  # input position of output voxel 0 along an unflipped axis
    if not bool(torch.equal(first, torch.round(first))):
        return None
    start = [int(v) for v in first.tolist()]
    if any(a < 0 or a + int(o) > int(n) for a, o, n in zip(start, out_shape, size_in, strict=True)):
        return None
    return start, [axis for axis in range(3) if float(diag[axis]) < 0]


def warp(images: torch.Tensor, matrix: torch.Tensor, centre_in: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """Resample ``images`` ``(n, 1, *c)`` to ``(n, 1, *out_shape)`` (trilinear, zeros outside): output voxel ``i``
    reads the input at ``centre_in + matrix @ (i - (out_shape - 1) / 2)`` (voxel indices; one ``grid_sample``).

    Views that only crop and flip (no rotation, shear or scale: ``affine_prob``) are copied instead of
    interpolated (the same values: their samples fall on whole voxels).
    """
    n = images.shape[0]
    out_shape = tuple(int(s) for s in out_shape)
    crops = [_integer_crop(matrix[i], centre_in[i], images.shape[2:], out_shape) for i in range(n)]
    if all(c is not None for c in crops):
        out = images.new_empty((n, 1, *out_shape))
        for i, (start, flipped) in enumerate(crops):  # type: ignore[misc]
            box = images[(i, slice(None), *(slice(a, a + o) for a, o in zip(start, out_shape, strict=True)))]
            out[i] = torch.flip(box, dims=[a + 1 for a in flipped]) if flipped else box
        return out
    size_in = torch.tensor([float(s) for s in images.shape[2:]], dtype=_F64)
    size_out = torch.tensor([float(s) for s in out_shape], dtype=_F64)
    half_in = torch.clamp(size_in - 1.0, min=1.0) / 2.0
    half_out = (size_out - 1.0) / 2.0
    # normalised coordinates (align_corners=True): n = x / half - 1
    lin = matrix.to(_F64) * half_out[None, None, :] / half_in[None, :, None]
    shift = centre_in.to(_F64) / half_in - 1.0
    # grid_sample orders coordinates (x, y, z) = (last, middle, first) axis
    theta = torch.cat([lin.flip(1).flip(2), shift.flip(1)[:, :, None]], dim=2)
    theta = to_device(theta, images.device, images.dtype)
    grid = F.affine_grid(theta, [n, 1, *[int(s) for s in out_shape]], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------------------------------------------------
# Smooth polynomial fields (bias, B1)
# ------------------------------------------------------------------------------------------------------------
def _coefficient_table(coeffs: torch.Tensor, degree: int) -> torch.Tensor:
    terms = poly_terms(degree)
    if coeffs.shape[-1] != len(terms):
        raise ValueError(f"degree {degree} needs {len(terms)} coefficients, got {coeffs.shape[-1]}")
    table = torch.zeros((coeffs.shape[0],) + (degree + 1,) * 3, dtype=coeffs.dtype, device=coeffs.device)
    for t, (i, j, k) in enumerate(terms):
        table[:, i, j, k] = coeffs[:, t]
    return table


def legendre_fields(
    coeffs: torch.Tensor,
    degree: int,
    shape: Sequence[int],
    *,
    offsets: torch.Tensor | None = None,
    full_shapes: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`custom.fields.polynomial_log_field` for ``n`` coefficient sets: ``(n, *shape)``.

    ``coeffs`` ``(n, T)``; ``offsets`` ``(n, 3)`` voxel index of each box's first voxel in its volume and
    ``full_shapes`` ``(n, 3)`` the volumes' shapes (defaults: 0 and ``shape``), so a box of the field equals the
    field of the volume cropped there.
    """
    n = coeffs.shape[0]
    table = _coefficient_table(to_device(coeffs, device, dtype), degree)
    offsets = None if offsets is None else to_device(offsets, device, dtype)
    full_shapes = None if full_shapes is None else to_device(full_shapes, device, dtype)
    bases = []
    for axis, size in enumerate(shape):
        idx = torch.arange(int(size), device=device, dtype=dtype).expand(n, int(size))
        if offsets is not None:
            idx = idx + offsets[:, axis : axis + 1]
        full = (
            full_shapes[:, axis : axis + 1]
            if full_shapes is not None
            else torch.full((n, 1), float(size), device=device, dtype=dtype)
        )
        bases.append(_legendre(2.0 * idx / torch.clamp(full - 1.0, min=1.0) - 1.0, degree))
    return torch.einsum("nijk,inx,jny,knz->nxyz", table, *bases)


def legendre_at_points(
    coeffs: torch.Tensor,
    degree: int,
    points: torch.Tensor,
    full_shapes: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The log-field of ``coeffs`` ``(n, T)`` at voxel coordinates ``points`` ``(n, K, 3)`` of volumes of
    ``full_shapes`` ``(n, 3)``: ``(n, K)`` (on the points' device)."""
    device = points.device
    table = _coefficient_table(to_device(coeffs, device, dtype), degree)
    full = to_device(full_shapes, device, dtype)
    bases = [
        _legendre(2.0 * points[..., a].to(dtype) / torch.clamp(full[:, a : a + 1] - 1.0, min=1.0) - 1.0, degree)
        for a in range(3)
    ]
    return torch.einsum("nijk,inq,jnq,knq->nq", table, *bases)


# ------------------------------------------------------------------------------------------------------------
# Intensity artefacts
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ArtefactDraw:
    """Per-view artefact parameters (CPU tensors): which views get each artefact and its strength."""

    bias_applied: torch.Tensor  # (n,) bool
    bias_coeffs: torch.Tensor  # (n, T) float64
    gibbs_applied: torch.Tensor  # (n,) bool
    gibbs_alpha: torch.Tensor  # (n,) float64
    noise_applied: torch.Tensor  # (n,) bool
    noise_sigma: torch.Tensor  # (n,) float64
    boxes_start: torch.Tensor  # (n, H, 3) int64
    boxes_end: torch.Tensor  # (n, H, 3) int64 (exclusive; start == end for unused boxes)

    def select(self, index: torch.Tensor) -> ArtefactDraw:
        return ArtefactDraw(**{k: v[index] for k, v in vars(self).items()})


def sample_artefacts(n: int, settings: Mapping[str, Any], patch: Sequence[int], g: torch.Generator) -> ArtefactDraw:
    """Draw the bias field, Gibbs, noise and cuboid-dropout parameters of ``n`` views (per-sample laws)."""
    degree = int(settings["bias_degree"])
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    bias_low, bias_high = (float(v) for v in settings["bias_coeff"])
    bias_applied = torch.rand(n, generator=g, dtype=_F64) < float(settings["bias_prob"])
    bias_coeffs = _uniform(bias_low, bias_high, (n, len(poly_terms(degree))), g)

    alpha = tuple(float(v) for v in settings["gibbs_alpha"])
    if len(alpha) != 2 or alpha[1] > 1 or alpha[0] < 0 or alpha[0] > alpha[1]:
        raise ValueError(f"gibbs_alpha must be (a, b) with 0 <= a <= b <= 1, got {settings['gibbs_alpha']}")
    gibbs_applied = torch.rand(n, generator=g, dtype=_F64) < float(settings["gibbs_prob"])
    gibbs_alpha = _uniform(alpha[0], alpha[1], (n,), g)

    std = tuple(float(v) for v in settings["noise_std"])
    if std[0] < 0 or std[1] < std[0]:
        raise ValueError(f"std_range must satisfy 0 <= low <= high, got {settings['noise_std']}")
    noise_applied = torch.rand(n, generator=g, dtype=_F64) < float(settings["noise_prob"])
    noise_sigma = _uniform(std[0], std[1], (n,), g)

    holes = tuple(int(v) for v in settings["dropout_holes"])
    if holes[0] < 0 or holes[1] < holes[0]:
        raise ValueError(f"holes must satisfy 0 <= min <= max, got {settings['dropout_holes']}")
    size_min, size_max = settings["dropout_size"]
    dropout_applied = torch.rand(n, generator=g, dtype=_F64) < float(settings["dropout_prob"])
    count = _randint(holes[0], holes[1], (n,), g) * dropout_applied.long()
    h = max(holes[1], 1)
    dims = torch.tensor([int(s) for s in patch], dtype=torch.long)
    hi = torch.clamp(
        torch.minimum(dims // 3 if size_max is None else torch.full_like(dims, int(size_max)), dims), min=1
    )
    lo = torch.clamp(torch.minimum(torch.full_like(dims, int(size_min)), hi), min=1)
    side = _randint(lo, hi, (n, h, 3), g)
    start = _randint(torch.zeros_like(dims), dims - side, (n, h, 3), g)
    used = (torch.arange(h)[None, :] < count[:, None])[..., None]
    return ArtefactDraw(
        bias_applied=bias_applied,
        bias_coeffs=bias_coeffs,
        gibbs_applied=gibbs_applied,
        gibbs_alpha=gibbs_alpha,
        noise_applied=noise_applied,
        noise_sigma=noise_sigma,
        boxes_start=torch.where(used, start, 0),
        boxes_end=torch.where(used, start + side, 0),
    )


def _rows(applied: torch.Tensor) -> list[int] | None:
    """Indices of the applied views, or None when every view is (then whole-batch operations are used)."""
    flags = applied.tolist()
    return None if all(flags) else [i for i, f in enumerate(flags) if f]


def bias_field_(images: torch.Tensor, coeffs: torch.Tensor, degree: int, applied: torch.Tensor) -> torch.Tensor:
    """``images *= exp(field)`` for the ``applied`` views, in place (:class:`~custom.transforms.RandBiasFieldTorchd`:
    the Legendre log-field over each view, coefficients ``coeffs`` ``(n, T)``)."""
    rows = _rows(applied)
    if rows == []:
        return images
    chosen = coeffs if rows is None else coeffs[rows]
    field = torch.exp_(legendre_fields(chosen, degree, images.shape[2:], device=images.device, dtype=torch.float32))
    field = field.to(images.dtype).unsqueeze(1)
    if rows is None:
        return images.mul_(field)
    for j, i in enumerate(rows):
        images[i].mul_(field[j])
    return images


_GIBBS_CACHE: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}


def _gibbs_distances(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(2, X, Y, Z // 2 + 1)`` float64: each real-FFT bin's distance from MONAI's k-space centre, for the bin and
    for its conjugate partner (the spectrum of a real image is Hermitian, so the partner's mask value matters)."""
    key = (shape, str(device))
    if key not in _GIBBS_CACHE:
        dist = []
        for partner in (False, True):
            total = 0.0
            for axis, n in enumerate(shape):
                m = torch.arange(n // 2 + 1 if axis == len(shape) - 1 else n, dtype=_F64)
                if partner:
                    m = torch.remainder(-m, n)
                # the bin's position after fftshift, relative to MONAI's centre (n - 1) / 2
                t = torch.remainder(m + n // 2, n) - (n - 1) / 2.0
                view = [1] * len(shape)
                view[axis] = -1
                total = total + (t**2).reshape(view)
            dist.append(torch.sqrt(total))
        _GIBBS_CACHE[key] = torch.stack(dist).to(device)
    return _GIBBS_CACHE[key]


def gibbs_ringing_(images: torch.Tensor, alpha: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
    """MONAI ``GibbsNoise(alpha)`` for the ``applied`` views of ``images`` ``(n, 1, *S)`` (written into ``images``).

    MONAI keeps the k-space inside a sphere of radius ``(1 - alpha) max(S) sqrt(2) / 2`` around index
    ``(S - 1) / 2`` of the shifted spectrum and returns the real part of the inverse FFT; that equals the inverse
    real FFT of the real FFT times the mask averaged with its conjugate partner's (values 0, 1/2, 1), which is
    what is computed here (half the FFT work).
    """
    rows = _rows(applied)
    if rows == []:
        return images
    shape = tuple(int(s) for s in images.shape[2:])
    dims = tuple(range(-len(shape), 0))
    selected = images if rows is None else images[rows]
    chosen = alpha if rows is None else alpha[rows]
    radius = (1.0 - chosen.to(_F64)) * max(shape) * math.sqrt(2.0) / 2.0
    dist = _gibbs_distances(shape, images.device)
    r = to_device(radius, images.device).reshape(-1, 1, *([1] * len(shape)))
    spectrum = torch.fft.rfftn(selected, dim=dims)
    spectrum.mul_(((dist[0] <= r).to(images.dtype) + (dist[1] <= r).to(images.dtype)).mul_(0.5))
    ringing = torch.fft.irfftn(spectrum, s=shape, dim=dims)
    if rows is None:
        return images.copy_(ringing)
    images[rows] = ringing.to(images.dtype)
    return images


def rician_(
    images: torch.Tensor, sigma: torch.Tensor, applied: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Rician noise (paper eq. 5, :func:`custom.physics.rician_noise`) with one sigma per view, on the ``applied``
    views, written into ``images`` (the others keep their signed values)."""
    rows = _rows(applied)
    if rows == []:
        return images
    s = to_device(sigma, images.device, images.dtype).reshape(-1, *([1] * (images.ndim - 1)))
    real = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    imag = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noisy = torch.hypot(real.mul_(s).add_(images), imag.mul_(s), out=real)
    if rows is None:
        return images.copy_(noisy)
    images[rows] = noisy[rows]
    return images


def cuboid_dropout_(images: torch.Tensor, start: torch.Tensor, end: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Fill each view's boxes ``[start, end)`` (``(n, H, 3)`` voxel indices; empty boxes do nothing) with ``fill``,
    in place."""
    if not bool((end > start).all(dim=-1).any()):
        return images
    device = images.device
    start, end = to_device(start, device), to_device(end, device)
    indicators = []
    for axis, size in enumerate(images.shape[2:]):
        idx = torch.arange(int(size), device=device)
        inside = (idx >= start[:, :, axis : axis + 1]) & (idx < end[:, :, axis : axis + 1])
        indicators.append(inside.to(images.dtype))
    hits = torch.einsum("nhx,nhy,nhz->nxyz", *indicators)
    return images.masked_fill_((hits > 0).unsqueeze(1), float(fill))


# ------------------------------------------------------------------------------------------------------------
# View normalisation
# ------------------------------------------------------------------------------------------------------------
_SUBSAMPLE = 2**18  # as custom.intensity.percentile


def batched_percentile(rows: torch.Tensor, q: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`custom.intensity.percentile` of each row of ``rows`` ``(n, V)``: the ``q``-th percentile of a
    regular subsample of at most ~2**18 values (the same subsample as the per-sample function for a row of the
    same length); with ``valid`` ``(n, V)`` only the valid values count. Returns ``(n,)``."""
    step = max(1, rows.shape[1] // _SUBSAMPLE)
    sub = rows[:, ::step].float()
    if valid is None:
        m = sub.shape[1]
        k = min(max(int(math.ceil(q / 100.0 * m)), 1), m)
        return torch.kthvalue(sub, k, dim=1).values
    ok = valid[:, ::step]
    count = ok.sum(dim=1)
    values = torch.where(ok, sub, torch.full_like(sub, math.inf)).sort(dim=1).values
    k = torch.clamp(torch.ceil(count.to(_F64) * (q / 100.0)).long(), min=1)
    k = torch.minimum(k, torch.clamp(count, min=1))
    return values.gather(1, (k - 1)[:, None]).squeeze(1)


def _percentile_rescale_(rows: torch.Tensor, valid: torch.Tensor | None, low: float, high: float) -> torch.Tensor:
    """:func:`custom.intensity.percentile_rescale` per row, in place."""
    lo = batched_percentile(rows, low, valid)[:, None]
    hi = batched_percentile(rows, high, valid)[:, None]
    span = hi - lo
    ok = span > 0
    rows.sub_(lo).div_(torch.where(ok, span, torch.ones_like(span))).clamp_(0.0, 1.0)
    if not _on_host(rows) or not bool(ok.all()):
        rows.masked_fill_(~ok, 0.0)
    return rows


def _histogram_equalise_(rows: torch.Tensor, valid: torch.Tensor | None, bins: int = 256) -> torch.Tensor:
    """:func:`custom.intensity.histogram_equalise` per row (histogram and range over the valid values); ``rows`` is
    overwritten (used as scratch), the result is returned."""
    n = rows.shape[0]
    if valid is None:
        lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    else:
        lo = torch.where(valid, rows, torch.full_like(rows, math.inf)).amin(dim=1, keepdim=True)
        hi = torch.where(valid, rows, torch.full_like(rows, -math.inf)).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = span > 0
    if bins == 1 or (_on_host(rows) and not bool(ok.any())):
        return torch.zeros_like(rows)
    scaled = rows.sub_(lo).mul_(bins / torch.where(ok, span, torch.ones_like(span)))  # position in bins
    index = scaled.long().clamp_(0, bins - 1)
    if n > 1:
        index += torch.arange(n, device=rows.device)[:, None] * bins
    if valid is not None:
        index.masked_fill_(~valid, n * bins)
    hist = torch.bincount(index.reshape(-1), minlength=n * bins + 1)[: n * bins].reshape(n, bins).to(rows.dtype)
    cdf = torch.cumsum(hist, dim=1)
    cdf = (cdf - cdf[:, :1]) / torch.clamp(cdf[:, -1:] - cdf[:, :1], min=torch.finfo(cdf.dtype).tiny)
    pos = scaled.sub_(0.5).clamp_(0.0, float(bins - 1))  # from the first bin centre; linear between centres
    left = index.copy_(pos).clamp_(max=bins - 2)  # truncation: floor of a non-negative position
    frac = pos.sub_(left)
    out = cdf.gather(1, left)
    out.lerp_(cdf.gather(1, left.add_(1)), frac)
    if not _on_host(rows) or not bool(ok.all()):
        out.masked_fill_(~ok, 0.0)
    return out


def normalise_views(
    images: torch.Tensor,
    norm: str,
    scale: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1-2 of the view normalisation (:func:`custom.intensity.normalise_view`) for every view of ``images``
    ``(n, 1, *S)`` float32 (overwritten: used as scratch): ``"histeq"`` (0.5 / 95 percentile rescale to [0, 1],
    then histogram equalisation, each over the view's own voxels) or ``"robust_max"`` (division by ``scale``
    ``(n,)``). With ``valid`` (bool, the shape of ``images``) the statistics use the valid voxels only and the
    others are set to 0."""
    rows = images.reshape(images.shape[0], -1)
    valid_rows = None if valid is None else valid.reshape(rows.shape)
    if norm == "histeq":
        out = _histogram_equalise_(_percentile_rescale_(rows, valid_rows, 0.5, 95.0), valid_rows)
    elif norm == "robust_max":
        if scale is None:
            raise ValueError("normalise_views: norm 'robust_max' needs the scale")
        out = rows.div_(to_device(scale, rows.device, rows.dtype)[:, None])
    else:
        raise ValueError(f"unknown view normalisation {norm!r}; expected 'histeq' or 'robust_max'")
    if valid_rows is not None:
        out.masked_fill_(~valid_rows, 0.0)
    return out.reshape(images.shape)


def zscore_views_(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`custom.intensity.zscore` per view, in place: ``(x - mean) / std`` over each view's voxels
    (constant -> 0)."""
    rows = images.reshape(images.shape[0], -1)
    rows.sub_(rows.mean(dim=1, keepdim=True))
    std = torch.sqrt(torch.linalg.vecdot(rows, rows) / rows.shape[1])[:, None]  # two-pass, biased (as zscore)
    rows.div_(torch.clamp(std, min=eps))
    return images

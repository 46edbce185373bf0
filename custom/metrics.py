"""Per-subject evaluation metrics and grouped result tables (paper Sec. 4.2-4.3, Tables 1-3).

Metrics (numpy arrays or torch tensors in, Python ``float`` out):

- :func:`dice_per_class` - Dice similarity coefficient per label (dimensionless, in [0, 1]).
- :func:`hd95_mm` - symmetric 95th-percentile Hausdorff distance between mask surfaces, in millimetres.
  Backend: MONAI's :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``, ``spacing=`` the voxel
  size, so distances are physical). ``NaN`` when either mask is empty: the distance is undefined there and
  tables report such cases apart instead of averaging them in (docs/paper-notes.md).
- :func:`psnr` - peak signal-to-noise ratio in dB with ``L`` = (max - min) of the *clean reference* inside the
  brain mask (images are z-scored, so the "maximum value" of the paper must be defined; docs/paper-notes.md).
- :func:`ssim` - 3D structural similarity (MONAI's Gaussian-window SSIM formula, 11^3 window, sigma 1.5 voxels,
  computed separably), optionally averaged inside a mask.
- :func:`segmentation_metrics` - one subject's row: Dice and HD95 per class and their means.

:class:`ResultsTable` (defined in :mod:`custom.tables`, importable from here) holds one row per subject, writes CSV
and Markdown atomically, and summarises metrics per group as mean +- std, ignoring undefined (NaN/inf/missing)
values and counting them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from custom.tables import ResultsTable  # re-exported: the table engine lives in custom.tables

__all__ = [
    "PSNR_CAPTION",
    "ResultsTable",
    "dice_per_class",
    "dice_per_class_flagged",
    "hd95_mm",
    "psnr",
    "psnr_peak",
    "segmentation_metrics",
    "ssim",
]

ArrayLike = np.ndarray | torch.Tensor

#: Caption text for denoising tables, stating how the PSNR peak value ``L`` is defined.
PSNR_CAPTION = (
    "PSNR in dB = 20 log10(L / sqrt(MSE)), with L = max - min of the clean reference image inside the brain mask "
    "and MSE over the brain mask."
)


# ------------------------------------------------------------------------------------------------- helpers


def _to_numpy(x: ArrayLike | Any, name: str) -> np.ndarray:
    """``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from err


def _check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")


def _as_labels(x: ArrayLike, name: str) -> np.ndarray:
    """An integer label volume; floating inputs are accepted only when every value is a whole number."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer labels; got non-integer values (take argmax/threshold first)")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be an integer label volume, got dtype {arr.dtype}")


def _as_mask(x: ArrayLike, name: str) -> np.ndarray:
    """A boolean mask; numeric inputs must contain only 0 and 1 (probabilities are refused, binarise first)."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1 values); threshold probabilities first")
    return arr.astype(bool)


def _as_float_image(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x, name).astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def _optional_mask(mask: ArrayLike | None, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    m = _as_mask(mask, name)
    if m.shape != shape:
        raise ValueError(f"{name} must have the image shape {shape}, got {m.shape}")
    if not m.any():
        raise ValueError(f"{name} is empty: no voxel to evaluate")
    return m


# ------------------------------------------------------------------------------------------------- Dice


def dice_per_class_flagged(
    pred_labels: ArrayLike, ref_labels: ArrayLike, classes: Sequence[int]
) -> tuple[dict[int, float], list[int]]:
    """Dice per class, and the classes that are absent from both volumes.

    Dice = 2 |P & R| / (|P| + |R|) for the voxels labelled ``c`` in prediction (P) and reference (R).
    A class absent from both volumes gets Dice 1.0 (nothing to find, nothing found) and is listed in the second
    return value so callers can report it; a class present in exactly one of them gets 0.0.

    Args:
        pred_labels: predicted integer label volume (numpy or torch, any shape).
        ref_labels: reference label volume of the same shape.
        classes: label values to evaluate.

    Returns:
        ``({class: dice}, [classes empty in both])``.
    """
    pred = _as_labels(pred_labels, "pred_labels")
    ref = _as_labels(ref_labels, "ref_labels")
    _check_same_shape(pred, ref, ("pred_labels", "ref_labels"))
    scores: dict[int, float] = {}
    both_empty: list[int] = []
    for c in classes:
        c = int(c)
        p = pred == c
        r = ref == c
        denom = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
        if denom == 0:
            scores[c] = 1.0
            both_empty.append(c)
        else:
            scores[c] = 2.0 * int(np.count_nonzero(p & r)) / denom
    return scores, both_empty


def dice_per_class(pred_labels: ArrayLike, ref_labels: ArrayLike, classes: Sequence[int]) -> dict[int, float]:
    """Dice similarity coefficient (dimensionless, 0-1) per class of two integer label volumes.

    Empty in both -> 1.0 (see :func:`dice_per_class_flagged` for the list of such classes); empty in exactly
    one -> 0.0. Raises ``ValueError`` naming both shapes when they differ.
    """
    return dice_per_class_flagged(pred_labels, ref_labels, classes)[0]


# ------------------------------------------------------------------------------------------------- HD95


def hd95_mm(pred_mask: ArrayLike, ref_mask: ArrayLike, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of two binary masks, in millimetres.

    Surfaces are the foreground voxels removed by one binary erosion; for each surface voxel of one mask the
    Euclidean distance (scaled by ``spacing``) to the nearest surface voxel of the other mask is taken, the 95th
    percentile of each directed set is computed, and the larger of the two is returned. This is MONAI's
    ``compute_hausdorff_distance(..., percentile=95, spacing=spacing)`` (MONAI >= 1.2 supports physical spacing).

    Args:
        pred_mask: binary mask (bool or 0/1), spatial shape ``(X, Y, Z)``; a leading singleton channel is allowed.
        ref_mask: binary mask of the same shape.
        spacing: voxel size per spatial axis in mm (e.g. NIfTI ``pixdim[1:4]``), same order as the array axes.

    Returns:
        HD95 in mm; ``0.0`` for identical non-empty masks; ``float('nan')`` when either mask is empty (undefined:
        report such cases apart rather than averaging them).
    """
    pred = _as_mask(pred_mask, "pred_mask")
    ref = _as_mask(ref_mask, "ref_mask")
    _check_same_shape(pred, ref, ("pred_mask", "ref_mask"))
    spacing = [float(s) for s in spacing]
    if pred.ndim == len(spacing) + 1 and pred.shape[0] == 1:
        pred, ref = pred[0], ref[0]
    if pred.ndim != len(spacing):
        raise ValueError(f"spacing has {len(spacing)} values but the masks have spatial shape {pred.shape}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite (mm), got {spacing}")
    if not pred.any() or not ref.any():
        return float("nan")

    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.5-1.6 warns about its own internal use of a deprecated get_mask_edges argument on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],  # MONAI wants one-hot, batch-first: (B=1, C=1, *spatial)
            torch.from_numpy(ref)[None, None],
            include_background=True,  # our single channel is the foreground
            percentile=95,
            spacing=spacing,
        )
    return float(value.reshape(-1)[0])


# ------------------------------------------------------------------------------------------------- PSNR / SSIM


def psnr_peak(ref: ArrayLike, mask: ArrayLike | None = None) -> float:
    """The PSNR peak value ``L``: max - min of the clean reference inside ``mask`` (whole image if ``None``).

    Units are those of the image intensities (z-scores for the denoising bundle).
    """
    r = _as_float_image(ref, "ref")
    m = _optional_mask(mask, r.shape)
    values = r[m] if m is not None else r
    return float(values.max() - values.min())


def psnr(pred: ArrayLike, ref: ArrayLike, mask: ArrayLike | None = None, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``PSNR = 20 log10(L / sqrt(MSE))``.

    ``L`` is (max - min) of the CLEAN reference ``ref`` within the brain ``mask`` (whole image without a mask),
    because the images are z-scored and the paper's "maximum pixel value" must be defined (docs/paper-notes.md);
    ``data_range`` overrides it. ``MSE`` is the mean squared difference over the mask (or the whole image).
    Computed in float64.

    Returns:
        PSNR in dB; ``inf`` when ``pred`` equals ``ref`` on the evaluated voxels (MSE = 0); ``nan`` when
        ``L`` is 0 (a constant reference) and the images differ.
    """
    p = _as_float_image(pred, "pred")
    r = _as_float_image(ref, "ref")
    _check_same_shape(p, r, ("pred", "ref"))
    m = _optional_mask(mask, r.shape)
    if m is not None:
        p, r = p[m], r[m]
    peak = float(r.max() - r.min()) if data_range is None else float(data_range)
    mse = float(np.mean((p - r) ** 2))
    if mse == 0.0:
        return float("inf")
    if peak <= 0.0:
        return float("nan")
    return 20.0 * math.log10(peak / math.sqrt(mse))


def _gaussian_window_1d(win_size: int, sigma: float) -> np.ndarray:
    """Normalised 1D Gaussian taps at offsets -(win_size-1)/2 ... (win_size-1)/2 (as in MONAI's SSIM), float64."""
    offsets = np.arange(win_size, dtype=np.float64) - (win_size - 1) / 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def ssim(
    pred: ArrayLike,
    ref: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
) -> float:
    """3D structural similarity index (dimensionless, at most 1).

    The formula and window of MONAI's ``SSIMMetric`` (``monai.metrics.regression.compute_ssim_and_cs``):
    Gaussian window ``win_size``^3 with standard deviation ``sigma`` voxels, K1 = 0.01, K2 = 0.03, "valid"
    windows only (the map is ``win_size - 1`` voxels shorter per axis). The 3D Gaussian is separable, so it is
    applied as three 1D passes (``scipy.ndimage.correlate1d``, float64): about 6x faster on the CPU than MONAI's
    dense 11^3 float32 convolution of a whole brain, and equal to ``SSIMMetric(spatial_dims=3, data_range=L)``
    to float32 precision without a mask (tested). With a mask the SSIM map is averaged over the windows whose
    centre lies in the mask.

    Args:
        pred: predicted (denoised) image, spatial shape ``(X, Y, Z)``, each side >= ``win_size``.
        ref: clean reference image, same shape.
        mask: optional brain mask; also restricts the range used for the default ``data_range``.
        data_range: intensity range for the stability constants; default ``L`` as in :func:`psnr`.
        win_size: odd window side in voxels.
        sigma: Gaussian window standard deviation in voxels.
    """
    p = _as_float_image(pred, "pred")
    r = _as_float_image(ref, "ref")
    _check_same_shape(p, r, ("pred", "ref"))
    if p.ndim != 3:
        raise ValueError(f"ssim expects 3D images (X, Y, Z), got shape {p.shape}")
    if win_size % 2 != 1 or min(p.shape) < win_size:
        raise ValueError(f"ssim needs an odd win_size no larger than every side; got {win_size} for {p.shape}")
    m = _optional_mask(mask, r.shape)
    if data_range is None:
        data_range = psnr_peak(r, m)
    if data_range <= 0:
        raise ValueError("ssim: data_range is 0 (constant reference); pass data_range explicitly")

    taps = _gaussian_window_1d(win_size, sigma)
    half = win_size // 2
    valid = tuple(slice(half, n - half) for n in p.shape)  # windows lying wholly inside the image

    def local_mean(volume: np.ndarray) -> np.ndarray:
        for axis in range(3):
            volume = ndimage.correlate1d(volume, taps, axis=axis, mode="constant")
        return volume[valid]

    mu_x, mu_y = local_mean(p), local_mean(r)
    mu_xx, mu_yy, mu_xy = local_mean(p * p), local_mean(r * r), local_mean(p * r)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    var_x = mu_xx - mu_x * mu_x
    var_y = mu_yy - mu_y * mu_y
    cov = mu_xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    if m is None:
        return float(ssim_map.mean())
    centre = m[valid]
    if not centre.any():
        raise ValueError(f"mask has no voxel at least {half} voxels from the image border; cannot average SSIM")
    return float(ssim_map[centre].mean())


# ------------------------------------------------------------------------------------------------- one subject


def segmentation_metrics(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: Sequence[float],
    classes: Sequence[int],
    class_names: Sequence[str] | None = None,
) -> dict[str, float | int]:
    """Dice and HD95 (mm) per class for one subject, flattened into a table row.

    Keys: ``dice_<name>``, ``hd95_<name>`` per class; ``dice_mean`` (over all classes, a class empty in both
    volumes counting 1.0), ``hd95_mean`` (mean over the classes where HD95 is defined, NaN when none is),
    ``hd95_n_undefined`` (classes with an empty prediction or reference), ``dice_n_both_empty``.

    Args:
        pred: predicted integer label volume (spatial shape, or with a leading singleton channel).
        ref: reference label volume, same shape.
        spacing: voxel size in mm per spatial axis.
        classes: label values to evaluate (e.g. ``(1, 2, 3)`` for GM, WM, CSF; background excluded).
        class_names: column names per class (default: the label values).
    """
    if class_names is None:
        class_names = [str(c) for c in classes]
    if len(class_names) != len(classes):
        raise ValueError(f"class_names ({len(class_names)}) and classes ({len(classes)}) differ in length")
    if len(classes) == 0:
        raise ValueError("classes is empty")
    p = _as_labels(pred, "pred")
    r = _as_labels(ref, "ref")
    _check_same_shape(p, r, ("pred", "ref"))
    dice, both_empty = dice_per_class_flagged(p, r, classes)
    row: dict[str, float | int] = {}
    hd_values: list[float] = []
    for c, name in zip(classes, class_names, strict=True):
        row[f"dice_{name}"] = dice[int(c)]
        hd = hd95_mm(p == c, r == c, spacing)
        row[f"hd95_{name}"] = hd
        hd_values.append(hd)
    defined = [v for v in hd_values if math.isfinite(v)]
    row["dice_mean"] = float(np.mean([dice[int(c)] for c in classes]))
    row["hd95_mean"] = float(np.mean(defined)) if defined else float("nan")
    row["hd95_n_undefined"] = len(hd_values) - len(defined)
    row["dice_n_both_empty"] = len(both_empty)
    return row

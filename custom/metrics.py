"""Per-subject evaluation metrics and grouped result tables (paper Sec. 4.2-4.3, Tables 1-3).

Metrics (numpy arrays or torch tensors in, Python ``float`` out):

- :func:`dice_per_class` - Dice similarity coefficient per label (dimensionless, in [0, 1]).
- :func:`hd95_mm` - symmetric 95th-percentile Hausdorff distance between mask surfaces, in millimetres.
  Backend: MONAI's :func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``, ``spacing=`` the voxel
  size, so distances are physical). ``NaN`` when either mask is empty: the distance is undefined there and
  tables report such cases apart instead of averaging them in (paper/NOTES.md).
- :func:`psnr` - peak signal-to-noise ratio in dB with ``L`` = (max - min) of the *clean reference* inside the
  brain mask (images are z-scored, so the "maximum value" of the paper must be defined; paper/NOTES.md).
- :func:`ssim` - 3D structural similarity (MONAI's Gaussian-window SSIM formula, 11^3 window, sigma 1.5 voxels,
  computed separably), optionally averaged inside a mask.
- :func:`segmentation_metrics` - one subject's row: Dice and HD95 per class and their means.

:class:`ResultsTable` holds one row per subject (``subject``, ``site``, ``contrast``, ... and metric columns),
writes CSV and Markdown atomically, and summarises metrics per group as mean +- std, ignoring undefined
(NaN/inf/missing) values and counting them.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from custom.io import atomic_path, atomic_write_text

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

#: Placeholder shown in Markdown cells where a group has no defined value for a metric.
NOT_AVAILABLE = "n/a"


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
    because the images are z-scored and the paper's "maximum pixel value" must be defined (paper/NOTES.md);
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


# ------------------------------------------------------------------------------------------------- tables


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` when the value is undefined (None, "", NaN, inf). Raises on text."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in {"n/a", "na", "none"}:
            return None
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"not a number: {value!r}") from err
    return x if math.isfinite(x) else None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _rank(values: list[Any], order: Sequence[Any] | None) -> dict[Any, int]:
    """Rank of each value: listed ones in ``order``'s order, then the others by first appearance."""
    ranks: dict[Any, int] = {}
    listed = list(dict.fromkeys(v for v in (order or []) if v in values))
    for i, v in enumerate(listed):
        ranks[v] = i
    for v in values:
        if v not in ranks:
            ranks[v] = len(ranks)
    return ranks


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class ResultsTable:
    """Per-subject results: one row (a ``dict``) per subject, e.g. ``subject``, ``site``, ``contrast`` and metrics.

    Undefined metric values (NaN, inf, ``None``, empty strings) are kept in the rows, excluded from means and
    standard deviations, and counted (``n_undefined``) in :meth:`summary` and the Markdown captions.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one subject's row."""
        self.rows.append(dict(row))

    @property
    def columns(self) -> list[str]:
        """All column names, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for k in row:
                seen.setdefault(k, None)
        return list(seen)

    def metric_columns(self, exclude: Iterable[str] = ()) -> list[str]:
        """Columns whose values are all numbers or undefined (and at least one is a number), minus ``exclude``.

        Count columns (``n_*`` or ``*_n_*``, e.g. ``hd95_n_undefined``) are not metrics and are left out.
        """
        excluded = set(exclude)
        out = []
        for col in self.columns:
            if col in excluded or col.startswith("n_") or "_n_" in col:
                continue
            values = [r.get(col) for r in self.rows]
            present = [v for v in values if v is not None and v != ""]
            if present and all(_is_number(v) for v in present):
                out.append(col)
        return out

    # -------------------------------------------------------------------------------------- CSV

    def to_csv(self, path: str | Path) -> Path:
        """Write all rows to ``path`` as CSV (atomically). Missing cells are empty; NaN is written as ``nan``."""
        columns = self.columns
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, restval="")
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
        return Path(path)

    @classmethod
    def from_csv(
        cls, path: str | Path, text_columns: Sequence[str] = ("subject", "site", "contrast", "model")
    ) -> ResultsTable:
        """Read a table written by :meth:`to_csv`.

        Columns in ``text_columns`` stay strings (so subject ``"002"`` keeps its zeros); any other column whose
        non-empty cells all parse as numbers becomes float (``nan``/``inf`` included; empty cells become NaN).
        """
        with open(path, newline="") as fh:
            raw = list(csv.DictReader(fh))
        if not raw:
            return cls()
        numeric = []
        for col in raw[0]:
            if col in text_columns:
                continue
            cells = [r[col] for r in raw if r.get(col) not in (None, "")]
            try:
                [float(c) for c in cells]
            except ValueError:
                continue
            numeric.append(col)
        rows = []
        for r in raw:
            row: dict[str, Any] = dict(r)
            for col in numeric:
                row[col] = float(r[col]) if r.get(col) not in (None, "") else float("nan")
            rows.append(row)
        return cls(rows)

    # -------------------------------------------------------------------------------------- summary

    def _groups(self, group_by: Sequence[str]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for i, row in enumerate(self.rows):
            missing = [k for k in group_by if k not in row]
            if missing:
                raise ValueError(f"row {i} ({row.get('subject', '?')}) has no {missing} column to group by")
            groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
        return groups

    @staticmethod
    def _stats(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float | int]:
        values, undefined = [], 0
        for row in rows:
            try:
                x = _number(row.get(metric))
            except ValueError as err:
                raise ValueError(f"column {metric!r}, subject {row.get('subject', '?')}: {err}") from err
            if x is None:
                undefined += 1
            else:
                values.append(x)
        n = len(values)
        mean = float(np.mean(values)) if n else float("nan")
        std = float(np.std(values, ddof=1)) if n > 1 else float("nan")
        return {"mean": mean, "std": std, "n": n, "n_undefined": undefined}

    def summary(
        self, group_by: Sequence[str] = ("site", "contrast"), metrics: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Mean, sample standard deviation (ddof=1), n and n_undefined of each metric per group.

        NaN/inf/missing values are ignored per metric and counted in ``n_undefined``; ``mean`` is NaN only when
        a group has no defined value, ``std`` is NaN when it has fewer than two.

        Returns:
            One flat dict per group (groups in order of first appearance): the ``group_by`` keys, ``n_subjects``,
            and ``<metric>:mean``, ``<metric>:std``, ``<metric>:n``, ``<metric>:n_undefined`` per metric -
            ready for ``ResultsTable(table.summary()).to_csv(path)``.
        """
        group_by = tuple(group_by)
        if metrics is None:
            metrics = self.metric_columns(exclude=(*group_by, "subject"))
        out = []
        for key, rows in self._groups(group_by).items():
            entry: dict[str, Any] = dict(zip(group_by, key, strict=True))
            entry["n_subjects"] = len(rows)
            for m in metrics:
                for stat, value in self._stats(rows, m).items():
                    entry[f"{m}:{stat}"] = value
            out.append(entry)
        return out

    # -------------------------------------------------------------------------------------- Markdown

    @staticmethod
    def _cell(stats: Mapping[str, float | int], fmt: str, scale: float) -> str:
        if stats["n"] == 0:
            return NOT_AVAILABLE
        mean = fmt.format(stats["mean"] * scale)
        if stats["n"] < 2:
            return mean
        return f"{mean} ± {fmt.format(stats['std'] * scale)}"

    @staticmethod
    def _row_label(key: tuple[Any, ...]) -> str:
        """Paper style: ``GST [T1w]`` for (site, contrast); ``GST`` for one key; ``GST [T1w, 10%]`` for three."""
        if len(key) == 1:
            return str(key[0])
        return f"{key[0]} [{', '.join(str(k) for k in key[1:])}]"

    def to_markdown(
        self,
        group_by: Sequence[str] = ("site", "contrast"),
        metrics: Sequence[str] | None = None,
        caption: str | None = None,
        row_order: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None,
        col_order: Sequence[Any] | None = None,
        fmt: str = "{:.3f}",
        col_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
    ) -> str:
        """A Markdown table of "mean ± std" cells laid out like the paper's Tables 1-3, with a caption line under it.

        Rows are the groups of ``group_by`` (labelled ``GST [T1w]`` for site and contrast, as in the paper);
        columns are the ``metrics``, or, when ``col_key`` is given (e.g. ``"contrast"`` or ``"model"``), one
        column per metric and value of that key - the Table 1 grid. A group with no defined value shows ``n/a``;
        one defined value shows the mean alone. The caption line gives ``caption``, the statistics used and how
        many undefined values (e.g. HD95 with an empty mask) each metric had, and where.

        Args:
            group_by: row keys.
            metrics: metric columns (default: every numeric column not used as a key).
            caption: text for the caption line (e.g. :data:`PSNR_CAPTION`).
            row_order: order of the first ``group_by`` key's values (e.g. ``["GST", "HH", "IOP"]``), or a mapping
                ``{key: [values...]}`` for several keys; unlisted values follow in order of first appearance.
            col_order: order of ``col_key`` values (unlisted ones follow).
            fmt: format of means and standard deviations.
            col_key: optional key whose values become columns.
            labels: display names for metrics (e.g. ``{"dice_mean": "DSC", "hd95_mean": "HD95 (mm)"}``).
            scale: per-metric display factor (e.g. ``{"dice_mean": 100}`` for the paper's percent Dice).
        """
        group_by = tuple(group_by)
        keys = (*group_by, col_key) if col_key else group_by
        if metrics is None:
            metrics = self.metric_columns(exclude=(*keys, "subject"))
        if not metrics:
            raise ValueError("no metric columns to tabulate")
        labels = dict(labels or {})
        scale = dict(scale or {})
        groups = self._groups(keys)

        # rows: sorted by per-key ranks
        row_keys = list(dict.fromkeys(k[: len(group_by)] for k in groups))
        orders: dict[str, Sequence[Any] | None]
        if isinstance(row_order, Mapping):
            orders = {k: row_order.get(k) for k in group_by}
        else:
            orders = {k: (row_order if i == 0 else None) for i, k in enumerate(group_by)}
        ranks = [_rank(list(dict.fromkeys(rk[i] for rk in row_keys)), orders[k]) for i, k in enumerate(group_by)]
        row_keys.sort(key=lambda rk: tuple(ranks[i][v] for i, v in enumerate(rk)))

        col_values: list[Any] = [None]
        if col_key:
            found = list(dict.fromkeys(k[-1] for k in groups))
            col_rank = _rank(found, col_order)
            col_values = sorted(found, key=col_rank.__getitem__)

        header = [" / ".join(group_by)]
        for m in metrics:
            name = labels.get(m, m)
            header += [f"{name} [{v}]" if col_key else name for v in col_values]
        lines = [
            "| " + " | ".join(_md_escape(h) for h in header) + " |",
            "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        undefined: dict[str, list[tuple[str, int]]] = {m: [] for m in metrics}
        for rk in row_keys:
            cells = [self._row_label(rk)]
            for m in metrics:
                for v in col_values:
                    rows = groups.get((*rk, v) if col_key else rk)
                    if rows is None:
                        cells.append("")
                        continue
                    stats = self._stats(rows, m)
                    cells.append(self._cell(stats, fmt, scale.get(m, 1.0)))
                    if stats["n_undefined"]:
                        where = self._row_label(rk) + (f" ({v})" if col_key else "")
                        undefined[m].append((where, int(stats["n_undefined"])))
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")

        notes = [caption.strip()] if caption else []
        notes.append("Values: mean ± sample std over subjects; n/a: no defined value.")
        for m, where in undefined.items():
            if where:
                total = sum(n for _, n in where)
                detail = "; ".join(f"{w}: {n}" for w, n in where)
                notes.append(
                    f"{labels.get(m, m)}: {total} undefined value(s) excluded (empty prediction or reference, or "
                    f"missing) - {detail}."
                )
        return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"

    def to_markdown_pivot(
        self,
        row_key: str = "site",
        col_key: str = "contrast",
        metric: str | Sequence[str] = "dice_mean",
        **kwargs: Any,
    ) -> str:
        """Table 1 style grid: rows = ``row_key`` values (sites), columns = ``col_key`` values (contrasts) per metric.

        ``metric`` may be one column or several (columns metric x contrast). Other keyword arguments go to
        :meth:`to_markdown` (``caption``, ``row_order``, ``col_order``, ``fmt``, ``labels``, ``scale``).
        """
        metrics = [metric] if isinstance(metric, str) else list(metric)
        return self.to_markdown(group_by=(row_key,), metrics=metrics, col_key=col_key, **kwargs)

    def write_markdown(self, path: str | Path, pivot: bool = False, **kwargs: Any) -> Path:
        """Write :meth:`to_markdown` (or :meth:`to_markdown_pivot` when ``pivot``) output to ``path`` atomically."""
        text = self.to_markdown_pivot(**kwargs) if pivot else self.to_markdown(**kwargs)
        return atomic_write_text(text, path)

"""Per-subject evaluation of a downstream bundle on its test split, written as CSV and a paper-style table.

Predictions are made by :class:`custom.inference.NiftiPredictor` exactly as for a user's scans (in the input's
own grid), and compared with the reference labels on their native grid with their native voxel spacing, so
HD95 is in millimetres of the real data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from custom.errors import InputError
from custom.inference import NiftiPredictor, validate_nifti
from custom.metrics import ResultsTable, segmentation_metrics

__all__ = [
    "check_label_grid",
    "check_labelled_items",
    "combine_tables",
    "evaluate_segmentation",
    "volume_agreement",
    "write_volume_csv",
]

logger = logging.getLogger(__name__)
GRID_TOLERANCE_MM = 1e-3
SITE_ORDER = ("GST", "HH", "IOP")


def check_label_grid(image_path: str | Path, label_path: str | Path) -> None:
    """Raise :class:`InputError` naming ``label_path`` when its voxel grid (shape, affine) differs from the image's."""
    image = validate_nifti(image_path)
    label_path = Path(label_path)
    if not label_path.is_file():
        raise InputError(f"{label_path}: label file not found (for image {image_path})")
    try:
        label = nib.load(str(label_path))
    except Exception as err:
        raise InputError(f"{label_path}: not a readable NIfTI label ({type(err).__name__}: {err})") from err
    if tuple(label.shape[:3]) != tuple(image.shape[:3]):
        raise InputError(
            f"{label_path}: label grid {tuple(label.shape)} differs from its image {image_path} {tuple(image.shape)};"
            " resample the label to the image grid"
        )
    if not np.allclose(label.affine, image.affine, atol=GRID_TOLERANCE_MM):
        raise InputError(
            f"{label_path}: label affine differs from its image {image_path}; resample the label to the image grid"
        )


def check_labelled_items(items: Sequence[Mapping[str, Any]], progress: bool = False) -> list[Mapping[str, Any]]:
    """Check every (image, label) pair of a datalist before training or evaluation (headers only; fast)."""
    for item in tqdm(items, desc="checking labels", disable=not progress, leave=False):
        if item.get("label"):
            check_label_grid(item["image"], item["label"])
    return list(items)


def _load_labels(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return np.rint(data).astype(np.int64), tuple(float(z) for z in img.header.get_zooms()[:3])


def _label_on_image_grid(image_path: str | Path, label_path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The label resampled (nearest neighbour) onto its image's grid, with the image's voxel spacing."""
    from nibabel.processing import resample_from_to

    image = nib.load(str(image_path))
    label = nib.load(str(label_path))
    if tuple(label.shape[:3]) == tuple(image.shape[:3]) and np.allclose(label.affine, image.affine, atol=1e-3):
        return _load_labels(label_path)
    logger.info("%s: label resampled onto the grid of %s", label_path, image_path)
    moved = resample_from_to(label, (image.shape[:3], image.affine), order=0)
    return np.rint(np.asarray(moved.dataobj)).astype(np.int64), tuple(float(z) for z in image.header.get_zooms()[:3])


def volume_agreement(rows: Sequence[Mapping[str, Any]], name: str) -> str:
    """One line on predicted vs reference volume (mL) of class ``name``: bias, mean |difference|, correlation."""
    pred = np.array([float(r[f"volume_ml_pred_{name}"]) for r in rows])
    ref = np.array([float(r[f"volume_ml_ref_{name}"]) for r in rows])
    diff = pred - ref
    corr = float(np.corrcoef(pred, ref)[0, 1]) if len(rows) > 1 and pred.std() > 0 and ref.std() > 0 else float("nan")
    corr_text = f"{corr:.3f}" if np.isfinite(corr) else "n/a (constant volumes)"
    return (
        f"{name} volume (mL), predicted vs reference over {len(rows)} subjects: bias {diff.mean():+.2f}, "
        f"mean |difference| {np.abs(diff).mean():.2f}, Pearson r {corr_text}"
    )


def evaluate_segmentation(
    predictor: NiftiPredictor,
    items: Sequence[Mapping[str, Any]],
    classes: Sequence[int],
    class_names: Sequence[str],
    output_dir: str | Path,
    caption: str = "",
    extra_columns: Mapping[str, Any] | None = None,
    group_by: Sequence[str] = ("site", "contrast"),
    volume_classes: Sequence[int] = (),
    labels_to_image_grid: bool = False,
) -> ResultsTable:
    """Predict every labelled item, score it (Dice per class, HD95 in mm), write ``metrics.csv`` and ``metrics.md``.

    Args:
        predictor: writes each prediction into ``predictor.output_dir`` in the image's own grid.
        items: datalist items with ``image``, ``label`` and optionally ``subject``, ``site``, ``contrast``.
        classes, class_names: the foreground label values scored and their names (e.g. 1..3, GM/WM/CSF).
        output_dir: where ``metrics.csv`` and ``metrics.md`` go (written atomically).
        caption: caption line of the markdown table.
        extra_columns: constant columns added to every row (e.g. ``{"encoder": "seqinv", "fraction": 0.1}``).
        group_by: row groups of the markdown table (``site``, ``contrast``).
        volume_classes: classes whose predicted and reference volumes (mL) are added to each row, with an
            agreement line (bias, mean absolute difference, correlation) in the caption.
        labels_to_image_grid: resample a label on another grid onto its image's (nearest neighbour) instead of
            rejecting it (e.g. ARC lesion masks drawn on another contrast).
    """
    labelled = [item for item in items if item.get("label")]
    if not labelled:
        raise InputError("no labelled test subjects to evaluate")
    rows = []
    names = dict(zip(classes, class_names, strict=True))
    for i, item in enumerate(labelled, start=1):
        if labels_to_image_grid:
            validate_nifti(item["image"])
            ref, spacing = _label_on_image_grid(item["image"], item["label"])
        else:
            check_label_grid(item["image"], item["label"])
            ref, spacing = _load_labels(item["label"])
        result = predictor.predict_file(item["image"])
        pred, _ = _load_labels(result["output"])
        metrics = segmentation_metrics(pred, ref, spacing, classes, class_names)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for c in volume_classes:
            metrics[f"volume_ml_pred_{names[c]}"] = float((pred == c).sum()) * voxel_ml
            metrics[f"volume_ml_ref_{names[c]}"] = float((ref == c).sum()) * voxel_ml
        row = {
            "subject": item.get("subject", Path(item["image"]).name),
            "site": item.get("site", ""),
            "contrast": item.get("contrast", ""),
            **(extra_columns or {}),
            **metrics,
        }
        rows.append(row)
        print(
            f"[{i}/{len(labelled)}] {row['subject']} ({row['site']} {row['contrast']}): "
            f"Dice {metrics['dice_mean']:.3f}, HD95 {metrics['hd95_mean']:.2f} mm"
        )
    table = ResultsTable(rows)
    out = Path(output_dir)
    table.to_csv(out / "metrics.csv")
    metrics_cols = ["dice_mean", "hd95_mean"]
    if len(class_names) > 1:
        metrics_cols += [f"dice_{n}" for n in class_names]
    for c in volume_classes:
        metrics_cols += [f"volume_ml_pred_{names[c]}", f"volume_ml_ref_{names[c]}"]
        caption = f"{caption} {volume_agreement(rows, names[c])}.".strip()
    markdown = table.to_markdown(
        group_by=tuple(group_by), metrics=metrics_cols, caption=caption, row_order=list(SITE_ORDER)
    )
    (out / "metrics.md").parent.mkdir(parents=True, exist_ok=True)
    from custom.io import atomic_write_text

    atomic_write_text(markdown + "\n", out / "metrics.md")
    print(markdown)
    print(f"per-subject metrics: {out / 'metrics.csv'}; table: {out / 'metrics.md'}")
    return table


def combine_tables(
    csv_paths: Sequence[str | Path],
    output_md: str | Path,
    metrics: Sequence[str],
    caption: str = "",
    group_by: Sequence[str] = ("site", "contrast"),
) -> str | None:
    """Merge the ``metrics.csv`` of several runs (e.g. one per contrast) into one paper-style markdown table."""
    from custom.io import atomic_write_text

    rows: list[dict] = []
    for path in sorted(Path(p) for p in csv_paths):
        rows.extend(ResultsTable.from_csv(path).rows)
    for row in rows:  # a run written before a grouping column existed
        for key in group_by:
            row.setdefault(key, "n/a")
    if not rows:
        return None
    markdown = ResultsTable(rows).to_markdown(
        group_by=tuple(group_by), metrics=list(metrics), caption=caption, row_order=list(SITE_ORDER)
    )
    atomic_write_text(markdown + "\n", output_md)
    return markdown


def write_volume_csv(summary: Any, path: str | Path, label: int = 1, name: str = "lesion") -> Path:
    """CSV of the predicted volume (mL) of class ``label`` for every scan an inference run processed."""
    import csv
    import io

    from custom.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "output", f"{name}_volume_ml", f"{name}_voxels"])
    for result in summary.ok:
        volumes = result.get("volume_ml", {})
        voxels = result.get("voxels", {})
        writer.writerow(
            [result["input"], result["output"], f"{float(volumes.get(label, 0.0)):.4f}", int(voxels.get(label, 0))]
        )
    atomic_write_text(buffer.getvalue(), path)
    print(f"{name} volumes: {path}")
    return Path(path)

"""PNG montage of 3D volumes: the middle axial, coronal and sagittal slice of each, in a labelled grid.

An image with an outline (e.g. a lesion mask) is cut through the outlined structure instead of the middle.

Volumes are arrays indexed ``[x, y, z]`` in RAS+ voxel order (as the synthetic data and the MNI152 template).
Slices are shown in the **neurological convention**: the subject's right on the image's right, anterior at the
top of axial slices, superior at the top of coronal and sagittal slices (sagittal: anterior to the right).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from custom.io import atomic_write

__all__ = ["middle_slices", "write_montage"]

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")


def middle_slices(volume: np.ndarray, center: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices through ``center`` (default: the middle) of a ``[x, y, z]`` RAS+
    volume, ready for ``imshow``.

    Each slice is transposed so that with ``origin="lower"`` the first array axis runs left to right on screen
    and the second bottom to top.
    """
    vol = np.asarray(volume)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    cx, cy, cz = center if center is not None else (n // 2 for n in vol.shape)
    return {"axial": vol[:, :, cz].T, "coronal": vol[:, cy, :].T, "sagittal": vol[cx, :, :].T}


def _outline_center(mask: np.ndarray) -> tuple[int, int, int] | None:
    """The mask voxel nearest to the mask's centre of mass (None when empty); it lies inside the mask even when
    the mask has several parts."""
    idx = np.argwhere(np.asarray(mask) > 0.5)
    if idx.size == 0:
        return None
    c = idx[np.argmin(((idx - idx.mean(axis=0)) ** 2).sum(axis=1))]
    return int(c[0]), int(c[1]), int(c[2])


def _display_range(volume: np.ndarray, cmap: str) -> tuple[float, float]:
    """Intensity window: 0 .. 99.5th percentile of the nonzero values (the full range for label maps)."""
    vol = np.asarray(volume, dtype=np.float32)
    finite = vol[np.isfinite(vol)]
    if finite.size == 0:
        return 0.0, 1.0
    if cmap != "gray":
        return float(finite.min()), float(max(finite.max(), finite.min() + 1.0))
    nonzero = finite[finite != 0]
    low = float(min(0.0, finite.min()))
    high = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    return low, high if high > low else low + 1.0


def write_montage(
    path: str | os.PathLike[str],
    images: Mapping[str, np.ndarray],
    title: str = "",
    *,
    outlines: Mapping[str, np.ndarray] | None = None,
    cmaps: Mapping[str, str] | None = None,
    columns: int = 4,
    panel_inches: float = 1.7,
    dpi: int = 90,
) -> Path:
    """Write a PNG with the middle axial, coronal and sagittal slice of every image, labelled with its key.

    An image with an outline is cut through the outline's centre of mass instead of the middle, so the outlined
    structure (a lesion) is visible in all three views.

    Args:
        path: output ``.png`` file; written atomically (:func:`custom.io.atomic_write`: temporary file in the same
            folder, then rename).
        images: title -> 3D array ``[x, y, z]`` in RAS+ voxel order (isotropic voxels are assumed).
        title: figure title.
        outlines: title -> binary 3D mask drawn as a red contour over that image (e.g. a lesion).
        cmaps: title -> matplotlib colormap name (default ``"gray"``; label maps read better with e.g. ``"tab10"``).
        columns: images per row; each image takes three panels.
        panel_inches: width of one panel, inches.
        dpi: resolution of the PNG, dots per inch.

    Returns:
        The path written.
    """
    if not images:
        raise ValueError("write_montage: no images given")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    outlines = outlines or {}
    cmaps = cmaps or {}
    names = list(images)
    columns = max(1, min(columns, len(names)))
    rows = -(-len(names) // columns)
    fig_w = panel_inches * 3 * columns
    fig_h = panel_inches * 1.25 * rows + 0.6
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and nothing left to close.
    fig = Figure(figsize=(fig_w, fig_h), facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3 * columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    wrap = max(20, int(3 * panel_inches * 12))
    for index, name in enumerate(names):
        row, col = divmod(index, columns)
        cmap = cmaps.get(name, "gray")
        vmin, vmax = _display_range(images[name], cmap)
        center = _outline_center(outlines[name]) if name in outlines else None
        slices = middle_slices(images[name], center)
        outline = middle_slices(outlines[name], center) if name in outlines else None
        for v, view in enumerate(VIEWS):
            ax = axes[row, 3 * col + v]
            ax.imshow(slices[view], cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            if outline is not None and np.any(outline[view] > 0.5):
                ax.contour((outline[view] > 0.5).astype(np.float32), levels=[0.5], colors="red", linewidths=0.7)
            if v == 1:
                label = "\n".join(textwrap.wrap(name, wrap))
                ax.set_title(label, color="white", fontsize=7.5, pad=2)
    fig.suptitle(
        (title + "\n" if title else "") + "axial / coronal / sagittal slices (middle, or through the outline), "
        "neurological convention (subject's right on image right)",
        color="white",
        fontsize=9,
    )
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=1 - 0.95 / fig_h, wspace=0.02, hspace=0.35)
    atomic_write(lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor()), out)
    return out

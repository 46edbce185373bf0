"""NIfTI writing of the synthetic data, atomic (:mod:`custom.io`) and on a small thread pool."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.io import atomic_write, atomic_write_text

__all__ = ["save_nifti", "PooledWriter"]


def save_nifti(path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> Path:
    """Write ``data`` as NIfTI-1 (``.nii.gz``) atomically (:func:`custom.io.atomic_write`: temporary file in the
    same folder, then rename).

    The header has the affine as qform and sform (code 1, scanner), zooms = voxel sizes in mm, units mm / s.
    """
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_zooms(tuple(float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))))
    img.header.set_xyzt_units("mm", "sec")
    return atomic_write(lambda tmp: nib.save(img, str(tmp)), path)


class PooledWriter:
    """Writes files on a small thread pool (gzip compression releases the GIL) and collects their paths."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.pending: list[Future[Path]] = []
        self.written: list[Path] = []

    def nifti(self, path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> Path:
        self.pending.append(self.pool.submit(save_nifti, path, data, affine, dtype))
        return path

    def text(self, path: Path, text: str) -> Path:
        self.pending.append(self.pool.submit(atomic_write_text, text, path))
        return path

    def wait(self) -> None:
        for future in self.pending:
            self.written.append(future.result())
        self.pending.clear()

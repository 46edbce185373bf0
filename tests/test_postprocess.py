"""Small-component removal (custom.postprocess) and its use by the NIfTI predictor."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from custom.inference import NiftiPredictor
from custom.postprocess import min_component_voxels, remove_small_components
from custom.preprocess import image_preprocessing


def test_min_component_voxels_uses_the_voxel_volume() -> None:
    assert min_component_voxels(0.1, (1.0, 1.0, 1.0)) == 100
    assert min_component_voxels(0.1, (2.0, 2.0, 2.0)) == 13  # 12.5 voxels of 8 mm^3, rounded up
    assert min_component_voxels(0.0, (1.0, 1.0, 1.0)) == 0
    with pytest.raises(ValueError, match="mL"):
        min_component_voxels(-1.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        min_component_voxels(0.1, (1.0, 0.0, 1.0))


def test_small_components_are_removed_and_large_ones_kept() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels
    labels[15, 15, 15] = 1  # 1 voxel
    labels[12:14, 2:4, 2:4] = 1  # 8 voxels
    labels[17:19, 17:19, 17:19] = 2  # another class, 8 voxels
    out, removed = remove_small_components(labels, min_voxels=9, classes=[1])
    assert removed == 2
    assert out[2:8, 2:8, 2:8].all() and out[15, 15, 15] == 0 and not out[12:14, 2:4, 2:4].any()
    assert (out[17:19, 17:19, 17:19] == 2).all()  # not a cleaned class
    assert labels[15, 15, 15] == 1  # input untouched
    everything, removed_all = remove_small_components(labels, min_voxels=9)
    assert removed_all == 3 and not (everything == 2).any()


def test_diagonal_neighbours_form_one_component() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    for i in range(5):
        labels[i, i, i] = 1  # a 5-voxel diagonal line: one component under 26-connectivity
    out, removed = remove_small_components(labels, min_voxels=5)
    assert removed == 0 and out.sum() == 5
    out, removed = remove_small_components(labels, min_voxels=6)
    assert removed == 1 and out.sum() == 0


def test_min_voxels_of_one_or_less_changes_nothing() -> None:
    labels = (np.random.default_rng(0).random((8, 8, 8)) > 0.7).astype(np.uint8)
    out, removed = remove_small_components(labels, min_voxels=1)
    assert removed == 0 and np.array_equal(out, labels)


class _Threshold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10.0


def test_predictor_drops_specks_below_min_component_ml(tmp_path: Path) -> None:
    data = np.full((24, 24, 24), 0.1, dtype=np.float32)
    data[4:14, 4:14, 4:14] = 1.0  # 1000 voxels of 2 mm: 8 mL
    data[20, 20, 20] = 1.0  # one 8 mm^3 speck: 0.008 mL
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    pre = image_preprocessing(pixdim=(2.0, 2.0, 2.0))
    plain = NiftiPredictor(_Threshold(), None, pre, tmp_path / "plain", num_classes=2).predict_file(path)
    cleaned = NiftiPredictor(
        _Threshold(), None, pre, tmp_path / "clean", num_classes=2, min_component_ml=0.1
    ).predict_file(path)
    assert plain["voxels"][1] == 1001
    assert cleaned["voxels"][1] == 1000 and cleaned["components_removed"] == 1
    assert cleaned["volume_ml"][1] == pytest.approx(8.0)
    written = nib.load(str(cleaned["output"])).get_fdata()
    assert written[20, 20, 20] == 0 and written[4:14, 4:14, 4:14].all()


def test_predictor_rejects_bad_min_component_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mL"):
        NiftiPredictor(_Threshold(), output_dir=tmp_path, min_component_ml=-0.5)
    with pytest.raises(ValueError, match="segmentation' only"):
        NiftiPredictor(_Threshold(), output_dir=tmp_path, task="regression", min_component_ml=0.1)

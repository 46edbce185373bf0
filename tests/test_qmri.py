"""qMRI loading: unit conversion, and clear errors naming the file for bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.data.qmri import LoadQMRId, QMRIError, load_qmri_maps
from custom.errors import InputError

SHAPE = (12, 12, 12)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def brain() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in SHAPE], indexing="ij"))
    return (np.sqrt((grid**2).sum(0)) < 5).astype(np.float32)


def write(folder: Path, name: str, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path = folder / f"sub-01_{name}.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def hmri_maps(folder: Path, **replace: np.ndarray) -> dict[str, Path]:
    """hMRI-toolbox units: PD and MT in percent, R1 and R2* in 1/s."""
    b = brain()
    maps = {"PD": 75.0 * b, "R1": 0.9 * b, "R2s": 18.0 * b, "MT": 1.2 * b}
    maps.update(replace)
    return {k: write(folder, k, v) for k, v in maps.items()}


def test_percent_maps_are_converted_and_logged(tmp_path):
    volume = load_qmri_maps(hmri_maps(tmp_path))
    assert volume.maps["PD"].max() == pytest.approx(0.75)
    assert volume.maps["MT"].max() == pytest.approx(0.012)
    assert volume.maps["R1"].max() == pytest.approx(0.9)
    notes = " ".join(volume.conversions)
    assert "PD" in notes and "percent" in notes
    np.testing.assert_allclose(volume.affine, AFFINE)


def test_r2s_in_per_ms_is_detected(tmp_path):
    volume = load_qmri_maps(hmri_maps(tmp_path, R2s=0.018 * brain()))
    assert volume.maps["R2s"].max() == pytest.approx(18.0, rel=1e-5)
    assert any("1/ms" in note for note in volume.conversions)


def test_declared_units_override_detection(tmp_path):
    paths = hmri_maps(tmp_path, PD=0.75 * brain(), MT=0.012 * brain())
    volume = load_qmri_maps(paths, units={"PD": "fraction", "MT": "fraction"})
    assert volume.maps["PD"].max() == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kind,bad,message",
    [
        ("PD", np.where(brain() > 0, np.nan, 0.0), "NaN/inf"),
        ("R1", np.where(brain() > 0, np.inf, 0.0), "NaN/inf"),
        ("PD", -40.0 * brain(), "negative"),
        ("PD", 5000.0 * brain(), "PD"),
        ("R1", 900.0 * brain(), "R1"),
    ],
)
def test_bad_values_name_the_file(tmp_path, kind, bad, message):
    paths = hmri_maps(tmp_path, **{kind: bad})
    with pytest.raises(QMRIError, match=message) as info:
        load_qmri_maps(paths)
    assert str(paths[kind]) in str(info.value)
    assert isinstance(info.value, InputError)


def test_mismatched_shapes_and_affines(tmp_path):
    paths = hmri_maps(tmp_path)
    paths["MT"] = write(tmp_path, "MT", np.zeros((12, 12, 10)) + 1.2)
    with pytest.raises(QMRIError, match="shape") as info:
        load_qmri_maps(paths)
    assert str(paths["MT"]) in str(info.value) and str(paths["PD"]) in str(info.value)

    paths = hmri_maps(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    paths["R2s"] = write(tmp_path, "R2s", 18.0 * brain(), shifted)
    with pytest.raises(QMRIError, match="affine") as info:
        load_qmri_maps(paths)
    assert str(paths["R2s"]) in str(info.value)


def test_missing_corrupt_and_4d_files(tmp_path):
    paths = hmri_maps(tmp_path)
    with pytest.raises(QMRIError, match="missing the MT"):
        load_qmri_maps({k: v for k, v in paths.items() if k != "MT"})
    paths["R1"] = tmp_path / "nope.nii.gz"
    with pytest.raises(QMRIError, match="not found") as info:
        load_qmri_maps(paths)
    assert "nope.nii.gz" in str(info.value)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file")
    paths = hmri_maps(tmp_path)
    paths["R1"] = corrupt
    with pytest.raises(QMRIError, match="not a readable NIfTI") as info:
        load_qmri_maps(paths)
    assert "corrupt.nii.gz" in str(info.value)
    paths = hmri_maps(tmp_path)
    paths["PD"] = write(tmp_path, "PD4d", np.zeros((*SHAPE, 3)) + 70.0)
    with pytest.raises(QMRIError, match="3D"):
        load_qmri_maps(paths)


def test_small_negative_values_are_clipped_and_logged(tmp_path):
    pd = 75.0 * brain()
    pd[0, 0, 0] = -0.5  # fit noise outside the brain
    volume = load_qmri_maps(hmri_maps(tmp_path, PD=pd))
    assert volume.maps["PD"].min() == 0.0
    assert any("clipped" in note for note in volume.conversions)


def test_load_transform_gives_meta_tensors(tmp_path):
    paths = hmri_maps(tmp_path)
    mask = write(tmp_path, "mask", brain())
    item = {"pd": paths["PD"], "r1": paths["R1"], "r2s": paths["R2s"], "mt": paths["MT"], "mask": mask}
    out = LoadQMRId()(item)
    for key in ("pd", "r1", "r2s", "mt", "mask"):
        assert out[key].shape == (1, *SHAPE) and out[key].dtype == torch.float32
        np.testing.assert_allclose(np.asarray(out[key].affine), AFFINE)
    assert float(out["pd"].max()) == pytest.approx(0.75)
    wrong = write(tmp_path, "mask2", np.ones((10, 10, 10)))
    with pytest.raises(QMRIError, match="shape"):
        LoadQMRId()({**item, "mask": wrong})

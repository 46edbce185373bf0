"""Shared preprocessing (custom.preprocess) and NIfTI inference on the input grid (custom.inference).

The pipeline tests use tiny deterministic "networks" so that outputs are predictable: a threshold network
(2-class logits that favour class 1 where the normalised intensity exceeds 0.5) and an identity network. The
test images are a bright ellipsoid with a smooth edge in a dark volume, defined in world (mm) coordinates, so
the same physical object can be sampled on grids of any orientation and voxel size.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from scipy.ndimage import map_coordinates

from custom.errors import InputError
from custom.inference import NiftiPredictor, Summary, collect_inputs, finish, nifti_stem, validate_nifti
from custom.networks import FrozenEncoderUNet
from custom.preprocess import OFFSET_KEY, SCALE_KEY, image_preprocessing, intensity_map

RADII = (15.0, 12.0, 9.0)  # ellipsoid semi-axes, mm
CENTRE = (4.0, -5.0, 3.0)  # ellipsoid centre, world mm; off the grids' centres, so a flipped output is wrong
SHAPE = (40, 38, 32)


class ThresholdNet(nn.Module):
    """2-class logits: class 1 where the (normalised) intensity is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10.0


class IdentityNet(nn.Module):
    """Returns its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def rotation(deg: float, axis: int) -> np.ndarray:
    """3x3 rotation by ``deg`` degrees about world axis ``axis``."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def grid_affine(linear: np.ndarray, shape: tuple[int, ...], centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 affine with 3x3 part ``linear`` whose voxel grid of ``shape`` is centred on world point ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = np.asarray(centre) - linear @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return aff


GRIDS = {
    "ras": np.eye(3),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation(20.0, 2) @ rotation(10.0, 0),
    "anisotropic": np.diag([1.0, 1.0, 3.0]),
    "permuted": np.array([[0.0, 0.0, 1.2], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # sagittal-like (PIR), 1.2 mm
}


def world_coords(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates ``(*shape, 3)`` of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape[:3]], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(intensity, truth): the ellipsoid sampled on the grid; intensity 0.1 outside, 1.0 inside, ~2 mm edge."""
    w = world_coords(affine, shape)
    r = np.sqrt((((w - np.asarray(CENTRE)) / np.asarray(RADII)) ** 2).sum(-1))
    intensity = 0.1 + 0.9 / (1.0 + np.exp(-(1.0 - r) * 12.0))
    return intensity.astype(np.float32), r <= 1.0


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def seg_predictor(out_dir: Path, **kwargs) -> NiftiPredictor:
    return NiftiPredictor(ThresholdNet(), None, image_preprocessing(), out_dir, num_classes=2, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------
def test_percentile_normalisation_maps_nonzero_percentiles_and_records_the_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((20, 18, 16)) * 900 + 100).astype(np.float32)
    data[:5] = 0.0  # background: excluded from the percentiles
    path = save(data, np.eye(4), tmp_path / "a.nii.gz")
    image = image_preprocessing(normalize="percentile")({"image": str(path)})["image"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (1, 20, 18, 16)
    offset, scale = intensity_map(image)
    nonzero = data[data != 0]
    assert offset == pytest.approx(np.percentile(nonzero, 0.5), rel=1e-5)
    assert offset + scale == pytest.approx(np.percentile(nonzero, 99.5), rel=1e-5)
    assert image.meta[OFFSET_KEY] == offset and image.meta[SCALE_KEY] == scale
    values = image.as_tensor()[0].numpy()
    np.testing.assert_allclose(values * scale + offset, data, rtol=1e-5, atol=1e-3)  # not clipped
    assert values.max() > 1.0 - 1e-3 and values[5:].min() < 1e-3


def test_zscore_normalisation_uses_the_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(50.0, 5.0, (16, 16, 16)).astype(np.float32)
    mask = np.zeros_like(data, dtype=np.uint8)
    mask[4:12, 4:12, 4:12] = 1
    data[mask == 0] += 300.0  # the statistics must ignore this
    save(data, np.eye(4), tmp_path / "img.nii.gz")
    save(mask, np.eye(4), tmp_path / "mask.nii.gz")
    pre = image_preprocessing(normalize="zscore", mask_key="mask")
    out = pre({"image": str(tmp_path / "img.nii.gz"), "mask": str(tmp_path / "mask.nii.gz")})
    inside = out["image"].as_tensor()[0].numpy()[mask > 0]
    assert abs(inside.mean()) < 1e-4 and inside.std() == pytest.approx(1.0, abs=1e-4)
    assert set(np.unique(out["mask"].numpy())) <= {0.0, 1.0}  # nearest-neighbour, not normalised


def test_preprocessing_reorients_and_resamples(tmp_path: Path) -> None:
    data, _ = ellipsoid(grid_affine(GRIDS["anisotropic"] @ np.diag([-1.0, 1.0, 1.0]), SHAPE), SHAPE)
    path = save(data, grid_affine(GRIDS["anisotropic"] @ np.diag([-1.0, 1.0, 1.0]), SHAPE), tmp_path / "a.nii")
    image = image_preprocessing(pixdim=(1.0, 1.0, 1.0))({"image": str(path)})["image"]
    affine = image.affine.numpy()
    np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 1.0, 1.0], atol=1e-6)  # RAS, 1 mm
    assert tuple(image.shape[1:]) == (SHAPE[0], SHAPE[1], (SHAPE[2] - 1) * 3 + 1)
    with pytest.raises(ValueError, match="normalize"):
        image_preprocessing(normalize="minmax")


# ---------------------------------------------------------------------------------------------------------------
# Output grid
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_segmentation_is_written_on_the_input_grid(tmp_path: Path, grid: str) -> None:
    shape = SHAPE if grid != "anisotropic" else (SHAPE[0], SHAPE[1], 12)
    affine = grid_affine(GRIDS[grid], shape)
    data, truth = ellipsoid(affine, shape)
    path = save(data, affine, tmp_path / f"{grid}.nii.gz")
    result = seg_predictor(tmp_path / "out").predict_file(path)

    out = nib.load(str(result["output"]))
    ref = nib.load(str(path))
    assert result["output"] == tmp_path / "out" / f"{grid}_seg.nii.gz"
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) == {0, 1}
    assert dice(labels, truth) >= 0.95, grid
    assert result["voxels"][1] == int(labels.sum())
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    assert result["volume_ml"][1] == pytest.approx(labels.sum() * voxel_ml, rel=1e-4)


def test_same_object_on_two_grids_gives_the_same_segmentation(tmp_path: Path) -> None:
    """One physical ellipsoid on an identity grid and on a rotated, shifted 1.1 mm grid: predictions agree."""
    aff1 = grid_affine(np.eye(3), SHAPE)
    shape2 = (36, 36, 30)
    aff2 = grid_affine(rotation(20.0, 2) @ rotation(-15.0, 1) @ np.diag([1.1, 1.1, 1.1]), shape2, centre=(1, -2, 1))
    p1 = save(ellipsoid(aff1, SHAPE)[0], aff1, tmp_path / "identity.nii.gz")
    p2 = save(ellipsoid(aff2, shape2)[0], aff2, tmp_path / "oblique.nii.gz")
    summary = seg_predictor(tmp_path / "out").run([p1, p2])
    assert summary.exit_code == 0
    seg1 = np.asarray(nib.load(str(summary.ok[0]["output"])).dataobj)
    seg2 = nib.load(str(summary.ok[1]["output"]))
    # resample the second prediction into the first grid (nearest neighbour)
    vox2 = np.linalg.inv(seg2.affine) @ aff1
    coords = world_coords(vox2, SHAPE).reshape(-1, 3).T
    seg2_on_1 = map_coordinates(np.asarray(seg2.dataobj), coords, order=0, mode="constant", cval=0)
    assert dice(seg1, seg2_on_1.reshape(SHAPE)) >= 0.95


def test_nii_and_nii_gz_inputs(tmp_path: Path) -> None:
    affine = grid_affine(np.eye(3), SHAPE)
    data, _ = ellipsoid(affine, SHAPE)
    a = save(data, affine, tmp_path / "plain.nii")
    b = save(data, affine, tmp_path / "zipped.nii.gz")
    assert nifti_stem(a) == "plain" and nifti_stem(b) == "zipped" and nifti_stem("x.NII.GZ") == "x"
    summary = seg_predictor(tmp_path / "out").run([a, b])
    outputs = [r["output"] for r in summary.ok]
    assert outputs == [tmp_path / "out" / "plain_seg.nii.gz", tmp_path / "out" / "zipped_seg.nii.gz"]
    np.testing.assert_array_equal(*[np.asarray(nib.load(str(p)).dataobj) for p in outputs])


def test_4d_file_with_one_volume_is_accepted(tmp_path: Path) -> None:
    affine = grid_affine(GRIDS["lps"], SHAPE)
    data, truth = ellipsoid(affine, SHAPE)
    path = save(data[..., None], affine, tmp_path / "single.nii.gz")
    assert validate_nifti(path).shape == (*SHAPE, 1)
    out = nib.load(str(seg_predictor(tmp_path / "out").predict_file(path)["output"]))
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out.affine, nib.load(str(path)).affine)
    assert dice(np.asarray(out.dataobj), truth) >= 0.95


def test_probabilities_on_the_input_grid(tmp_path: Path) -> None:
    affine = grid_affine(GRIDS["oblique"], SHAPE)
    data, _ = ellipsoid(affine, SHAPE)
    path = save(data, affine, tmp_path / "subj.nii.gz")
    result = seg_predictor(tmp_path / "out", save_probabilities=True).predict_file(path)
    assert result["probabilities"] == tmp_path / "out" / "subj_prob.nii.gz"
    prob = nib.load(str(result["probabilities"]))
    assert prob.shape == (*SHAPE, 2)
    np.testing.assert_array_equal(prob.affine, nib.load(str(path)).affine)
    p = prob.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    labels = np.asarray(nib.load(str(result["output"])).dataobj)
    np.testing.assert_array_equal(p.argmax(-1), labels)


@pytest.mark.parametrize("normalize", ["percentile", "zscore"])
@pytest.mark.parametrize("grid", ["anisotropic", "lps"])
def test_regression_restores_the_input_intensity(tmp_path: Path, normalize: str, grid: str) -> None:
    shape = (SHAPE[0], SHAPE[1], 12) if grid == "anisotropic" else SHAPE
    affine = grid_affine(GRIDS[grid], shape)
    data = ellipsoid(affine, shape)[0] * 800.0 + 150.0  # scanner-like intensity scale
    path = save(data, affine, tmp_path / "noisy.nii.gz")
    predictor = NiftiPredictor(
        IdentityNet(),
        None,
        image_preprocessing(normalize=normalize),
        tmp_path / "out",
        task="regression",
        output_postfix="denoised",
        restore_intensity=True,
    )
    result = predictor.predict_file(path)
    out = nib.load(str(result["output"]))
    assert result["output"].name == "noisy_denoised.nii.gz"
    assert out.shape == shape and out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out.affine, nib.load(str(path)).affine)
    np.testing.assert_allclose(out.get_fdata(), data, atol=0.05)  # voxel centres lie on the resampled grid

    normalised = NiftiPredictor(
        IdentityNet(), None, image_preprocessing(normalize=normalize), tmp_path / "n", "regression"
    )
    assert nib.load(str(normalised.predict_file(path)["output"])).get_fdata().max() < 5.0  # not restored


def test_regression_residual_output(tmp_path: Path) -> None:
    affine = grid_affine(np.eye(3), SHAPE)
    path = save(ellipsoid(affine, SHAPE)[0] * 500.0, affine, tmp_path / "x.nii.gz")
    predictor = NiftiPredictor(
        IdentityNet(), None, image_preprocessing(), tmp_path / "out", "regression", residual=True
    )
    np.testing.assert_allclose(nib.load(str(predictor.predict_file(path)["output"])).get_fdata(), 0.0, atol=1e-6)


def test_frozen_encoder_unet_through_a_sliding_window(tmp_path: Path) -> None:
    """A real (tiny, random) network on a size it cannot take whole: the inferer pads, the output fits the input."""
    torch.manual_seed(0)
    shape = (21, 19, 9)
    affine = grid_affine(rotation(30.0, 2) @ np.diag([1.2, 1.2, 2.0]), shape)
    path = save(ellipsoid(affine, shape)[0], affine, tmp_path / "scan.nii.gz")
    net = FrozenEncoderUNet(1, 3, encoder_features=(4, 8), decoder_features=(8, 4, 4), dropout=0.0)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25)
    predictor = NiftiPredictor(net, inferer, image_preprocessing(), tmp_path / "out", num_classes=3)
    out = nib.load(str(predictor.predict_file(path)["output"]))
    assert out.shape == shape
    np.testing.assert_array_equal(out.affine, nib.load(str(path)).affine)
    assert np.asarray(out.dataobj).max() <= 2


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------
def _good_bytes(tmp_path: Path) -> bytes:
    affine = grid_affine(np.eye(3), (8, 8, 8))
    return save(ellipsoid(affine, (8, 8, 8))[0], affine, tmp_path / "_good.nii.gz").read_bytes()


def _make_bad(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A bad input file of the given kind and a fragment expected in the error message."""
    rng = np.random.default_rng(3)
    vol = rng.random((8, 8, 8)).astype(np.float32)
    if kind == "4d":
        return save(rng.random((8, 8, 8, 3)).astype(np.float32), np.eye(4), tmp_path / "series.nii.gz"), "3 volumes"
    if kind == "2d":
        return save(vol[:, :, 0], np.eye(4), tmp_path / "flat.nii.gz"), "2D"
    if kind == "slice":
        return save(vol[:, :, :1], np.eye(4), tmp_path / "slice.nii.gz"), "single slice"
    if kind == "corrupt":
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
        return path, "cannot read"
    if kind == "truncated":
        path = tmp_path / "cut.nii.gz"
        raw = gzip.decompress(_good_bytes(tmp_path))
        path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
        return path, "cannot read"
    if kind == "png":
        path = tmp_path / "picture.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
        return path, "not a NIfTI"
    if kind == "zeros":
        return save(np.zeros((8, 8, 8), np.float32), np.eye(4), tmp_path / "zeros.nii.gz"), "empty"
    if kind == "nan":
        vol[2, 3, 4] = np.nan
        return save(vol, np.eye(4), tmp_path / "nan.nii"), "NaN"
    if kind == "missing":
        return tmp_path / "nowhere.nii.gz", "not found"
    raise AssertionError(kind)


BAD_KINDS = ["4d", "2d", "slice", "corrupt", "truncated", "png", "zeros", "nan", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_input_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path, fragment = _make_bad(kind, tmp_path)
    with pytest.raises(InputError, match=fragment) as info:
        validate_nifti(path)
    assert path.name in str(info.value)
    with pytest.raises(InputError):  # predict_file validates first and writes nothing
        seg_predictor(tmp_path / "out").predict_file(path)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_folder_run_continues_past_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    affine = grid_affine(np.eye(3), (24, 24, 20))
    data, _ = ellipsoid(affine, (24, 24, 20))
    save(data, affine, folder / "a.nii.gz")
    (folder / "b.nii.gz").write_bytes(b"this is not a nifti file")
    save(data, affine, folder / "c.nii")
    (folder / "notes.txt").write_text("ignored")
    (folder / "._a.nii.gz").write_bytes(b"macOS companion, hidden")

    files = collect_inputs(dataset_dir=folder)
    assert [p.name for p in files] == ["a.nii.gz", "b.nii.gz", "c.nii"]
    summary = seg_predictor(tmp_path / "out").run(files)
    printed = capsys.readouterr().out

    assert [r["input"].name for r in summary.ok] == ["a.nii.gz", "c.nii"]
    assert [p.name for p, _ in summary.failures] == ["b.nii.gz"]
    assert "b.nii.gz" in summary.failures[0][1]
    assert summary.exit_code == 1 and summary.total == 3
    assert (tmp_path / "out" / "a_seg.nii.gz").is_file() and (tmp_path / "out" / "c_seg.nii.gz").is_file()
    assert not (tmp_path / "out" / "b_seg.nii.gz").exists()
    assert "[1/3] a.nii.gz: ok -> " in printed and "[2/3] b.nii.gz: FAILED: " in printed
    assert "1 failed" in printed and "FAILED " + str(folder / "b.nii.gz") in printed
    with pytest.raises(SystemExit) as info:
        finish(summary)
    assert info.value.code == 1
    good = Summary(ok=summary.ok)
    assert good.exit_code == 0 and finish(good) is good


def test_run_reports_network_errors_and_output_collisions(tmp_path: Path) -> None:
    affine = grid_affine(np.eye(3), (16, 16, 16))
    data, _ = ellipsoid(affine, (16, 16, 16))
    a = save(data, affine, tmp_path / "x.nii")
    b = save(data, affine, tmp_path / "x.nii.gz")
    summary = seg_predictor(tmp_path / "out").run([a, b])
    assert len(summary.ok) == 1 and "would overwrite" in summary.failures[0][1]
    wrong = NiftiPredictor(ThresholdNet(), None, image_preprocessing(), tmp_path / "out2", num_classes=4)
    summary = wrong.run([a])
    assert summary.exit_code == 1 and "num_classes=4" in summary.failures[0][1]
    with pytest.raises(InputError, match="no input"):
        wrong.run([])


def test_collect_inputs(tmp_path: Path) -> None:
    image = tmp_path / "one.nii.gz"
    image.write_bytes(b"x")
    assert collect_inputs(image=image) == [image]
    assert collect_inputs(image=[str(image)]) == [image]
    with pytest.raises(InputError, match="exactly one"):
        collect_inputs()
    with pytest.raises(InputError, match="exactly one"):
        collect_inputs(image=image, dataset_dir=tmp_path)
    with pytest.raises(InputError, match="not found"):
        collect_inputs(image=tmp_path / "missing.nii")
    with pytest.raises(InputError, match="folder not found"):
        collect_inputs(dataset_dir=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no file"):
        collect_inputs(dataset_dir=empty)
    (empty / "b.nii").write_bytes(b"x")
    (empty / "a.nii.gz").write_bytes(b"x")
    assert [p.name for p in collect_inputs(dataset_dir=empty)] == ["a.nii.gz", "b.nii"]
    assert [p.name for p in collect_inputs(dataset_dir=empty, patterns="*.nii")] == ["b.nii"]


def test_predictor_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        NiftiPredictor(IdentityNet(), task="classification")
    with pytest.raises(ValueError, match="save_probabilities"):
        NiftiPredictor(IdentityNet(), task="regression", save_probabilities=True)
    with pytest.raises(ValueError, match="restore_intensity"):
        NiftiPredictor(IdentityNet(), task="segmentation", restore_intensity=True)

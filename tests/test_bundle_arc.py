"""End-to-end tests of bundles/arc_lesion_seg through monai.bundle (tiny sizes, CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import (
    REPO,
    assert_encoder_unchanged,
    run_config,
    run_inference,
    save_tiny_encoder,
    train_tiny,
)

BUNDLE = REPO / "bundles" / "arc_lesion_seg"


@pytest.fixture(scope="module")
def synthetic(synthetic_dataset) -> Path:
    return synthetic_dataset(subjects=9, seed=0, resolution=6.0)  # shared by the bundle tests (read only)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(synthetic, encoder_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arc_run")
    return train_tiny(BUNDLE, synthetic / "arc", out, pretrained_encoder=str(encoder_file))


def test_training_writes_model_and_settings(trained):
    assert (trained / "model.pt").is_file() and (trained / "model.json").is_file()
    assert (trained / "checkpoints" / "checkpoint.pt").is_file()


def test_encoder_weights_never_change(trained, encoder_file):
    assert_encoder_unchanged(encoder_file, trained / "model.pt")


def evaluate(trained: Path, synthetic: Path, out: Path, **overrides) -> Path:
    """Run evaluate.yaml on the synthetic ARC test split with the tiny trained model; returns ``out``."""
    run_config(
        BUNDLE,
        "evaluate.yaml",
        "evaluating",
        "infer",
        dataset_dir=str(synthetic / "arc"),
        model_path=str(trained / "model.pt"),
        output_dir=str(out),
        **overrides,
    )
    return out


def test_evaluation_table_and_lesion_volumes(trained, synthetic):
    out = evaluate(trained, synthetic, trained / "eval")
    table = (out / "metrics.md").read_text()
    assert "T1w" in table and "volume (mL)" in table and "nan" not in table.lower()
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and all(float(r["volume_ml_ref_lesion"]) > 0 for r in rows)


def test_inference_keeps_input_grid_and_reports_bad_files(trained, synthetic, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((synthetic / "arc").glob("sub-*/ses-*/anat/*_FLAIR.nii.gz"))[0]
    img = nib.load(str(source))
    # an LPS, anisotropic copy of the scan (axes flipped, every second slice)
    data = np.asarray(img.dataobj)[::-1, ::-1, ::2]
    affine = img.affine @ np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = img.affine[:3, :3] @ np.array([data.shape[0] - 1, data.shape[1] - 1, 0]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, affine), str(scans / "lps.nii"))
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    done = run_inference(BUNDLE, trained / "model.pt", out, "--dataset_dir", str(scans))
    assert done.returncode != 0, done.stdout[-2000:]
    assert "broken.nii.gz" in done.stdout + done.stderr and "FAILED" in done.stdout
    seg = nib.load(str(out / "lps_lesion.nii.gz"))
    assert seg.shape == data.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    volumes = (out / "lesion_volumes.csv").read_text().splitlines()
    assert volumes[0] == "input,output,lesion_volume_ml,lesion_voxels" and len(volumes) == 2

    single = run_inference(BUNDLE, trained / "model.pt", tmp_path / "single", "--image", str(source))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    seg = nib.load(str(tmp_path / "single" / source.name.replace(".nii.gz", "_lesion.nii.gz")))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)


def test_empty_reference_and_prediction_are_reported_not_nan():
    from custom.evaluation import volume_agreement
    from custom.metrics import ResultsTable, segmentation_metrics

    empty = np.zeros((8, 8, 8), np.int64)
    lesion = empty.copy()
    lesion[2:5, 2:5, 2:5] = 1
    both_empty = segmentation_metrics(empty, empty, (1.0, 1.0, 1.0), [1], ["lesion"])
    assert both_empty["dice_lesion"] == 1.0 and np.isnan(both_empty["hd95_lesion"])
    missed = segmentation_metrics(empty, lesion, (1.0, 1.0, 1.0), [1], ["lesion"])
    assert missed["dice_lesion"] == 0.0 and np.isnan(missed["hd95_lesion"])
    found = segmentation_metrics(lesion, lesion, (1.0, 1.0, 1.0), [1], ["lesion"])
    rows = [
        {"subject": s, "contrast": "FLAIR", **m, "volume_ml_pred_lesion": 0.0, "volume_ml_ref_lesion": 0.0}
        for s, m in (("a", both_empty), ("b", missed), ("c", found))
    ]
    table = ResultsTable(rows).to_markdown(group_by=("contrast",), metrics=["dice_mean", "hd95_mean"])
    assert "nan" not in table.lower() and "undefined" in table
    assert "volume" in volume_agreement(rows, "lesion")


def test_evaluation_with_small_component_removal_labels_its_rows(trained, synthetic):
    import csv

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "evaluate.yaml"))
    parser.update({"bundle_root": "B", "contrast": "FLAIR", "min_lesion_ml": 0.1})
    assert parser.get_parsed_content("output_dir").endswith("eval_FLAIR_min0.1ml")
    assert parser.get_parsed_content("postprocessing") == "lesions >= 0.1 mL"

    # larger than any brain: every predicted component goes
    out = evaluate(trained, synthetic, trained / "eval_min", min_lesion_ml=1.0e6)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and all(float(r["volume_ml_pred_lesion"]) == 0 for r in rows)
    assert all(r["postprocessing"] == "lesions >= 1e+06 mL" for r in rows)
    table = (out / "metrics.md").read_text()
    assert "lesions >= 1e+06 mL" in table and "nan" not in table.lower()

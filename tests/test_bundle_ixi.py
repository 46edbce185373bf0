"""End-to-end tests of bundles/ixi_tissue_seg through monai.bundle (tiny sizes, CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import (
    REPO,
    TINY,
    assert_encoder_unchanged,
    run_config,
    run_inference,
    save_tiny_encoder,
    train_tiny,
)

BUNDLE = REPO / "bundles" / "ixi_tissue_seg"


@pytest.fixture(scope="module")
def synthetic(synthetic_dataset) -> Path:
    return synthetic_dataset(subjects=9, seed=0, resolution=6.0)  # shared by the bundle tests (read only)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(synthetic, encoder_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ixi_run")
    return train_tiny(BUNDLE, synthetic / "ixi", out, pretrained_encoder=str(encoder_file))


def test_training_writes_model_and_settings(trained):
    assert (trained / "model.pt").is_file() and (trained / "model.json").is_file()
    assert (trained / "checkpoints" / "checkpoint.pt").is_file()


def test_encoder_weights_never_change(trained, encoder_file):
    assert_encoder_unchanged(encoder_file, trained / "model.pt")


def test_evaluation_table_has_every_site(trained, synthetic):
    out = trained / "eval"
    run_config(
        BUNDLE,
        "evaluate.yaml",
        "evaluating",
        "infer",
        dataset_dir=str(synthetic / "ixi"),
        model_path=str(trained / "model.pt"),
        output_dir=str(out),
    )
    table = (out / "metrics.md").read_text()
    for site in ("GST [T1]", "HH [T1]", "IOP [T1]"):
        assert site in table
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("subject") and len(rows) > 3


def test_inference_keeps_input_grid_and_reports_bad_files(trained, synthetic, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((synthetic / "ixi" / "IXI-T1").glob("*.nii.gz"))[0]
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
    seg = nib.load(str(out / "lps_seg.nii.gz"))
    assert seg.shape == data.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}

    single = run_inference(BUNDLE, trained / "model.pt", tmp_path / "single", "--image", str(source))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    seg = nib.load(str(tmp_path / "single" / source.name.replace(".nii.gz", "_seg.nii.gz")))
    assert seg.shape == img.shape
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)


def test_label_grid_mismatch_names_the_file(synthetic, tmp_path):
    from custom.errors import InputError
    from custom.evaluation import check_label_grid

    image = sorted((synthetic / "ixi" / "IXI-T1").glob("*.nii.gz"))[0]
    label = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(label))
    with pytest.raises(InputError, match="bad_label.nii.gz"):
        check_label_grid(image, label)


def test_resumed_run_keeps_the_best_validation_value(trained, synthetic, encoder_file):
    import json

    record = json.loads((trained / "model.json").read_text())
    overrides = {**TINY, "pretrained_encoder": str(encoder_file)}
    workflow = run_config(
        BUNDLE,
        "train.yaml",
        "training",
        "train",
        dataset_dir=str(synthetic / "ixi"),
        output_dir=str(trained),
        model_path=str(trained / "model.pt"),
        **overrides,
    )
    best = workflow.parser.get_parsed_content("validate#best_model").best
    assert best == pytest.approx(record["best_metric"]["val_mean_dice"])

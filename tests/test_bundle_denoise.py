"""End-to-end tests of bundles/ixi_denoise through monai.bundle (tiny sizes, CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import REPO, run_config, run_inference, train_tiny

from custom.denoise import AddNoised

BUNDLE = REPO / "bundles" / "ixi_denoise"


@pytest.fixture(scope="module")
def synthetic(synthetic_dataset) -> Path:
    return synthetic_dataset(subjects=9, seed=0, resolution=6.0)  # shared by the bundle tests (read only)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    return train_tiny(BUNDLE, synthetic / "ixi", tmp_path_factory.mktemp("denoise_run"), pretrained_encoder="random")


def evaluate(trained: Path, synthetic: Path, out: Path, seed: int = 0) -> str:
    run_config(
        BUNDLE,
        "evaluate.yaml",
        "evaluating",
        "infer",
        dataset_dir=str(synthetic / "ixi"),
        model_path=str(trained / "model.pt"),
        output_dir=str(out),
        seed=seed,
    )
    return (out / "metrics.csv").read_text()


def test_noise_model_statistics():
    image = torch.zeros(1, 40, 40, 40)
    noisy = AddNoised("image", sigma=0.2)
    noisy.set_random_state(0)
    out = noisy({"image": image})
    assert torch.equal(out["clean"], image)
    assert torch.allclose(out["image"] - out["clean"], out["label"])
    assert float(out["label"].std()) == pytest.approx(0.2, rel=0.02)
    assert abs(float(out["label"].mean())) < 0.01


def test_training_and_reproducible_evaluation(trained, synthetic, tmp_path):
    assert (trained / "model.pt").is_file() and (trained / "model.json").is_file()
    first = evaluate(trained, synthetic, tmp_path / "a")
    second = evaluate(trained, synthetic, tmp_path / "b")
    assert first == second, "the same seed must give the same noise and the same table"
    other = evaluate(trained, synthetic, tmp_path / "c", seed=1)
    assert other != first
    table = (tmp_path / "a" / "metrics.md").read_text()
    assert "psnr_noisy" in table and "L = max - min" in table
    for site in ("HH", "IOP"):
        assert site in table


def test_inference_restores_grid_and_intensity_scale(trained, synthetic, tmp_path):
    source = sorted((synthetic / "ixi" / "IXI-T2").glob("*.nii.gz"))[0]
    done = run_inference(BUNDLE, trained / "model.pt", tmp_path, "--image", str(source))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    img = nib.load(str(source))
    out = nib.load(str(tmp_path / source.name.replace(".nii.gz", "_denoised.nii.gz")))
    assert out.shape == img.shape
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-5)
    x, y = np.asarray(img.dataobj, dtype=np.float64), np.asarray(out.dataobj, dtype=np.float64)
    # intensity scale restored: same order of magnitude as the input, strongly correlated with it
    assert 0.5 < y.mean() / x.mean() < 2.0
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.8


def test_combined_table_merges_every_evaluation_run_with_the_noise_caption(tmp_path):
    from custom.denoise import TABLE_METRICS, combine_denoising_tables
    from custom.metrics import PSNR_CAPTION, ResultsTable

    assert combine_denoising_tables(tmp_path, "Denoising.") is None  # no run yet
    for contrast, value in (("T1", 30.0), ("T2", 28.0)):
        row = {"subject": f"s{contrast}", "site": "GST", "contrast": contrast, **dict.fromkeys(TABLE_METRICS, value)}
        ResultsTable([row]).to_csv(tmp_path / f"eval_{contrast}" / "metrics.csv")
    markdown = combine_denoising_tables(tmp_path, "Denoising.", sigma=0.1, noise_type="rician", seed=3)
    assert markdown.strip() == (tmp_path / "table.md").read_text().strip()
    assert "Denoising. Noise: rician, sigma 0.1 on z-scored images, seed 3." in markdown and PSNR_CAPTION in markdown
    assert "T1" in markdown and "T2" in markdown

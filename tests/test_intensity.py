"""custom.intensity: the view normalisation against MONAI's NumPy implementations."""

import numpy as np
import pytest
import torch
from monai.transforms import HistogramNormalize, ScaleIntensityRangePercentiles

from custom import intensity as I


def test_histogram_equalise_matches_monai():
    g = torch.Generator().manual_seed(0)
    img = torch.cat([torch.zeros(4000), torch.rand(6000, generator=g) ** 3 * 5.0]).reshape(1, 10, 10, 100)
    ours = I.histogram_equalise(img, bins=256)
    ref = HistogramNormalize(num_bins=256, min=0, max=1)(img.numpy())
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), atol=1e-5)
    assert float(ours.min()) == 0.0 and float(ours.max()) == pytest.approx(1.0)


def test_percentile_rescale_matches_monai_and_clips():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 20, 20, 20, generator=g).exp()
    ours = I.percentile_rescale(img, 0.5, 95.0)
    ref = ScaleIntensityRangePercentiles(lower=0.5, upper=95.0, b_min=0.0, b_max=1.0, clip=True)(img.numpy())
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), atol=2e-3)  # percentile definitions differ slightly


def test_constant_images_and_zscore():
    flat = torch.full((1, 4, 4, 4), 3.0)
    assert torch.equal(I.histogram_equalise(flat), torch.zeros_like(flat))
    assert torch.equal(I.percentile_rescale(flat), torch.zeros_like(flat))
    assert torch.equal(I.zscore(flat), torch.zeros_like(flat))
    x = torch.arange(64.0).reshape(1, 4, 4, 4)
    z = I.zscore(x)
    assert abs(float(z.mean())) < 1e-6 and float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


def test_normalise_view_modes():
    x = torch.rand(1, 8, 8, 8)
    assert torch.allclose(I.normalise_view(x, "robust_max", 2.0), x / 2.0)
    eq = I.normalise_view(x, "histeq")
    assert 0.0 <= float(eq.min()) and float(eq.max()) <= 1.0
    with pytest.raises(ValueError, match="scale"):
        I.normalise_view(x, "robust_max")
    with pytest.raises(ValueError, match="unknown"):
        I.normalise_view(x, "other")


def test_clip_to_percentiles_inside_region():
    x = torch.arange(100.0)
    region = x < 50
    clipped = I.clip_to_percentiles(x, 0.0, 50.0, region)
    assert float(clipped.max()) <= 25.0

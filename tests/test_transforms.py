"""Simulation, contrastive-view and augmentation transforms (custom.transforms) on tiny synthetic phantoms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from custom import transforms as T
from custom.sequences import SEQUENCES, SequenceSample, simulate

N = 24  # phantom size (voxels per side)
PATCH = 16  # view size in the tests

# docs/paper-notes.md tissue values: (white matter, grey matter, CSF); PD and MT fractions, R1, R2*, R2 in 1/s.
TISSUE = {
    "pd": (0.7, 0.8, 1.0),
    "r1": (1.0, 0.64, 0.27),
    "r2s": (21.0, 17.0, 5.0),
    "mt": (0.016, 0.008, 0.001),
    "r2": (13.0, 12.0, 0.6),
}


def phantom(n: int = N, with_r2: bool = False, meta: bool = False) -> dict[str, torch.Tensor]:
    """Concentric spheres: CSF core, white matter shell, grey matter shell, background (all maps 0)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    radius = ((grid - (n - 1) / 2) ** 2).sum(0).sqrt() / (n / 2)
    out: dict[str, torch.Tensor] = {}
    for key, (wm, gm, csf) in TISSUE.items():
        if key == "r2" and not with_r2:
            continue
        m = torch.zeros(n, n, n)
        m[radius < 0.85] = gm
        m[radius < 0.6] = wm
        m[radius < 0.25] = csf
        out[key] = MetaTensor(m[None]) if meta else m[None]
    return out


def qmri_image(data: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([data[k] for k in T.MAP_KEYS], dim=0)


def no_augment() -> dict[str, float]:
    """``augment`` kwargs that turn every augmentation off (the views then equal their targets)."""
    return {
        "affine_prob": 0.0,
        "flip_prob": 0.0,
        "bias_prob": 0.0,
        "gibbs_prob": 0.0,
        "noise_prob": 0.0,
        "dropout_prob": 0.0,
    }


def views(mode: str, seed: int, data: dict | None = None, **kw) -> dict:
    t = T.ContrastiveViewsd(mode=mode, patch_size=kw.pop("patch_size", PATCH), **kw)
    t.set_random_state(seed)
    return t(dict(data if data is not None else phantom()))


# ------------------------------------------------------------------------------------------------------------
# RandSimulateSequenced
# ------------------------------------------------------------------------------------------------------------
def test_simulate_output_shape_dtype_record_and_normalisation():
    data = phantom()
    t = T.RandSimulateSequenced(noise=None, clean_key="clean")
    t.set_random_state(3)
    out = t(data)
    img = out["image"]
    assert isinstance(img, MetaTensor) and img.shape == (1, N, N, N) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    record = out["image_sequence"]
    assert record["sequence"] in SEQUENCES and record["preset"] == "paper"
    assert set(T.PARAM_NAMES) <= set(record)
    assert img.meta["sequence"] == pytest.approx(record, nan_ok=True)
    brain = data["pd"] > 0
    assert float(T.robust_max(img, brain, 99.5)) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(out["clean"].as_tensor(), img.as_tensor())  # no noise: clean == image
    assert all(k in out for k in T.MAP_KEYS)  # inputs kept


def test_simulate_seeded_reproducible_and_seed_dependent():
    def run(seed: int) -> dict:
        t = T.RandSimulateSequenced(noise=(0.01, 0.05))
        t.set_random_state(seed)
        return t(phantom())

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a["image"], b["image"])
    assert a["image_sequence"] == pytest.approx(b["image_sequence"], nan_ok=True)
    assert not torch.equal(a["image"], c["image"])


def test_simulate_noise_is_rician_around_clean():
    t = T.RandSimulateSequenced(noise=(0.05, 0.05), clean_key="clean", b1_field=0.0)
    t.set_random_state(0)
    out = t(phantom())
    diff = out["image"] - out["clean"]
    assert float(diff.abs().max()) > 0
    background = phantom()["pd"] == 0
    # Rayleigh background: mean sigma * sqrt(pi / 2), sigma = 0.05 of the robust max (= 1 after normalising)
    assert float(out["image"][background].mean()) == pytest.approx(0.05 * math.sqrt(math.pi / 2), rel=0.15)


def test_qmri_4channel_equals_separate_keys():
    data = phantom()
    sep = T.RandSimulateSequenced(noise=(0.0, 0.05))
    one = T.RandSimulateSequenced(qmri_key="qmri", noise=(0.0, 0.05))
    for seed in range(4):
        sep.set_random_state(seed)
        one.set_random_state(seed)
        a = sep(data)
        b = one({"qmri": qmri_image(data)})
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert a["image_sequence"] == pytest.approx(b["image_sequence"], nan_ok=True)
    for mode in ("seqinv", "seqaug", "base"):
        a = views(mode, 11, data)
        b = views(mode, 11, {"qmri": qmri_image(data)}, qmri_key="qmri")
        for key in ("image1", "image2", "image1_recon", "image2_recon"):
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor()), (mode, key)


def test_r2_map_is_used_by_fse_when_present():
    data = phantom(with_r2=True)
    sample = SequenceSample("fse", {"tr": 3.0, "te": 0.1}, preset="custom")
    kw = {"fixed_sample": sample, "noise": None, "b1_field": 0.0, "normalize": False}
    with_r2 = T.RandSimulateSequenced(**kw)(data)["image"]
    without = T.RandSimulateSequenced(r2_key=None, **kw)(data)["image"]
    expected = simulate(sample, data["pd"], data["r1"], data["r2s"], data["mt"], r2=data["r2"])
    assert torch.allclose(with_r2.as_tensor(), expected)
    assert not torch.allclose(with_r2.as_tensor(), without.as_tensor())


def test_recorded_sequence_replays_same_clean_image():
    data = phantom()
    for seed in range(6):
        t = T.RandSimulateSequenced(noise=(0.02, 0.05), b1_field=0.0, clean_key="clean")
        t.set_random_state(seed)
        out = t(data)
        record = out["image_sequence"]
        for sample in (SequenceSample.from_dict(record), T.sample_from_record(record)):
            replay = T.RandSimulateSequenced(fixed_sample=sample, noise=None, b1_field=0.0)(dict(data))
            assert torch.allclose(replay["image"], out["clean"], rtol=1e-6, atol=1e-7)
            assert replay["image_sequence"]["sequence"] == record["sequence"]
        # the record dict itself is accepted as fixed_sample (config friendly)
        again = T.RandSimulateSequenced(fixed_sample=record, noise=None, b1_field=0.0)(dict(data))
        assert torch.allclose(again["image"], out["clean"], rtol=1e-6, atol=1e-7)


def test_b1_field_multiplies_smoothly_and_is_seeded():
    data = phantom()
    sample = SequenceSample("fse", {"tr": 3.0, "te": 0.02})
    kw = {"fixed_sample": sample, "noise": None, "normalize": False}
    flat = T.RandSimulateSequenced(b1_field=0.0, **kw)(data)["image"]
    t = T.RandSimulateSequenced(b1_field=0.2, **kw)
    t.set_random_state(0)
    biased = t(data)["image"]
    brain = data["pd"] > 0
    ratio = biased[brain] / flat[brain]
    assert float(ratio.std()) > 1e-3 and 0.2 < float(ratio.min()) and float(ratio.max()) < 5.0


def test_empty_image_guard_paper_fse():
    data = phantom()
    # with a single draw, the paper FSE ranges (TE up to 3 s) give empty images for some seeds
    fell_back = 0
    for seed in range(40):
        t = T.RandSimulateSequenced(sequences=("fse",), preset="paper", noise=None, max_tries=1)
        t.set_random_state(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = t(data)
        if any("empty" in str(w.message) for w in caught):
            fell_back += 1
            assert out["image_sequence"]["preset"] == "clinical"
        assert float(out["image"].max()) > 0
    assert fell_back > 0
    # with the default retries, every image has signal and keeps the paper preset
    for seed in range(40):
        t = T.RandSimulateSequenced(sequences=("fse",), preset="paper", noise=None)
        t.set_random_state(seed)
        out = t(data)
        img = out["image"]
        assert torch.isfinite(img).all() and float(img.max()) > 0.5
        assert out["image_sequence"]["sequence"] == "fse" and out["image_sequence"]["preset"] == "paper"
    # the contrastive views are guarded the same way
    for seed in range(10):
        out = views("seqaug", seed, sequences=("fse",), augment=no_augment())
        assert float(out["image1_recon"].max()) > 0 and float(out["image2_recon"].max()) > 0


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        T.RandSimulateSequenced(preset="nope")
    with pytest.raises(ValueError):
        T.RandSimulateSequenced(sequences=("dwi",))
    with pytest.raises(ValueError):
        T.ContrastiveViewsd(mode="other")
    with pytest.raises(ValueError):
        T.ContrastiveViewsd(mode="seqinv", sequences=("fse",))
    with pytest.raises(KeyError, match="r1"):
        T.RandSimulateSequenced()({"pd": torch.ones(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="or 5, X, Y, Z"):
        T.RandSimulateSequenced(qmri_key="q")({"q": torch.ones(3, 4, 4, 4)})


# ------------------------------------------------------------------------------------------------------------
# ContrastiveViewsd
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["base", "seqaug", "seqinv"])
def test_views_shapes_dtype_finite(mode):
    out = views(mode, 0)
    for key in ("image1", "image2", "image1_recon", "image2_recon"):
        x = out[key]
        assert isinstance(x, torch.Tensor) and x.shape == (1, PATCH, PATCH, PATCH), key
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), key
    for key in T.MAP_KEYS:
        assert key not in out  # inputs dropped by default
    assert out["image1"].meta["sequence"] == pytest.approx(out["image1_sequence"], nan_ok=True)
    assert not torch.equal(out["image1"], out["image1_recon"])  # artefacts applied to the view only


def test_views_keep_inputs_and_custom_keys():
    out = views("seqaug", 0, keep_inputs=True, view_keys=("a", "b"), recon_keys=("ra", "rb"))
    assert {"a", "b", "ra", "rb", "a_sequence", "b_sequence", *T.MAP_KEYS} <= set(out)


def test_views_pad_when_image_smaller_than_patch():
    out = views("seqinv", 1, patch_size=(32, 28, 20))
    assert out["image1"].shape == (1, 32, 28, 20) and out["image2_recon"].shape == (1, 32, 28, 20)


def test_views_seeded_reproducible_and_seed_dependent():
    a, b, c = views("seqinv", 5), views("seqinv", 5), views("seqinv", 6)
    for key in ("image1", "image2", "image1_recon", "image2_recon"):
        assert torch.equal(a[key], b[key])
    assert a["image1_sequence"] == pytest.approx(b["image1_sequence"], nan_ok=True)
    assert not torch.equal(a["image1"], c["image1"])


def test_seqinv_views_come_from_two_sequence_types():
    seen = set()
    data = phantom()
    for seed in range(24):
        out = views("seqinv", seed, data, patch_size=8)
        s1, s2 = out["image1_sequence"]["sequence"], out["image2_sequence"]["sequence"]
        assert s1 != s2
        seen.update((s1, s2))
    assert seen == set(SEQUENCES)


def test_seqaug_views_share_one_protocol_and_image():
    data = phantom()
    for seed in range(8):
        out = views("seqaug", seed, data, patch_size=8)
        assert out["image1_sequence"] == pytest.approx(out["image2_sequence"], nan_ok=True)
    # views covering the whole volume, no augmentation: both targets are the same simulated image
    out = views("seqaug", 3, data, patch_size=N, augment={**no_augment(), "margin": 0})
    assert torch.equal(out["image1_recon"], out["image2_recon"])
    # ... but the augmentations (crop, flips, artefacts) differ between views
    out = views("seqaug", 3, data)
    assert not torch.equal(out["image1_recon"], out["image2_recon"])


def test_crop_then_simulate_equals_simulate_then_crop():
    """A view target equals the matching crop of the full simulated image (B1 defined on the whole volume)."""
    data = phantom(meta=True)
    aug = {**no_augment(), "margin": 0}
    # a linear normalisation (and no map clipping) keeps the crop an exact multiple of the full image
    t = T.ContrastiveViewsd(
        mode="seqaug",
        patch_size=(12, 14, 10),
        b1_field=0.2,
        augment=aug,
        view_norm="robust_max",
        zscore=False,
        clip_maps=None,
    )
    t.set_random_state(2)
    out = t(dict(data))
    record = out["image1_sequence"]
    coeffs = t._b1_sets[0]
    field = torch.exp(T.polynomial_log_field(coeffs, (N, N, N), degree=2))[None]
    full = simulate(T.sample_from_record(record), data["pd"], data["r1"], data["r2s"], data["mt"], b1=field)
    for view in ("image1_recon", "image2_recon"):
        target = out[view].as_tensor()
        # find the crop by the affine translation recorded in the MetaTensor
        start = [int(round(v)) for v in out[view].affine[:3, 3].tolist()]
        crop = full[:, start[0] : start[0] + 12, start[1] : start[1] + 14, start[2] : start[2] + 10]
        ratio = target[crop > 1e-6] / crop[crop > 1e-6]
        assert float(ratio.std() / ratio.mean()) < 1e-4  # equal up to the global normalisation


def test_views_are_cropped_from_one_shared_region():
    """Both views come from one region of shared_region x the crop (authors' 1.2x patch crop), so they overlap."""
    data = phantom(meta=True)
    aug = {**no_augment(), "margin": 0}

    def starts(seed: int, shared_region: float | None) -> torch.Tensor:
        out = views("seqinv", seed, data, patch_size=6, augment=aug, shared_region=shared_region)
        return torch.tensor([out[k].affine[:3, 3].tolist() for k in ("image1_recon", "image2_recon")])

    for seed in range(8):
        same = starts(seed, 1.0)  # region == crop: both views at the same place
        assert torch.equal(same[0], same[1])
        near = starts(seed, 1.5)  # region 9 voxels: starts differ by at most 3
        assert float((near[0] - near[1]).abs().max()) <= 3
    apart = max(float((starts(seed, None)[0] - starts(seed, None)[1]).abs().max()) for seed in range(8))
    assert apart > 3  # independent crops anywhere in the volume do drift apart
    with pytest.raises(ValueError, match="shared_region"):
        T.ContrastiveViewsd(mode="seqinv", patch_size=6, shared_region=0.5)


def test_base_mode_uses_mprage():
    data = phantom()
    for seed in range(6):
        out = views("base", seed, data, patch_size=8)
        for v in ("image1_sequence", "image2_sequence"):
            assert out[v]["sequence"] == "mprage" and out[v]["preset"] == "paper"
        assert out["image1_sequence"] == pytest.approx(out["image2_sequence"], nan_ok=True)
    # a real MPRAGE given under mprage_key is used instead: a constant image gives constant targets
    real = {**data, "t1": torch.full((1, N, N, N), 7.0)}
    linear = {"view_norm": "robust_max", "zscore": False}  # a linear scale keeps a constant image constant
    out = views("base", 0, real, mprage_key="t1", augment={"affine_prob": 0.0}, **linear)
    assert torch.allclose(out["image1_recon"], torch.ones_like(out["image1_recon"]))
    assert torch.allclose(out["image2_recon"], torch.ones_like(out["image2_recon"]))
    assert out["image1_sequence"]["preset"] == "real" and "t1" not in out
    # the real image alone is enough (no maps needed)
    out = views("base", 0, {"t1": torch.full((1, N, N, N), 7.0)}, mprage_key="t1")
    assert out["image1"].shape == (1, PATCH, PATCH, PATCH)
    # mprage_key given but absent: simulated from the maps
    out = views("base", 0, data, mprage_key="t1")
    assert out["image1_sequence"]["preset"] == "paper"


def test_views_collate_into_a_batch():
    batch = list_data_collate([views("seqinv", s, patch_size=8) for s in range(3)])
    assert batch["image1"].shape == (3, 1, 8, 8, 8) and batch["image2_recon"].shape == (3, 1, 8, 8, 8)
    assert len(batch["image1_sequence"]["sequence"]) == 3
    assert batch["image1_sequence"]["tr"].shape == (3,)


def test_views_with_mask_and_metatensor_affine():
    data = phantom(meta=True)
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 5.0, 3.0])
    for k in list(data):
        data[k] = MetaTensor(data[k].as_tensor(), affine=affine)
    data["mask"] = (data["pd"] > 0).float()
    out = views("seqinv", 4, data, mask_key="mask", b1_field=0.2)
    assert out["image1"].shape == (1, PATCH, PATCH, PATCH) and "mask" not in out
    assert torch.isfinite(out["image2_recon"]).all()


# ------------------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------------------
def test_augmentation_pipeline_stays_torch():
    img = torch.rand(1, 20, 22, 18)
    label = (img > 0.5).float()
    aug = T.mri_augmentations(("image",), patch_size=12, label_keys=("label",))
    aug.set_random_state(0)
    out = aug({"image": img, "label": label})
    assert isinstance(out["image"], torch.Tensor) and out["image"].shape == (1, 12, 12, 12)
    assert out["image"].dtype == torch.float32 and torch.isfinite(out["image"]).all()
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}  # nearest for labels, no artefacts
    for stage in (aug.crop, aug.spatial, aug.artefacts):
        res = stage({"image": torch.rand(1, 14, 14, 14)})
        assert isinstance(res["image"], torch.Tensor)
    aug2 = T.mri_augmentations(("image",), patch_size=12, label_keys=("label",))
    aug2.set_random_state(0)
    assert torch.equal(aug2({"image": img, "label": label})["image"], out["image"])


def test_torch_artefact_transforms():
    img = torch.rand(1, 10, 12, 14) + 0.5
    bias = T.RandBiasFieldTorchd("x", prob=1.0, coeff_range=(0.0, 0.0))
    assert torch.allclose(bias({"x": img})["x"], img)
    bias = T.RandBiasFieldTorchd("x", prob=1.0, coeff_range=(-0.3, 0.3)).set_random_state(1)
    assert not torch.allclose(bias({"x": img})["x"], img)
    noise = T.RandRicianNoiseTorchd("x", prob=1.0, std_range=(0.0, 0.0))
    assert torch.allclose(noise({"x": img})["x"], img)
    noise = T.RandRicianNoiseTorchd("x", prob=1.0, std_range=(0.1, 0.1)).set_random_state(1)
    noisy = noise({"x": img})["x"]
    assert float((noisy - img).std()) == pytest.approx(0.1, rel=0.3)
    drop = T.RandCuboidDropoutd("x", prob=1.0, holes=(3, 3), size=(2, 4), fill_value=0.0).set_random_state(1)
    dropped = drop({"x": img})["x"]
    n_zero = int((dropped == 0).sum())
    assert 8 <= n_zero <= 3 * 64 and torch.equal(dropped[dropped != 0], img[dropped != 0])
    assert float(img.min()) > 0  # input untouched (no in-place fill)


def test_polynomial_field_crop_and_stride_consistency():
    rng = np.random.default_rng(0)
    coeffs = rng.uniform(-0.3, 0.3, 19).tolist()
    full = T.polynomial_log_field(coeffs, (20, 18, 16), degree=3)
    part = T.polynomial_log_field(coeffs, (5, 6, 7), degree=3, offset=(3, 4, 5), full_shape=(20, 18, 16))
    assert torch.allclose(part, full[3:8, 4:10, 5:12], atol=1e-5)
    sub = T.polynomial_log_field(coeffs, (10, 9, 8), degree=3, stride=2, full_shape=(20, 18, 16))
    assert torch.allclose(sub, full[::2, ::2, ::2], atol=1e-5)
    with pytest.raises(ValueError):
        T.polynomial_log_field([0.1], (4, 4, 4), degree=2)


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_outputs_stay_on_cuda():
    data = {k: v.cuda() for k, v in phantom().items()}
    sim = T.RandSimulateSequenced(clean_key="clean")
    sim.set_random_state(0)
    out = sim(dict(data))
    assert out["image"].device.type == "cuda" and out["clean"].device.type == "cuda"
    for mode in ("base", "seqaug", "seqinv"):
        out = views(mode, 0, data)
        for key in ("image1", "image2", "image1_recon", "image2_recon"):
            assert out[key].device.type == "cuda", (mode, key)
    a, b = views("seqinv", 1, data), views("seqinv", 1, data)
    assert torch.equal(a["image1"], b["image1"])
    aug = T.mri_augmentations(("image",), patch_size=12)
    res = aug({"image": torch.rand(1, 20, 20, 20, device="cuda")})
    assert res["image"].device.type == "cuda"


# ------------------------------------------------------------------------------------------------------------
# The authors' view normalisation (percentile rescale, histogram equalisation, z-score; map clipping)
# ------------------------------------------------------------------------------------------------------------
def test_histeq_views_and_targets_are_zscored_and_equalised():
    for mode in ("base", "seqaug", "seqinv"):
        out = views(mode, 4)
        for key in ("image1", "image2", "image1_recon", "image2_recon"):
            x = out[key].as_tensor()
            assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1.0) < 1e-3, key
    # without z-scoring and augmentation the target is the equalised image: values in [0, 1], both ends used
    out = views("seqinv", 4, augment={**no_augment(), "margin": 0}, zscore=False)
    t = out["image1_recon"].as_tensor()
    assert float(t.min()) == 0.0 and float(t.max()) == pytest.approx(1.0)
    # equalisation flattens the histogram of the non-background voxels (vs. a linear scale)
    lin = views("seqinv", 4, augment={**no_augment(), "margin": 0}, zscore=False, view_norm="robust_max")
    lin_t = lin["image1_recon"].as_tensor()
    lin_t = lin_t / lin_t.max()

    def spread(x: torch.Tensor) -> float:
        v = x[x > 0]
        hist = torch.histc(v, bins=4, min=0.0, max=1.0) / v.numel()
        return float(hist.max() - hist.min())

    assert spread(t) < spread(lin_t)


def test_clip_maps_clamps_outliers_inside_the_brain_only():
    data = phantom()
    data["r1"][0, 10, 10, 10] = 500.0  # one outlier voxel inside the phantom
    t = T.ContrastiveViewsd(mode="seqinv", patch_size=PATCH)
    maps = T.QMRIMaps.from_data(data, T.MAP_KEYS, None, "r2")
    clipped = t._clipped(maps, None)
    assert float(clipped.r1.max()) < 100.0
    background = maps.pd == 0
    assert torch.equal(clipped.r1[background], maps.r1[background])
    off = T.ContrastiveViewsd(mode="seqinv", patch_size=PATCH, clip_maps=None)._clipped(maps, None)
    assert float(off.r1.max()) == 500.0
    with pytest.raises(Exception, match="clip_maps"):
        T.ContrastiveViewsd(mode="seqinv", clip_maps=(99.0, 1.0))
    with pytest.raises(Exception, match="view_norm"):
        T.ContrastiveViewsd(mode="seqinv", view_norm="minmax")

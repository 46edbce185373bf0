"""The batched view path (custom.transforms.batched) against the per-sample reference (ContrastiveViewsd).

Tiny phantoms (tests/test_transforms.py) and 16^3 views. The two paths draw from different random streams, so
they are compared by distributions (parameter laws, image statistics) and by the building blocks, which must
reproduce MONAI's / the per-sample functions exactly (resampling, Gibbs ringing, normalisation, fields, physics).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Affine, GibbsNoise

from custom import transforms as T
from custom.dense import level_grid, map_points, sample_at
from custom.errors import InputError
from custom.fields import polynomial_log_field
from custom.intensity import normalise_view, percentile, zscore
from custom.sequences import ALL_SEQUENCES, PARAM_NAMES, SEQUENCES, SequenceSample, sample_sequence, simulate
from custom.transforms import batched_augment as BA
from custom.transforms.batched import _clip_maps
from custom.transforms.batched_protocols import MAP_CHANNELS, SEQUENCE_CHANNELS, sample_params, simulate_family
from tests.test_transforms import PATCH, N, no_augment, phantom, views

OUTPUTS = ("image1", "image2", "image1_recon", "image2_recon")


def same_records(a: dict, b: dict) -> bool:
    """Collated protocol records equal (names, presets, parameters with NaN in the same places)."""
    return (
        a["sequence"] == b["sequence"]
        and a["preset"] == b["preset"]
        and all(torch.allclose(a[k], b[k], equal_nan=True) for k in PARAM_NAMES)
    )


def batched(mode: str, seed: int, data: dict | list[dict] | None = None, n: int = 2, device=None, **kw) -> dict:
    """Batched views of ``n`` copies of ``data`` (or of the list of subjects) through the loader transforms and
    the per-batch call, as the bundle's ``view_path: batched`` runs them."""
    kw.setdefault("sample_voxels", 4096)  # the phantom's brain has ~6000 voxels
    stage = T.ContrastiveViewStage("batched", mode=mode, patch_size=kw.pop("patch_size", PATCH), seed=seed, **kw)
    prepare, region = stage.worker_transforms
    region.set_random_state(seed)
    subjects = data if isinstance(data, list) else [data if data is not None else phantom()] * n
    items = [region(prepare(dict(d))) for d in subjects]
    return stage.views(list_data_collate(items), device=device)


# ------------------------------------------------------------------------------------------------------------
# Outputs, modes, reproducibility
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["base", "seqaug", "seqinv"])
def test_outputs_keys_shapes_dtypes(mode):
    out = batched(mode, 0, n=3)
    for key in OUTPUTS:
        x = out[key]
        assert x.shape == (3, 1, PATCH, PATCH, PATCH) and x.dtype == torch.float32, key
        assert torch.isfinite(x).all(), key
    for key in ("image1_affine", "image2_affine"):
        assert out[key].shape == (3, 4, 4) and out[key].dtype == torch.float64
    for key in ("image1_sequence", "image2_sequence"):
        record = out[key]
        assert len(record["sequence"]) == 3 and set(PARAM_NAMES) <= set(record)
        assert all(record[p].shape == (3,) and record[p].dtype == torch.float64 for p in PARAM_NAMES)
    assert not any(k.startswith("view_") for k in out)  # the loader's keys are consumed
    # the same keys and record layout as the per-sample path's collated batch
    ref = list_data_collate([views(mode, s) for s in range(3)])
    assert {k for k in ref if k.startswith("image")} == {k for k in out if k.startswith("image")}
    assert set(ref["image1_sequence"]) == set(out["image1_sequence"])
    assert not torch.equal(out["image1"], out["image1_recon"])  # artefacts on the view only


def test_seqinv_two_sequence_types_seqaug_one_protocol_base_mprage():
    seen = set()
    for seed in range(6):
        out = batched("seqinv", seed, n=4, patch_size=8)
        for s1, s2 in zip(out["image1_sequence"]["sequence"], out["image2_sequence"]["sequence"], strict=True):
            assert s1 != s2
            seen.update((s1, s2))
    assert seen == set(SEQUENCES)
    for seed in range(3):
        out = batched("seqaug", seed, n=4, patch_size=8)
        assert same_records(out["image1_sequence"], out["image2_sequence"])
    out = batched("base", 0, n=4, patch_size=8)
    assert set(out["image1_sequence"]["sequence"]) == {"mprage"}
    assert same_records(out["image1_sequence"], out["image2_sequence"])
    # seqaug, views covering the whole volume, no augmentation: both targets are the same image
    same = batched("seqaug", 3, patch_size=N, augment={**no_augment(), "margin": 0}, shared_region=1.0)
    assert torch.allclose(same["image1_recon"], same["image2_recon"], atol=1e-5)


def test_base_mode_with_a_real_mprage():
    data = {**phantom(), "t1": torch.full((1, N, N, N), 7.0)}
    linear = {"view_norm": "robust_max", "zscore": False}
    out = batched("base", 0, data, mprage_key="t1", augment=no_augment(), **linear)
    assert torch.allclose(out["image1_recon"], torch.ones_like(out["image1_recon"]))
    assert out["image1_sequence"]["preset"] == ["real", "real"]
    stage = T.ContrastiveViewStage("batched", mode="base", patch_size=PATCH, mprage_key="t1")
    prepare, region = stage.worker_transforms
    with pytest.raises(InputError, match="real MPRAGE"):
        stage.collate_fn([region(prepare(dict(d))) for d in (data, phantom())])


def test_seeded_reproducible_and_seed_dependent():
    a, b, c = batched("seqinv", 5), batched("seqinv", 5), batched("seqinv", 6)
    for key in (*OUTPUTS, "image1_affine"):
        assert torch.equal(a[key], b[key]), key
    assert same_records(a["image1_sequence"], b["image1_sequence"])
    assert not torch.equal(a["image1"], c["image1"])
    # set_random_state restarts the stream
    stage = T.ContrastiveViewStage("batched", mode="seqinv", patch_size=PATCH)
    prepare, region = stage.worker_transforms
    region.set_random_state(1)
    batch = list_data_collate([region(prepare(phantom())) for _ in range(2)])
    first = stage.views.set_random_state(9)(dict(batch))
    again = stage.views.set_random_state(9)(dict(batch))
    assert torch.equal(first["image2"], again["image2"])


def test_qmri_image_key_equals_separate_maps():
    data = phantom()
    four = {"qmri": torch.cat([data[k] for k in T.MAP_KEYS], dim=0)}
    a, b = batched("seqinv", 2, data), batched("seqinv", 2, four, qmri_key="qmri")
    for key in OUTPUTS:
        assert torch.equal(a[key], b[key]), key


def test_workers_path_collate_equals_the_batch_call():
    stage = T.ContrastiveViewStage("batched_workers", mode="seqinv", patch_size=PATCH, seed=4)
    prepare, region = stage.worker_transforms
    assert stage.batch_views is None and isinstance(stage.collate_fn, T.BatchedViewsCollate)
    region.set_random_state(2)
    out = stage.collate_fn([region(prepare(phantom())) for _ in range(2)])  # regions are views, not copies
    ref = batched("seqinv", 4, n=2)  # copied regions, the same seeds
    for key in OUTPUTS:
        assert torch.equal(out[key], ref[key]), key


def test_volume_smaller_than_the_patch_and_independent_crops():
    out = batched("seqinv", 1, patch_size=(32, 28, 20))
    assert out["image1"].shape == (2, 1, 32, 28, 20) and torch.isfinite(out["image2_recon"]).all()
    out = batched("seqinv", 1, shared_region=None)  # each view cropped anywhere in the volume
    assert out["image1"].shape == (2, 1, PATCH, PATCH, PATCH)


def test_empty_protocols_are_redrawn_then_fall_back_to_clinical():
    """The paper FSE ranges (TE up to 3 s) give empty images: redrawn within max_tries, else the clinical preset."""
    for seed in range(3):
        out = batched("seqaug", seed, n=6, sequences=["fse"], augment=no_augment(), zscore=False)
        assert set(out["image1_sequence"]["preset"]) == {"paper"}
        assert bool((out["image1_recon"].amax(dim=(1, 2, 3, 4)) > 0).all())
    fell_back = 0
    for seed in range(6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = batched("seqaug", seed, n=6, sequences=["fse"], max_tries=1)
        if any("empty" in str(w.message) for w in caught):
            fell_back += 1
            assert "clinical" in out["image1_sequence"]["preset"]
    assert fell_back > 0


def test_invalid_settings_are_clear_errors():
    with pytest.raises(InputError, match="mode must be one of"):
        T.ContrastiveViewStage("batched", mode="simclr")
    with pytest.raises(InputError, match="view_path"):
        T.ContrastiveViewStage("gpu")
    with pytest.raises(InputError, match=r"unknown view setting\(s\) \['patchsize'\]"):
        T.ContrastiveViewStage("per_sample", patchsize=32)
    per_sample = T.ContrastiveViewStage("per_sample", patch_size=32, shared_region=1.5).worker_transforms[0]
    assert per_sample.patch_size == (32, 32, 32) and per_sample.mode == "seqinv" and per_sample.clip_maps == (0.5, 99.5)
    with pytest.raises(InputError, match="view_norm"):
        T.ContrastiveViewStage("batched", view_norm="minmax")
    with pytest.raises(TypeError, match="unknown augment"):
        T.ContrastiveViewStage("batched", augment={"rotate": 10})
    with pytest.raises(ValueError, match="seqinv needs"):
        T.ContrastiveViewStage("batched", mode="seqinv", sequences=["fse"])
    with pytest.raises(ValueError, match="shared_region"):
        T.ContrastiveViewStage("batched", shared_region=0.5)


# ------------------------------------------------------------------------------------------------------------
# Building blocks against MONAI and the per-sample functions
# ------------------------------------------------------------------------------------------------------------
def test_warp_equals_monai_affine_and_flips_and_its_affine():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 20, 22, 18, generator=g)
    angles = torch.tensor([[0.2, -0.1, 0.25]], dtype=torch.float64)
    shear = torch.tensor([[0.03, -0.02, 0.01, 0.04, -0.05, 0.02]], dtype=torch.float64)
    scale = torch.tensor([[1.1, 0.9, 1.05]], dtype=torch.float64)
    matrix = BA._rotations(angles) @ BA._shears(shear) @ torch.diag_embed(scale)
    shape = (12, 14, 10)
    ref = Affine(
        rotate_params=angles[0].tolist(),
        shear_params=shear[0].tolist(),
        scale_params=scale[0].tolist(),
        spatial_size=shape,
        mode="bilinear",
        padding_mode="zeros",
        image_only=True,
    )(MetaTensor(img))
    centre = (torch.tensor(img.shape[1:], dtype=torch.float64) - 1) / 2
    assert torch.allclose(BA.warp(img[None], matrix, centre[None], shape)[0], ref.as_tensor(), atol=1e-5)
    # MONAI's voxel map of the output (what the per-sample path hands the dense term) is view_to_window's
    assert torch.allclose(BA.view_to_window(matrix, centre[None], shape)[0], ref.affine.double(), atol=1e-6)
    flips = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))
    flipped = BA.warp(img[None], matrix @ flips, centre[None], shape)[0]
    assert torch.allclose(flipped, torch.flip(ref.as_tensor(), dims=(1, 3)), atol=1e-5)
    # crop-and-flip views take the copy path: the same values as interpolation at whole voxels
    plain = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))[None]
    copied = BA.warp(img[None], plain, centre[None], shape)
    expected = torch.flip(img[:, 4:16, 4:18, 4:14], dims=(2,))
    assert torch.equal(copied[0], expected)


def test_gibbs_equals_monai():
    g = torch.Generator().manual_seed(1)
    for shape in ((16, 15, 14), (16, 16, 16)):
        x = torch.rand(3, 1, *shape, generator=g)
        alpha = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
        out = BA.gibbs_ringing_(x.clone(), alpha, torch.tensor([True, True, False]))
        for i in range(2):
            assert torch.allclose(out[i], torch.as_tensor(GibbsNoise(float(alpha[i]))(x[i])), atol=1e-5)
        assert torch.equal(out[2], x[2])


def test_normalisation_and_zscore_equal_the_per_sample_functions():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 30, 31, 29, generator=g) ** 3
    out = BA.normalise_views(x.clone(), "histeq")
    for i in range(3):
        assert torch.allclose(out[i], normalise_view(x[i], "histeq"), atol=1e-6)
    valid = torch.zeros_like(x, dtype=torch.bool)
    valid[:, :, :20, :25, :29] = True
    masked = BA.normalise_views(x.clone(), "histeq", valid=valid)
    for i in range(3):
        ref = normalise_view(x[i, :, :20, :25, :29], "histeq")
        assert torch.allclose(masked[i, :, :20, :25, :29], ref, atol=1e-6)
    assert float(masked[~valid].abs().max()) == 0.0
    scale = torch.tensor([2.0, 4.0, 8.0])
    linear = BA.normalise_views(x.clone(), "robust_max", scale=scale)
    assert torch.allclose(linear, x / scale[:, None, None, None, None])
    constant = BA.normalise_views(torch.full((1, 1, 8, 8, 8), 3.0), "histeq")
    assert float(constant.abs().max()) == 0.0
    z = BA.zscore_views_(x.clone())
    for i in range(3):
        assert torch.allclose(z[i], zscore(x[i]), atol=1e-5)
    big = torch.rand(2, 70**3, generator=g)
    for q in (0.5, 95.0):
        got = BA.batched_percentile(big, q)
        assert got.tolist() == [float(percentile(big[i], q)) for i in range(2)]


def test_fields_equal_polynomial_log_field():
    g = torch.Generator().manual_seed(3)
    coeffs = torch.rand(2, 9, generator=g, dtype=torch.float64) - 0.5
    boxes = [((3, 4, 5), (20, 18, 16)), ((-2, 0, 1), (10, 12, 14))]
    fields = BA.legendre_fields(
        coeffs,
        2,
        (5, 6, 7),
        offsets=torch.tensor([b[0] for b in boxes]),
        full_shapes=torch.tensor([b[1] for b in boxes]),
    )
    for i, (offset, full) in enumerate(boxes):
        ref = polynomial_log_field(coeffs[i].tolist(), (5, 6, 7), degree=2, offset=offset, full_shape=full)
        assert torch.allclose(fields[i], ref, atol=1e-6)
    whole = polynomial_log_field(coeffs[0].tolist(), (20, 18, 16), degree=2)
    points = torch.tensor([[[3.0, 4.0, 5.0], [7.0, 9.0, 11.0]]])
    at = BA.legendre_at_points(coeffs[:1], 2, points, torch.tensor([[20, 18, 16]]))
    assert torch.allclose(at[0], torch.stack([whole[3, 4, 5], whole[7, 9, 11]]), atol=1e-6)


@pytest.mark.parametrize("mprage_model", ["inversion", "eq4"])
def test_simulate_family_equals_sequences_simulate(mprage_model):
    data = phantom(with_r2=True)
    g = torch.Generator().manual_seed(4)
    for name in ALL_SEQUENCES:
        for preset in ("paper", "clinical"):
            params = sample_params(name, preset, 3, g)
            maps = {c: data[c].expand(3, -1, -1, -1).unsqueeze(1) for c in SEQUENCE_CHANNELS[name]}
            b1 = 0.9 + 0.2 * torch.rand(3, 1, N, N, N, generator=g)
            out = simulate_family(name, params, maps, b1, mprage_model=mprage_model)
            for i in range(3):
                sample = SequenceSample(name, {k: float(v[i]) for k, v in params.items()}, preset=preset)
                ref = simulate(
                    sample, data["pd"], data["r1"], data["r2s"], data["mt"], r2=data["r2"], b1=b1[i],
                    mprage_model=mprage_model,
                )  # fmt: skip
                assert torch.allclose(out[i], ref, rtol=1e-5, atol=1e-7), (name, preset)
    assert set(MAP_CHANNELS) >= {c for cs in SEQUENCE_CHANNELS.values() for c in cs}


def test_clipped_maps_equal_the_per_sample_clipping():
    data = phantom()
    data["r1"][0, 10, 10, 10] = 500.0
    maps = T.QMRIMaps.from_data(data, T.MAP_KEYS, None, "r2")
    ref = T.ContrastiveViewsd(mode="seqinv", patch_size=PATCH)._clipped(maps, None)
    ours = _clip_maps(maps, None, (0.5, 99.5))
    for name in ("pd", "r1", "r2s", "mt"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))


# ------------------------------------------------------------------------------------------------------------
# Distributions against the per-sample path
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["paper", "clinical"])
def test_protocol_parameter_laws_match_sample_sequence(preset):
    g = torch.Generator().manual_seed(5)
    for name in ALL_SEQUENCES:
        vectorised = sample_params(name, preset, 4000, g)
        scalar = [sample_sequence(name, preset=preset, generator=g).params for _ in range(800)]
        assert set(vectorised) == set(scalar[0]), name
        for key, values in vectorised.items():
            ref = torch.tensor([s[key] for s in scalar], dtype=torch.float64)
            # the same quartiles (on a log scale: the times are log-distributed)
            lv, lr = torch.log(values.clamp(min=1e-9)), torch.log(ref.clamp(min=1e-9))
            spread = float(lr.quantile(0.75) - lr.quantile(0.25)) + 1e-6
            for q in (0.25, 0.5, 0.75):
                assert abs(float(lv.quantile(q) - lr.quantile(q))) < 0.2 * spread + 0.02, (name, key, q)
        if preset == "clinical":
            assert bool((vectorised["te"] < vectorised["tr"]).all())


def test_view_statistics_match_the_per_sample_path():
    """z-scored views and targets; equalised range; target intensity distribution, across seeds."""
    per_sample = [views("seqinv", s) for s in range(8)]
    ours = [batched("seqinv", s, n=2) for s in range(4)]
    for key in OUTPUTS:
        for out in ours:
            rows = out[key].reshape(2, -1)
            assert torch.allclose(rows.mean(1), torch.zeros(2), atol=1e-4)
            assert torch.allclose(rows.std(1, unbiased=False), torch.ones(2), atol=1e-3)
    # without z-scoring nor augmentation the target is the equalised crop: [0, 1], both ends used
    aug = {**no_augment(), "margin": 0}
    out = batched("seqinv", 4, augment=aug, zscore=False)
    t = out["image1_recon"]
    assert float(t.amin()) == 0.0 and float(t.amax()) == pytest.approx(1.0)

    def profile(targets: list[torch.Tensor]) -> torch.Tensor:
        values = torch.cat([x.reshape(-1) for x in targets])
        return torch.histc(values, bins=4, min=-2.0, max=2.0) / values.numel()

    ref = profile([o[k].as_tensor() for o in per_sample for k in ("image1_recon", "image2_recon")])
    got = profile([o[k] for o in ours for k in ("image1_recon", "image2_recon")])
    assert torch.allclose(ref, got, atol=0.08), (ref, got)


def test_artefact_laws_match_the_per_sample_transforms():
    settings = BA.augment_settings({})
    g = torch.Generator().manual_seed(6)
    n, size = 400, 16
    draws = BA.sample_artefacts(n, settings, (size,) * 3, g)
    # cuboid dropout: fraction of dropped voxels (RandCuboidDropoutd with the same settings as reference)
    dropped = BA.cuboid_dropout_(torch.ones(n, 1, size, size, size), draws.boxes_start, draws.boxes_end)
    ours = float((dropped == 0).float().mean())
    drop = T.RandCuboidDropoutd("x", holes=settings["dropout_holes"], size=settings["dropout_size"])
    drop.set_random_state(0)
    ref = sum(float((drop({"x": torch.ones(1, size, size, size)})["x"] == 0).float().mean()) for _ in range(n)) / n
    assert ours == pytest.approx(ref, rel=0.1)
    # bias field: the multiplicative field's range over a view (RandBiasFieldTorchd, same coefficient laws)
    ones = torch.ones(n, 1, size, size, size)
    biased = BA.bias_field_(ones.clone(), draws.bias_coeffs, settings["bias_degree"], draws.bias_applied)
    bias = T.RandBiasFieldTorchd("x", degree=settings["bias_degree"], coeff_range=settings["bias_coeff"])
    bias.set_random_state(0)
    ref_fields = torch.stack([bias({"x": torch.ones(1, size, size, size)})["x"] for _ in range(100)])
    for q in (0.01, 0.5, 0.99):
        assert float(biased.quantile(q)) == pytest.approx(float(ref_fields.quantile(q)), rel=0.05), q
    # noise and Gibbs: per-view probabilities and ranges of the per-sample transforms
    assert bool(draws.noise_applied.all()) and bool(draws.gibbs_applied.all())
    assert float(draws.noise_sigma.min()) >= 0.0 and float(draws.noise_sigma.max()) <= 0.2
    assert float(draws.gibbs_alpha.max()) <= 0.8
    noisy = BA.rician_(torch.zeros(n, 1, 4, 4, 4), draws.noise_sigma, draws.noise_applied, g)
    rayleigh = noisy.mean(dim=(1, 2, 3, 4)) / draws.noise_sigma.float()
    assert float(rayleigh.mean()) == pytest.approx(math.sqrt(math.pi / 2), rel=0.05)
    # the spatial draws: probability of the affine, rotation range, flips
    spatial = BA.sample_spatial(n, settings, g)
    assert 0.7 < float(spatial.affine_applied.float().mean()) < 0.9
    assert 0.4 < float(spatial.flips.float().mean()) < 0.6
    assert torch.allclose(torch.linalg.det(spatial.matrix).abs(), torch.ones(n, dtype=torch.float64))  # no scale
    plain = spatial.matrix[~spatial.affine_applied]
    assert torch.equal(plain.abs(), torch.eye(3, dtype=torch.float64).expand_as(plain))  # flips only


# ------------------------------------------------------------------------------------------------------------
# Affines: the dense term's correspondence
# ------------------------------------------------------------------------------------------------------------
def ramp_phantom(n: int = 28) -> dict[str, torch.Tensor]:
    """PD linear in the voxel position, other maps constant: an FSE image is linear in position."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    pd = 0.2 + 0.6 * (grid[0] + 2 * grid[1] + 3 * grid[2]) / (6 * (n - 1))
    const = torch.ones(1, n, n, n)
    return {"pd": pd[None], "r1": const, "r2s": 10 * const, "mt": 0.01 * const, "r2": 10 * const}


def test_affines_map_each_view_voxel_to_its_anatomy_and_between_views():
    data = ramp_phantom()
    aug = {**no_augment(), "affine_prob": 1.0, "flip_prob": 0.5}
    linear = {"view_norm": "robust_max", "zscore": False, "b1_field": 0.0, "clip_maps": None}
    for seed in range(3):
        out = batched("seqaug", seed, data, n=2, sequences=["fse"], augment=aug, **linear)
        pts = level_grid((PATCH,) * 3, 0, torch.device("cpu"), torch.float64)
        for v in ("image1", "image2"):
            target, affine = out[f"{v}_recon"], out[f"{v}_affine"]
            for b in range(2):
                coords = pts @ affine[b, :3, :3].T + affine[b, :3, 3]  # view voxel -> volume voxel
                pd = 0.2 + 0.6 * (coords[:, 0] + 2 * coords[:, 1] + 3 * coords[:, 2]) / (6 * 27)
                ratio = target[b, 0].reshape(-1).double() / pd
                # trilinear interpolation of a linear image is exact wherever the samples stay inside the crop
                exact = (ratio / ratio.median() - 1).abs() < 1e-4
                assert float(exact.double().mean()) > 0.6, (seed, v)
        # between the views, as custom.dense maps them
        v1, v2 = out["image1_recon"], out["image2_recon"]
        mapped = map_points(pts.float()[None].expand(2, -1, -1), out["image2_affine"], out["image1_affine"])
        vals, inside = sample_at(v1, mapped, 0)
        ref = v2.flatten(2).transpose(1, 2)
        keep = inside & (ref[..., 0] > 0)
        close = ((vals[keep] - ref[keep]).abs() / ref[keep].mean() < 1e-3).double().mean()
        assert keep.sum() > 500 and float(close) > 0.6


def test_per_sample_affines_follow_the_same_convention():
    """The same check on ContrastiveViewsd: both paths hand the dense term voxel-to-volume maps."""
    data = ramp_phantom()
    aug = {**no_augment(), "affine_prob": 1.0, "flip_prob": 0.5}
    out = views("seqaug", 1, data, sequences=["fse"], augment=aug, view_norm="robust_max", zscore=False,
                b1_field=0.0, clip_maps=None)  # fmt: skip
    pts = level_grid((PATCH,) * 3, 0, torch.device("cpu"), torch.float64)
    affine = out["image1_affine"]
    coords = pts @ affine[:3, :3].T + affine[:3, 3]
    pd = 0.2 + 0.6 * (coords[:, 0] + 2 * coords[:, 1] + 3 * coords[:, 2]) / (6 * 27)
    ratio = out["image1_recon"].as_tensor().reshape(-1).double() / pd
    assert float(((ratio / ratio.median() - 1).abs() < 1e-4).double().mean()) > 0.6


# ------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_match_cpu_for_a_seed():
    """Parameters come from a CPU generator: with the noise off, CPU and CUDA give the same views (float
    rounding apart); with it on, the same statistics."""
    aug = {"noise_prob": 0.0}
    cpu = batched("seqinv", 3, n=3, augment=aug)
    gpu = batched("seqinv", 3, n=3, augment=aug, device="cuda")
    for key in OUTPUTS:
        assert gpu[key].device.type == "cuda", key
        diff = (gpu[key].cpu() - cpu[key]).abs()
        assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.1, key
    assert same_records(gpu["image1_sequence"], cpu["image1_sequence"])
    assert torch.allclose(gpu["image1_affine"], cpu["image1_affine"])
    noisy = batched("seqinv", 3, n=3, device="cuda")
    again = batched("seqinv", 3, n=3, device="cuda")
    for key in OUTPUTS:
        assert torch.equal(noisy[key], again[key]), key
        rows = noisy[key].reshape(3, -1)
        assert torch.allclose(rows.mean(1).cpu(), torch.zeros(3), atol=1e-4)
    for mode in ("base", "seqaug"):
        out = batched(mode, 0, device="cuda", view_norm="robust_max")
        assert out["image2"].device.type == "cuda"


# ------------------------------------------------------------------------------------------------------------
# The bundle's config key
# ------------------------------------------------------------------------------------------------------------
def test_view_path_key_builds_each_path_with_the_same_settings():
    from monai.bundle import ConfigParser

    from tests.test_bundle_pretrain import BUNDLE, TRAIN

    def stage(files: list[str], path: str) -> T.ContrastiveViewStage:
        parser = ConfigParser()
        parser.read_config(files)
        parser["bundle_root"] = str(BUNDLE)
        parser["view_path"] = path
        return parser.get_parsed_content("train#views")

    small = [TRAIN, str(BUNDLE / "configs" / "cpu_small.yaml")]
    for files, flips in (([TRAIN], 0.5), (small, 0.0)):
        per_sample = stage(files, "per_sample")
        assert isinstance(per_sample.worker_transforms[0], T.ContrastiveViewsd) and per_sample.batch_views is None
        ours = stage(files, "batched")
        assert ours.batch_views is ours.views and ours.views.settings["flip_prob"] == flips
        assert ours.views.patch == per_sample.worker_transforms[0].patch_size
    parser = ConfigParser()
    parser.read_config(TRAIN)
    assert "torch.cuda.is_available()" in parser["view_path"]  # batched on a GPU, per-sample on a CPU


@pytest.mark.parametrize("path", ["batched", "batched_workers"])
def test_bundle_trains_with_the_batched_path(synthetic_dataset, tmp_path, path):
    from tests.test_bundle_pretrain import run_workflow, tiny_overrides

    qmri = synthetic_dataset(subjects=3, seed=0, resolution=6.0) / "qmri"
    workflow = run_workflow(**tiny_overrides(qmri, tmp_path, view_path=path, dense_weight=0.5))
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    assert (trainer.batch_views is not None) == (path == "batched")
    output = trainer.state.output
    assert output["image"].shape == (2, 1, 32, 32, 32) and math.isfinite(float(output["loss"]))
    assert "dense" in output and (tmp_path / "model.pt").is_file()

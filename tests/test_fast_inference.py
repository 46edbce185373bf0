"""Fast sliding-window inference options (custom.fast_inference, custom.segmentation.build_inferer, cpu_fast).

Tiny networks and volumes only (the whole file takes about 20 s on one core): the default is MONAI's sliding window
exactly (also as every downstream inference.yaml builds it), bfloat16 falls back to float32 where the CPU has no
native bfloat16, the channels-last instance norm is instance norm, the foreground crop pastes back onto the full grid
exactly with background outside, and the fast paths agree with the default path on a briefly trained tiny network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

import custom.fast_inference as fast
from custom.fast_inference import (
    CPU_FAST,
    ChannelsLastInstanceNorm,
    FastSlidingWindowInferer,
    foreground_box,
    grow_box,
    inference_copy,
    resolve_dtype,
    speed_options,
    window_count,
)
from custom.inference import NiftiPredictor
from custom.preprocess import image_preprocessing
from custom.segmentation import DownstreamSettings, build_inferer, build_network

REPO = Path(__file__).resolve().parents[1]
SETTINGS = DownstreamSettings(encoder_features=(4, 8, 16), decoder_features=(16, 8, 8, 8), patch_size=(32, 32, 32))


def tiny_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(SETTINGS).eval()


def phantom(
    shape: tuple[int, int, int] = (40, 44, 36),
    seed: int = 0,
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0),
    normalised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-tissue "brain" in a zero background: image ``(1, 1, *shape)`` and labels ``(1, 1, *shape)``.

    An ellipsoid (label 1, intensity ~0.5) with a core (label 2, intensity ~1.0), mild noise inside only; with
    ``normalised``, intensities mapped as the bundles' preprocessing maps a scan (0.5th..99.5th percentiles of the
    nonzero voxels to 0..1, so the background lies below 0).
    """
    gen = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing="ij")
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, shift, (0.6, 0.65, 0.55), strict=True))
    labels = (r < 1.0).long() + (r < 0.35).long()
    noise = 0.05 * torch.randn(shape, generator=gen)
    image = (torch.tensor([0.0, 0.5, 1.0])[labels] + noise).clamp_min(0.01) * (labels > 0)
    if normalised:
        low, high = torch.quantile(image[labels > 0], torch.tensor([0.005, 0.995]))
        image = (image - low) / (high - low)
    return image[None, None], labels[None, None]


def brain_like(shape: tuple[int, int, int] = (40, 44, 36), seed: int = 0) -> torch.Tensor:
    return phantom(shape, seed)[0]


@pytest.fixture(scope="module")
def trained() -> Iterator[nn.Module]:
    """The tiny U-Net trained briefly (100 steps, ~8 s) on random 24^3 patches of shifted phantoms, so each patch
    holds a different share of background as in patch training: confident labels, like a trained network's.

    One thread: these tiny steps are far slower with two threads on a busy machine (OpenMP waits).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = tiny_network()
        net.train()
        opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        shape, size = (40, 44, 36), 24
        for step in range(100):
            shift = tuple(float(v) for v in (torch.rand(3, generator=gen) - 0.5) * 0.6)
            image, labels = phantom(shape, seed=step, shift=shift)  # type: ignore[arg-type]
            start = [int(torch.randint(0, s - size + 1, (1,), generator=gen)) for s in shape]
            patch = (slice(None), slice(None), *(slice(b, b + size) for b in start))
            loss = nn.functional.cross_entropy(net(image[patch]), labels[patch][:, 0])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    yield net.eval()


class Pointwise(nn.Module):
    """Per-voxel 3-channel output: each voxel's output depends on that voxel only (and a bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 2.0 * x + 1.0, -x], dim=1)


def run(inferer: FastSlidingWindowInferer, x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return inferer(x, net)


# ---------------------------------------------------------------------------------------------------------------
# Defaults and precision
# ---------------------------------------------------------------------------------------------------------------
def test_default_is_monai_sliding_window_exactly() -> None:
    net, x = tiny_network(), brain_like()
    inferer = build_inferer(SETTINGS)
    assert isinstance(inferer, SlidingWindowInferer) and inferer.is_default
    plain = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        expected = plain(x, net)
        torch.testing.assert_close(inferer(x, net), expected, rtol=0, atol=0)
        torch.testing.assert_close(build_inferer(SETTINGS, cpu_fast=False)(x, net), expected, rtol=0, atol=0)


def test_speed_options() -> None:
    for off in (None, False, "false", "False", "0", "no", ""):
        assert speed_options(off) == {}
    for on in (True, "true", "True", "1", "yes"):
        assert speed_options(on) == CPU_FAST == {"precision": "auto", "channels_last": True}
    assert speed_options({"crop_foreground": True, "overlap": 0.0}) == {
        **CPU_FAST,
        "crop_foreground": True,
        "overlap": 0.0,
    }
    assert speed_options({"precision": "fp32"})["precision"] == "fp32"
    # as MONAI's command line passes --cpu_fast "{crop_foreground: false}"
    assert speed_options({"crop_foreground": "false", "channels_last": "False"}) == {
        "precision": "auto",
        "channels_last": False,
        "crop_foreground": False,
    }
    assert "crop_foreground" not in speed_options(True, task="regression")
    with pytest.raises(ValueError, match="unknown option"):
        speed_options({"crop": True})
    with pytest.raises(ValueError, match="cpu_fast"):
        speed_options("fast")
    with pytest.raises(TypeError, match="cpu_fast"):
        speed_options(3)  # type: ignore[arg-type]


def test_build_inferer_cpu_fast_and_overrides() -> None:
    plain = build_inferer(SETTINGS, cpu_fast=False)
    assert plain.is_default and plain.overlap == 0.25 and plain.sw_batch_size == 4
    fast_inferer = build_inferer(SETTINGS, cpu_fast=True)
    assert fast_inferer.precision == "auto" and fast_inferer.channels_last and not fast_inferer.crop_foreground
    assert fast_inferer.overlap == 0.25 and fast_inferer.sw_batch_size == 4 and fast_inferer.mode == "gaussian"
    mixed = build_inferer(SETTINGS, 0.5, 2, cpu_fast={"overlap": 0.0}, crop_foreground=True, channels_last=False)
    assert mixed.overlap == 0.5 and mixed.sw_batch_size == 2 and mixed.crop_foreground and not mixed.channels_last
    with pytest.raises(TypeError, match="unknown option"):
        build_inferer(SETTINGS, roi_size=(8, 8, 8))


@pytest.mark.parametrize(
    ("bundle", "task", "channels"),
    [("ixi_tissue_seg", "segmentation", 4), ("arc_lesion_seg", "segmentation", 2), ("ixi_denoise", "regression", 1)],
)
def test_inference_configs_keep_the_plain_sliding_window_unless_asked(bundle: str, task: str, channels: int) -> None:
    """Each downstream inference.yaml builds exactly the former inferer by default; cpu_fast true: the preset."""
    inferers = {}
    for cpu_fast in (None, True):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.yaml"))
        parser["settings"] = (
            f"$custom.segmentation.DownstreamSettings(task={task!r}, out_channels={channels}, "
            "encoder_features=(4, 8, 16), decoder_features=(16, 8, 8, 8), patch_size=(32, 32, 32))"
        )
        if cpu_fast is not None:
            parser["cpu_fast"] = cpu_fast
        else:
            assert parser["cpu_fast"] is False
        inferers[cpu_fast] = parser.get_parsed_content("inferer")
    default, fast_inferer = inferers[None], inferers[True]
    assert isinstance(default, FastSlidingWindowInferer) and default.is_default
    assert (default.roi_size, default.sw_batch_size, default.overlap, default.mode) == (
        (32, 32, 32),
        4,
        0.25,
        "gaussian",
    )
    assert fast_inferer.precision == "auto" and fast_inferer.channels_last and not fast_inferer.crop_foreground
    x = brain_like((40, 44, 36))
    net = build_network(
        DownstreamSettings.from_dict({**SETTINGS.to_dict(), "task": task, "out_channels": channels})
    ).eval()
    plain = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        torch.testing.assert_close(default(x, net), plain(x, net), rtol=0, atol=0)


def test_resolve_dtype_and_bf16_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.float32  # CUDA: the predictor's amp autocast applies
    assert resolve_dtype("auto", "cpu", supported=True) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", supported=False) == torch.float32
    with caplog.at_level(logging.WARNING, logger="custom.fast_inference"):
        assert resolve_dtype("bf16", "cpu", supported=False) == torch.float32
    assert "no native bfloat16" in caplog.text
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        build_inferer(SETTINGS, precision="half")

    # a CPU without native bfloat16: the bf16 option runs the float32 network itself, output unchanged
    monkeypatch.setattr(fast, "bf16_supported", lambda: False)
    net, x = tiny_network(), brain_like()
    inferer = build_inferer(SETTINGS, precision="bf16")
    out = run(inferer, x, net)
    assert inferer.last_run["dtype"] == torch.float32
    torch.testing.assert_close(out, run(build_inferer(SETTINGS), x, net), rtol=0, atol=0)


def test_bf16_supported_is_a_bool() -> None:
    assert isinstance(fast.bf16_supported(), bool)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_runs_and_agrees(monkeypatch: pytest.MonkeyPatch, channels_last: bool) -> None:
    """bfloat16 (emulated where the CPU lacks it: forced on here) gives float32 logits close to the default's."""
    monkeypatch.setattr(fast, "bf16_supported", lambda: True)
    net, x = tiny_network(), brain_like()
    ref = run(build_inferer(SETTINGS), x, net)
    inferer = build_inferer(SETTINGS, precision="bf16", channels_last=channels_last)
    out = run(inferer, x, net)
    assert inferer.last_run["dtype"] == torch.bfloat16
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert next(net.parameters()).dtype == torch.float32  # the network itself is untouched


def test_channels_last_fp32_is_the_same_function() -> None:
    net, x = tiny_network(), brain_like()
    ref = run(build_inferer(SETTINGS), x, net)
    out = run(build_inferer(SETTINGS, channels_last=True), x, net)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_matches(affine: bool) -> None:
    torch.manual_seed(1)
    norm = nn.InstanceNorm3d(6, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7, 4)
    y = ChannelsLastInstanceNorm(norm)(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, norm(x), rtol=1e-5, atol=1e-5)


def test_inference_copy_leaves_the_network_alone() -> None:
    net = tiny_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = inference_copy(net, torch.bfloat16, channels_last=True)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in copy.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())
    for k, v in net.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])


def test_copy_is_cached_until_the_weights_change() -> None:
    net, x = tiny_network(), brain_like((32, 32, 32))
    inferer = build_inferer(SETTINGS, channels_last=True)
    first = run(inferer, x, net)
    cached = inferer._copy
    run(inferer, x, net)
    assert inferer._copy is cached
    with torch.no_grad():
        net.head.bias.add_(1.0)  # an in-place update (optimiser step, checkpoint load)
    changed = run(inferer, x, net)
    assert inferer._copy is not cached
    torch.testing.assert_close(changed, first + 1.0, rtol=1e-4, atol=1e-4)
    net.load_state_dict(tiny_network(seed=3).state_dict())
    run(inferer, x, net)
    torch.testing.assert_close(inferer._copy.head.bias, net.head.bias)


# ---------------------------------------------------------------------------------------------------------------
# Foreground crop and whole-volume pass
# ---------------------------------------------------------------------------------------------------------------
def test_foreground_box() -> None:
    x = torch.full((1, 2, 20, 30, 10), -0.2)
    x[0, 1, 5:9, 10:21, 3:4] = 1.0
    assert foreground_box(x, 0.05, 0) == (slice(5, 9), slice(10, 21), slice(3, 4))
    assert foreground_box(x, 0.05, 4) == (slice(1, 13), slice(6, 25), slice(0, 8))
    assert foreground_box(x, 0.05, 100) == (slice(0, 20), slice(0, 30), slice(0, 10))
    assert foreground_box(torch.zeros(1, 1, 4, 4, 4)) is None
    x[0, 0, 0, 0, 0] = -0.2 + 0.01  # faint: below the threshold
    assert foreground_box(x, 0.05, 0) == (slice(5, 9), slice(10, 21), slice(3, 4))


@pytest.mark.parametrize("whole_volume", [False, True])
def test_crop_pastes_back_exactly(whole_volume: bool) -> None:
    """A per-voxel network: inside the box the output equals the full-image output, outside it the fill value."""
    x = brain_like((40, 44, 36))
    fill = [0.0, -1.0e4, 7.0]
    full = run(FastSlidingWindowInferer((32, 32, 32), 4, 0.25, "gaussian", whole_volume=whole_volume), x, Pointwise())
    inferer = FastSlidingWindowInferer(
        (32, 32, 32),
        4,
        0.25,
        "gaussian",
        crop_foreground=True,
        crop_margin=2,
        outside_value=fill,
        whole_volume=whole_volume,
    )
    out = run(inferer, x, Pointwise())
    box = foreground_box(x, 0.05, 2)
    assert box is not None
    if not whole_volume:  # grown to at least a window where the image allows
        box = grow_box(box, (32, 32, 32), x.shape[2:])
        assert all(s.stop - s.start >= 32 for s in box)
    assert inferer.last_run["box"] == box
    assert out.shape == (1, 3, *x.shape[2:]) and out.dtype == torch.float32
    inside = (slice(None), slice(None), *box)
    torch.testing.assert_close(out[inside], full[inside], rtol=1e-6, atol=1e-6)
    outside = torch.ones(x.shape[2:], dtype=torch.bool)
    outside[box] = False
    for c, value in enumerate(fill):
        assert torch.all(out[0, c][outside] == value)
    # and the per-voxel function itself (no blending error, no shift)
    torch.testing.assert_close(out[inside], Pointwise()(x)[inside], rtol=1e-5, atol=1e-5)


def test_segmentation_fill_is_background_and_regression_fill_is_zero() -> None:
    seg = build_inferer(SETTINGS, crop_foreground=True)
    assert seg.outside_value == [0.0, -1.0e4, -1.0e4, -1.0e4]
    binary = build_inferer(DownstreamSettings(out_channels=1), crop_foreground=True)
    assert binary.outside_value == -1.0e4
    reg = build_inferer(DownstreamSettings(task="regression", out_channels=1), crop_foreground=True)
    assert reg.outside_value == 0.0
    assert seg.size_divisor == 4 and build_inferer(DownstreamSettings()).size_divisor == 16


def test_constant_image_is_not_cropped() -> None:
    x = torch.zeros(1, 1, 32, 32, 32)
    inferer = build_inferer(SETTINGS, crop_foreground=True)
    out = run(inferer, x, tiny_network())
    assert inferer.last_run["box"] is None and out.shape == (1, 4, 32, 32, 32)


def test_whole_volume_pads_to_the_size_divisor() -> None:
    net, x = tiny_network(), brain_like((37, 45, 30))  # no size a multiple of 4
    inferer = build_inferer(SETTINGS, whole_volume=True)
    out = run(inferer, x, net)
    assert out.shape == (1, 4, 37, 45, 30) and inferer.last_run["windows"] == 1
    assert torch.isfinite(out).all()


def test_grow_box() -> None:
    shape = (40, 44, 36)
    assert grow_box((slice(10, 20), slice(0, 44), slice(30, 36)), (32, 32, 32), shape) == (
        slice(0, 32),  # grown about its centre (-1..31), shifted back inside the image
        slice(0, 44),  # already larger than a window
        slice(4, 36),  # at the end of the image: grown towards the start
    )
    assert grow_box((slice(5, 9),), (32,), (20,)) == (slice(0, 20),)  # the image itself is smaller than a window
    assert grow_box((slice(10, 20),), (6,), (40,)) == (slice(10, 20),)


def test_window_count_matches_monai() -> None:
    assert window_count((197, 233, 189), (96, 96, 96), 0.25) == 27
    assert window_count((145, 181, 155), (96, 96, 96), 0.0) == 8
    assert window_count((20, 20, 20), (32, 32, 32), 0.25) == 1
    calls = []

    def count(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x

    SlidingWindowInferer((32, 32, 32), 1, 0.25)(torch.zeros(1, 1, 50, 60, 44), count)
    assert sum(calls) == window_count((50, 60, 44), (32, 32, 32), 0.25)


def test_trained_network_segments_the_phantom(trained: nn.Module) -> None:
    x, labels = phantom()
    assert (run(build_inferer(SETTINGS), x, trained).argmax(1) == labels[:, 0]).float().mean() >= 0.95


@pytest.mark.parametrize(
    ("options", "foreground"),
    [
        (dict(precision="bf16"), 0.99),
        (dict(precision="bf16", channels_last=True), 0.99),
        (dict(cpu_fast=True), 0.99),
        # the crop and the whole-volume pass move / remove the windows: each window's instance norms see other
        # voxels, so labels at tissue boundaries change more (measured here: 0.96 and 0.95 of the tissue voxels)
        (dict(precision="bf16", channels_last=True, crop_foreground=True), 0.94),
        (dict(precision="bf16", channels_last=True, crop_foreground=True, overlap=0.0), 0.94),
        (dict(precision="bf16", channels_last=True, crop_foreground=True, whole_volume=True), 0.93),
    ],
    ids=["bf16", "bf16_cl", "cpu_fast", "bf16_cl_crop", "bf16_cl_crop_ov0", "bf16_cl_crop_whole"],
)
def test_fast_path_agrees_with_the_default(
    trained: nn.Module, options: dict[str, object], foreground: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options on the briefly trained tiny network: labels agree with the default path on >= 99 % of the voxels,
    and on ``foreground`` of those either calls tissue (bfloat16 emulated where the CPU lacks it)."""
    monkeypatch.setattr(fast, "bf16_supported", lambda: True)
    x = phantom(seed=5)[0]
    ref = run(build_inferer(SETTINGS), x, trained).argmax(1)
    inferer = build_inferer(SETTINGS, **options)  # type: ignore[arg-type]
    out = run(inferer, x, trained).argmax(1)
    assert inferer.last_run["dtype"] == torch.bfloat16
    same = out == ref
    assert same.float().mean() >= 0.99
    assert same[(out > 0) | (ref > 0)].float().mean() >= foreground
    if options.get("crop_foreground"):
        box = inferer.last_run["box"]
        outside = torch.ones(x.shape[2:], dtype=torch.bool)
        outside[box] = False
        assert box is not None and outside.any() and (out[0][outside] == 0).all()  # background outside the box


def test_predictor_with_the_fast_inferer_writes_the_input_grid(trained: nn.Module, tmp_path: Path) -> None:
    """Through NiftiPredictor (preprocessing, blending, resampling back, argmax, writing): the fast inferers write
    label maps of the input's shape and affine (a flipped, shifted 1 mm grid) that agree with the default's."""
    shape = (40, 44, 36)
    data = phantom(shape, seed=7, normalised=False)[0][0, 0].numpy() * 800.0
    affine = np.array([[-1.0, 0, 0, 20.0], [0, 1.0, 0, -30.0], [0, 0, 1.0, 5.0], [0, 0, 0, 1.0]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    outputs = {}
    for name, inferer in {
        "default": build_inferer(SETTINGS),
        "cpu_fast": build_inferer(SETTINGS, cpu_fast=True),
        "crop": build_inferer(SETTINGS, cpu_fast={"crop_foreground": True}),
    }.items():
        predictor = NiftiPredictor(trained, inferer, image_preprocessing(), tmp_path / name, num_classes=4)
        out = nib.load(str(predictor.predict_file(path)["output"]))
        assert out.shape == shape
        np.testing.assert_array_equal(out.affine, affine)
        outputs[name] = np.asarray(out.dataobj)
    assert len(np.unique(outputs["default"])) == 3  # background and the two tissues
    for name in ("cpu_fast", "crop"):
        assert (outputs[name] == outputs["default"]).mean() >= 0.99, name

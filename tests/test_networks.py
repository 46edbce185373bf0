"""Tests of custom.networks: shapes, the frozen-encoder U-Net, and encoder weight loading (CPU, tiny widths)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from custom.networks import (
    PAPER_DECODER_FEATURES,
    PAPER_ENCODER_FEATURES,
    Encoder,
    FrozenEncoderUNet,
    PretrainingModel,
    Projector,
    Reconstructor,
    encoder_state_dict,
    load_encoder_weights,
)

TINY = (4, 8, 8, 16, 16)  # five levels, like the paper, at a fraction of the width
TINY_RECON = (8, 8, 4, 4)
TINY_DEC = (16, 16, 8, 8, 4, 4)


def n_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- encoder, projector, reconstructor ---------------------------------------------------------------------------


def test_encoder_level_shapes_and_pooled() -> None:
    enc = Encoder(in_channels=1, features=TINY, dropout=0.2)
    x = torch.randn(2, 1, 32, 32, 32)
    maps = enc(x)
    assert [tuple(m.shape) for m in maps] == [(2, c, 32 // 2**i, 32 // 2**i, 32 // 2**i) for i, c in enumerate(TINY)]
    assert enc.out_channels == 16 and enc.size_divisor == 16
    enc.eval()
    h = enc.pooled(x)
    assert h.shape == (2, 16)
    torch.testing.assert_close(h, enc(x)[-1].mean(dim=(2, 3, 4)))


def test_encoder_anisotropic_and_2d() -> None:
    enc = Encoder(1, TINY)
    assert enc(torch.randn(1, 1, 16, 32, 48))[-1].shape == (1, 16, 1, 2, 3)
    enc2d = Encoder(2, (4, 8, 8), spatial_dims=2)
    assert [tuple(m.shape) for m in enc2d(torch.randn(1, 2, 8, 12))] == [(1, 4, 8, 12), (1, 8, 4, 6), (1, 8, 2, 3)]


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 1, 32, 32, 40), "divisible by 16"),
        ((1, 1, 33, 32, 32), "divisible by 16"),
        ((1, 1, 16, 16, 16), "single voxel"),  # 1 voxel at the deepest level: instance norm cannot work
        ((1, 2, 32, 32, 32), "input channel"),
        ((1, 32, 32, 32), r"\(B, C, D, H, W\)"),
    ],
)
def test_encoder_rejects_bad_shapes(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        Encoder(1, TINY)(torch.randn(*shape))
    assert str(shape) in str(info.value)


def test_projector_dims() -> None:
    proj = Projector(16, 8, 4)
    assert proj(torch.randn(3, 16)).shape == (3, 4)
    assert isinstance(proj.net[1], torch.nn.GELU)
    assert [m.out_features for m in proj.net if isinstance(m, torch.nn.Linear)] == [8, 4]
    assert Projector()(torch.randn(2, 768)).shape == (2, 128)


def test_projector_batch_norm_spreads_nearly_identical_features() -> None:
    torch.manual_seed(0)
    features = 1.0 + 0.01 * torch.randn(8, 16)  # nearly the same vector for every view (cosine ~0.9999)

    def mean_pairwise_cosine(z: torch.Tensor) -> float:
        z = torch.nn.functional.normalize(z.detach(), dim=1)
        sim = z @ z.T
        return float((sim.sum() - sim.diag().sum()) / (len(z) * (len(z) - 1)))

    assert mean_pairwise_cosine(Projector(16, 32, 8)(features)) > 0.99
    with_bn = Projector(16, 32, 8, norm="batch")
    assert isinstance(with_bn.net[1], torch.nn.BatchNorm1d)
    assert mean_pairwise_cosine(with_bn(features)) < 0.5
    with pytest.raises(ValueError, match="projector norm"):
        Projector(16, 8, 4, norm="layer")


def test_reconstructor_upsamples_by_16() -> None:
    rec = Reconstructor(16, TINY_RECON, out_channels=1)
    assert rec.upsampling_factor == 16
    assert rec(torch.randn(1, 16, 2, 3, 2)).shape == (1, 1, 32, 48, 32)


@pytest.mark.parametrize(
    "features, recon, size",
    [
        ((4, 8, 16), (8, 4), 16),  # three levels so a 16^3 patch keeps 4^3 voxels at the bottom
        (TINY, TINY_RECON, 32),
        (TINY, TINY_RECON, 96),  # the paper's patch size, 96 -> 6 -> 96
    ],
)
def test_pretraining_model_outputs(features: tuple[int, ...], recon: tuple[int, ...], size: int) -> None:
    model = PretrainingModel(1, features, 0.2, proj_hidden=8, proj_dim=4, recon_features=recon)
    x = torch.randn(2, 1, size, size, size)
    with torch.no_grad():
        out = model(x)
    assert out["z"].shape == (2, 4)
    assert out["h"].shape == (2, features[-1])
    assert out["recon"].shape == x.shape


def test_pretraining_model_without_reconstruction_and_gradients() -> None:
    model = PretrainingModel(1, TINY, proj_hidden=8, proj_dim=4, recon_features=TINY_RECON, reconstruction=False)
    assert model.reconstructor is None
    out = model(torch.randn(2, 1, 32, 32, 32))
    assert out["recon"] is None
    out["z"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pretraining_model_trains_every_part() -> None:
    model = PretrainingModel(1, TINY, proj_hidden=8, proj_dim=4, recon_features=TINY_RECON)
    out = model(torch.randn(2, 1, 32, 32, 32))
    (out["z"].square().mean() + out["recon"].abs().mean()).backward()
    for part in (model.encoder, model.projector, model.reconstructor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_recon_features_must_match_encoder_depth() -> None:
    with pytest.raises(ValueError, match="upsamplings"):
        PretrainingModel(1, TINY, recon_features=(8, 4, 4))


def test_paper_size_model_builds_and_runs_small() -> None:
    model = PretrainingModel().eval()
    counts = {
        "encoder": n_params(model.encoder),
        "projector": n_params(model.projector),
        "reconstructor": n_params(model.reconstructor),
        "total": n_params(model),
    }
    unet = FrozenEncoderUNet(out_channels=4)
    print(f"\npaper-size PretrainingModel parameters: {counts}")
    print(f"paper-size FrozenEncoderUNet parameters: {n_params(unet)} total, {n_params(unet, True)} trainable")
    assert counts["projector"] == 768 * 512 + 512 + 512 * 128 + 128
    assert counts["total"] == counts["encoder"] + counts["projector"] + counts["reconstructor"]
    assert [m.shape[1] for m in model.encoder(torch.zeros(1, 1, 32, 16, 16))] == list(PAPER_ENCODER_FEATURES)
    x = torch.randn(1, 1, 32, 16, 16)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    print(f"paper-size forward (1, 1, 32, 16, 16) on CPU: {time.perf_counter() - start:.2f} s")
    assert out["z"].shape == (1, 128) and out["h"].shape == (1, 768) and out["recon"].shape == x.shape


# --- frozen-encoder U-Net -----------------------------------------------------------------------------------------


def tiny_unet(**kwargs) -> FrozenEncoderUNet:
    return FrozenEncoderUNet(1, 3, encoder_features=TINY, decoder_features=TINY_DEC, **kwargs)


def test_unet_output_shape_and_decoder_layout() -> None:
    net = tiny_unet()
    assert net(torch.randn(2, 1, 32, 32, 32)).shape == (2, 3, 32, 32, 32)
    assert net(torch.randn(1, 1, 16, 32, 48)).shape == (1, 3, 16, 32, 48)
    # one up-block per encoder downsampling, each taking one distinct skip (levels 3, 2, 1, 0)
    assert len(net.ups) == len(TINY) - 1
    skip_widths = [blk.convs.conv_0.conv.in_channels - blk.upsample[0].out_channels for blk in net.ups]
    assert skip_widths == [TINY[3], TINY[2], TINY[1], TINY[0]]
    assert isinstance(net.ups[0].upsample[0], torch.nn.ConvTranspose3d)
    assert net.head.out_channels == 3


def test_unet_paper_decoder_layout() -> None:
    net = FrozenEncoderUNet(out_channels=1)
    assert net.bottleneck.conv_1.conv.out_channels == PAPER_DECODER_FEATURES[0]
    assert [blk.convs.conv_1.conv.out_channels for blk in net.ups] == list(PAPER_DECODER_FEATURES[1:-1])
    assert net.final.conv.out_channels == PAPER_DECODER_FEATURES[-1]


def test_unet_rejects_wrong_decoder_length() -> None:
    with pytest.raises(ValueError, match="decoder_features"):
        FrozenEncoderUNet(1, 2, encoder_features=TINY, decoder_features=(16, 8, 8, 4))


def test_unet_frozen_encoder_is_not_trained() -> None:
    net = tiny_unet()
    net.train()
    assert not net.encoder.training and all(not m.training for m in net.encoder.modules())
    assert net.bottleneck.training and net.head.training
    assert all(not p.requires_grad for p in net.encoder.parameters())

    enc_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoder.")}
    # plain model.parameters() on purpose: AdamW must leave grad-less (frozen) parameters alone
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 32, 32, 32))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    opt.step()

    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(v, enc_before[k], rtol=0, atol=0)
    after = net.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in dec_before.items())
    assert {p for p in net.trainable_parameters()} == {p for n, p in net.named_parameters() if "encoder" not in n}


def test_unet_unfrozen_encoder_trains() -> None:
    net = tiny_unet(freeze_encoder=False)
    net.train()
    assert net.encoder.training
    net(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


# --- weights: extraction and loading ------------------------------------------------------------------------------


@pytest.fixture()
def pretrained() -> PretrainingModel:
    return PretrainingModel(1, TINY, proj_hidden=8, proj_dim=4, recon_features=TINY_RECON)


def assert_same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_encoder_state_dict_keys(pretrained: PretrainingModel) -> None:
    sd = encoder_state_dict(pretrained)
    assert sd.keys() == pretrained.encoder.state_dict().keys()
    assert all(not k.startswith("encoder.") for k in sd)
    assert encoder_state_dict(pretrained.state_dict()).keys() == sd.keys()
    assert encoder_state_dict(pretrained.encoder).keys() == sd.keys()
    wrapped = torch.nn.Module()
    wrapped.module = pretrained  # like DistributedDataParallel
    assert encoder_state_dict(wrapped).keys() == sd.keys()


def test_load_from_encoder_only_file(tmp_path: Path, pretrained: PretrainingModel, caplog) -> None:
    path = tmp_path / "encoder.pt"
    torch.save(encoder_state_dict(pretrained), path)
    enc = Encoder(1, TINY)
    with caplog.at_level(logging.INFO, logger="custom.weights"):
        n = load_encoder_weights(enc, path)
    assert n == len(enc.state_dict()) == 20  # 5 levels x 2 convs x (weight, bias)
    assert f"copied {n}/{n}" in caplog.text
    assert_same_encoder(enc, pretrained.encoder)


def test_load_from_full_model_file_with_prefix(tmp_path: Path, pretrained: PretrainingModel) -> None:
    path = tmp_path / "full.pth"
    torch.save(pretrained.state_dict(), path)
    enc = Encoder(1, TINY)
    assert load_encoder_weights(enc, str(path)) == 20
    assert_same_encoder(enc, pretrained.encoder)


def test_load_from_bundle_folder(tmp_path: Path, pretrained: PretrainingModel) -> None:
    (tmp_path / "models").mkdir()
    torch.save(encoder_state_dict(pretrained), tmp_path / "models" / "model.pt")
    net = tiny_unet(pretrained_encoder=tmp_path)
    assert net.loaded_encoder_tensors == 20
    assert_same_encoder(net.encoder, pretrained.encoder)
    assert all(not p.requires_grad for p in net.encoder.parameters())


def test_load_from_checkpoint_dict(tmp_path: Path, pretrained: PretrainingModel) -> None:
    ddp_keys = {f"module.{k}": v for k, v in pretrained.state_dict().items()}
    ckpt = {"network": ddp_keys, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}
    path = tmp_path / "checkpoint_epoch=3.pt"
    torch.save(ckpt, path)
    for source in (path, ckpt, {"model": pretrained.state_dict()}, {"state_dict": encoder_state_dict(pretrained)}):
        enc = Encoder(1, TINY)
        assert load_encoder_weights(enc, source) == 20
        assert_same_encoder(enc, pretrained.encoder)


def test_load_from_unet_state_dict(pretrained: PretrainingModel) -> None:
    donor = tiny_unet(pretrained_encoder=encoder_state_dict(pretrained))
    enc = Encoder(1, TINY)
    assert load_encoder_weights(enc, donor.state_dict()) == 20
    assert_same_encoder(enc, pretrained.encoder)


def test_load_zero_matching_keys_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"0/20 copied") as info:
        load_encoder_weights(Encoder(1, TINY), path)
    assert str(path) in str(info.value)


def test_load_width_mismatch_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(Encoder(1, (4, 8, 8, 16, 32)).state_dict(), path)
    with pytest.raises(ValueError, match="widths") as info:
        load_encoder_weights(Encoder(1, TINY), path)
    message = str(info.value)
    assert str(path) in message and "levels.4.convs.conv_0.conv.weight" in message and "(32, 16, 3, 3, 3)" in message
    # opt-in: skip the mismatching tensors, copy the rest
    assert load_encoder_weights(Encoder(1, TINY), path, strict_widths=False) == 16


def test_load_missing_or_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_encoder_weights(Encoder(1, TINY), missing)
    with pytest.raises(FileNotFoundError, match=r"models[/\\]model\.pt"):
        load_encoder_weights(Encoder(1, TINY), tmp_path)  # a folder without bundle weights
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_encoder_weights(Encoder(1, TINY), garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tiny_unet(pretrained_encoder=tmp_path / "missing.pt")


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": Encoder(1, TINY)}, path)  # a whole module, not a state dict: needs full unpickling
    with pytest.raises(ValueError, match="pickled.pt"):
        load_encoder_weights(Encoder(1, TINY), path)


def test_batchnorm_weights_refuse_an_instance_norm_encoder():
    import pytest

    from custom.networks import Encoder, load_encoder_weights

    bn = Encoder(features=[4, 8], norm="batch").state_dict()
    with pytest.raises(ValueError, match="batch normalisation"):
        load_encoder_weights(Encoder(features=[4, 8]), bn)
    assert load_encoder_weights(Encoder(features=[4, 8], norm="batch"), bn) == len(bn)

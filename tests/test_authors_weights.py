"""The authors' released encoders (Hugging Face liamchalcroft/midl-2025-*): key mapping, checks, import.

No file is downloaded: each test builds an encoder file in the authors' format from MONAI's own ``TwoConv`` /
``Down`` modules with the authors' settings (GELU, instance norm without affine, bias, dropout 0.2; ``conv_0``
then ``down_1`` ... ``down_4``), saved as ``{"config": ..., "state_dict": ...}`` with the ``_orig_mod.`` prefix of a
``torch.compile``d module, and checks that our encoder, loaded from it, computes the same features.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from monai.networks.nets.basic_unet import Down, TwoConv

from custom.authors_weights import AUTHORS_CONFIG, import_authors_encoder
from custom.cli import main
from custom.networks import Encoder, FrozenEncoderUNet, PooledEncoder
from custom.weights import encoder_features_of, load_encoder_weights

PAPER = (64, 128, 256, 512, 768)
SMALL = (8, 16, 16, 32, 32)


class AuthorsEncoder(nn.Module):
    """The authors' encoder as their code builds it from MONAI BasicUNet parts (five levels)."""

    def __init__(self, features=PAPER, act="GELU", norm="instance", bias=True, dropout=0.2) -> None:
        super().__init__()
        self.conv_0 = TwoConv(3, 1, features[0], act, norm, bias, dropout)
        for k in range(1, len(features)):
            setattr(self, f"down_{k}", Down(3, features[k - 1], features[k], act, norm, bias, dropout))
        self.levels = len(features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.conv_0(x)]
        for k in range(1, self.levels):
            maps.append(getattr(self, f"down_{k}")(maps[-1]))
        return maps


def authors_file(path: Path, features=PAPER, seed: int = 0, prefix: str = "_orig_mod.", **config) -> AuthorsEncoder:
    """Write an authors'-format encoder file at ``path``; return the MONAI module it holds (eval mode)."""
    torch.manual_seed(seed)
    module = AuthorsEncoder(features).eval()
    state = {f"{prefix}{k}": v for k, v in module.state_dict().items()}
    torch.save({"config": {**AUTHORS_CONFIG, "features": tuple(features), **config}, "state_dict": state}, path)
    return module


def test_imported_encoder_gives_the_same_features_as_the_monai_modules(tmp_path, capsys):
    source, out = tmp_path / "midl-2025-seq-inv.pt", tmp_path / "model.pt"
    authors = authors_file(source)
    assert main(["import-encoder", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder widths [64, 128, 256, 512, 768]: copied 20/20 tensors" in printed and "sha256" in printed

    state = torch.load(out, weights_only=True)
    assert len(state) == 20 and all(k.startswith("levels.") for k in state)  # our plain encoder state dict
    encoder = Encoder(1, PAPER, dropout=0.2).eval()
    assert load_encoder_weights(encoder, out) == 20
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = authors(x), encoder(x)
    for level, (e, a) in enumerate(zip(expected, actual, strict=True)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5, msg=f"level {level}")
    pooled = PooledEncoder(1, PAPER, 0.0).eval()
    load_encoder_weights(pooled, out)
    with torch.no_grad():
        torch.testing.assert_close(pooled(x), expected[-1].flatten(2).mean(2), rtol=0, atol=1e-5)


def test_authors_file_loads_wherever_an_encoder_is_accepted(tmp_path):
    """--pretrained_encoder <file> (FrozenEncoderUNet, the downstream bundles) and the encoder-width reader."""
    source = tmp_path / "midl-2025-base.pt"
    authors = authors_file(source, SMALL, seed=3)
    assert encoder_features_of(torch.load(source, weights_only=True)) == SMALL
    net = FrozenEncoderUNet(1, 4, SMALL, (32, 32, 16, 16, 8, 8), dropout=0.0, pretrained_encoder=source)
    assert net.loaded_encoder_tensors == 20
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for e, a in zip(authors(x), net.encoder(x), strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_nda_ordering_matches_twoconv_in_training_mode_too(tmp_path):
    """With dropout active the orders differ; adn_ordering='NDA' reproduces TwoConv exactly (same RNG draws)."""
    source = tmp_path / "enc.pt"
    authors = authors_file(source, SMALL).train()
    encoder = Encoder(1, SMALL, dropout=0.2, adn_ordering="NDA").train()
    load_encoder_weights(encoder, source)
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(7)
    expected = authors(x)[-1]
    torch.manual_seed(7)
    torch.testing.assert_close(encoder(x)[-1], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="adn_ordering"):
        Encoder(1, SMALL, adn_ordering="DNA")


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("drop", "missing"),
        ("foreign", "not encoder tensors of the authors' layout"),
        ("gap", "missing levels"),
        ("act", "activation"),
        ("norm", "normalisation"),
        ("features", "features"),
    ],
)
def test_partial_or_foreign_files_are_refused(tmp_path, breakage, message):
    source, out = tmp_path / "enc.pt", tmp_path / "model.pt"
    authors_file(source, SMALL)
    saved = torch.load(source, weights_only=True)
    state, config = saved["state_dict"], saved["config"]
    if breakage == "drop":
        state.pop("_orig_mod.down_4.convs.conv_1.conv.weight")
    elif breakage == "foreign":
        state["_orig_mod.projector.fc1.weight"] = torch.zeros(4, 4)
    elif breakage == "gap":
        for key in [k for k in state if ".down_2." in f".{k}"]:
            state.pop(key)
    elif breakage == "act":
        config["act"] = ("LeakyReLU", {"negative_slope": 0.1})
    elif breakage == "norm":
        config["norm"] = ("instance", {"affine": True})
    elif breakage == "features":
        config["features"] = PAPER
    torch.save(saved, source)
    with pytest.raises(ValueError, match=message):
        import_authors_encoder(source, out)
    assert not out.exists()
    assert main(["import-encoder", str(source), "--out", str(out)]) == 2  # one line, exit code 2
    assert not out.exists()
    with pytest.raises(ValueError, match=message):  # the same refusal where an encoder is loaded directly
        load_encoder_weights(Encoder(1, SMALL), source)


def test_widths_are_checked(tmp_path):
    source, out = tmp_path / "enc.pt", tmp_path / "model.pt"
    authors_file(source, SMALL)
    with pytest.raises(ValueError, match="differ from the expected"):
        import_authors_encoder(source, out, features=PAPER)
    with pytest.raises(ValueError, match="encoder widths of .* differ"):
        load_encoder_weights(Encoder(1, PAPER), source)
    report = import_authors_encoder(source, out, features=SMALL)
    assert report["copied"] == report["total"] == 20 and report["features"] == SMALL


def test_bare_authors_state_dict_without_config_or_prefix(tmp_path):
    """A state dict saved without the config and without torch.compile's prefix imports too."""
    source, out = tmp_path / "bare.pt", tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(AuthorsEncoder(SMALL).state_dict(), source)
    assert import_authors_encoder(source, out)["copied"] == 20


def test_our_own_weights_are_not_authors_files(tmp_path):
    source = tmp_path / "ours.pt"
    torch.save(Encoder(1, SMALL).state_dict(), source)
    with pytest.raises(ValueError, match="not an authors' encoder file"):
        import_authors_encoder(source, tmp_path / "model.pt")
    assert load_encoder_weights(Encoder(1, SMALL), source) == 20  # still loads as before

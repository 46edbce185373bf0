"""Networks of the paper (Appendix B): encoder, projector, reconstructor, and the frozen-encoder U-Net.

(About 560 lines, kept in one module on purpose: the five networks share the conv-unit builder and the encoder's
level layout, and the weight files that map onto them live apart, in :mod:`custom.weights`.)

Every network here is built from MONAI blocks:

* ``monai.networks.blocks.Convolution`` for each conv -> InstanceNorm -> GELU -> dropout unit, and (with
  ``is_transposed=True``) for the reconstructor's stride-2 transposed convolutions;
* ``monai.networks.layers.factories.Pool`` for the 2x max-pooling between encoder levels;
* ``monai.networks.blocks.UpSample`` (``mode="deconv"``) for the U-Net decoder's transposed-conv upsampling.

The encoder mirrors MONAI ``BasicUNet``'s ``TwoConv`` / ``Down`` blocks (which the authors' code uses), with one
default difference: each conv unit here applies norm -> activation -> dropout (``adn_ordering="NAD"``, the order
the paper states), where ``TwoConv`` applies norm -> dropout -> activation (``adn_ordering="NDA"``, selectable).
With dropout inactive (eval mode, a frozen encoder) the two orders are the same function. The sub-module names
(``conv_0``, ``conv_1``, ``max_pooling``, ``convs``) are the same as in ``BasicUNet``, so the authors' released
encoders map onto this one level by level (:mod:`custom.authors_weights`).

Shapes are written ``(B, C, *S)`` with ``S`` the spatial size (``D, H, W`` in 3D).

Saved encoder weights (``models/model.pt`` of the pretraining bundle) are the plain state dict of
:class:`Encoder`; :mod:`custom.weights` extracts, reads and loads them (re-exported here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Conv, Pool

# Weight files (reading, key mapping, loading) live in custom.weights; re-exported here because configs and
# user code import them from custom.networks.
from custom.weights import encoder_features_of, encoder_state_dict, load_encoder_weights, read_weights

__all__ = [
    "PAPER_ENCODER_FEATURES",
    "PAPER_RECON_FEATURES",
    "PAPER_DECODER_FEATURES",
    "ConvBlock",
    "Encoder",
    "PooledEncoder",
    "encoder_features_of",
    "pooled_encoder_from_weights",
    "Projector",
    "Reconstructor",
    "PretrainingModel",
    "UpBlock",
    "FrozenEncoderUNet",
    "load_encoder_weights",
    "encoder_state_dict",
]

logger = logging.getLogger(__name__)

#: Encoder widths of the paper (Appendix B): five levels, the last four after a 2x max-pooling each.
PAPER_ENCODER_FEATURES: tuple[int, ...] = (64, 128, 256, 512, 768)
#: Reconstructor widths of the paper: four stride-2 transposed convolutions from the 768-channel deepest map.
PAPER_RECON_FEATURES: tuple[int, ...] = (384, 192, 96, 48)
#: Downstream U-Net decoder widths of the paper (see :class:`FrozenEncoderUNet` for how they map to blocks).
PAPER_DECODER_FEATURES: tuple[int, ...] = (768, 512, 256, 128, 64, 32)


NormType = str | tuple
ActType = str | tuple
#: Orders of norm (N), activation (A) and dropout (D) after each convolution: ``NAD`` (the paper, the default) or
#: ``NDA`` (MONAI ``TwoConv``, the authors' code). Identical in eval mode; they differ only when dropout is active.
ADN_ORDERINGS: tuple[str, ...] = ("NAD", "NDA")


def _check_adn_ordering(adn_ordering: str) -> str:
    if adn_ordering not in ADN_ORDERINGS:
        raise ValueError(f"adn_ordering must be one of {list(ADN_ORDERINGS)}, got {adn_ordering!r}")
    return adn_ordering


def _conv_unit(
    spatial_dims: int,
    in_ch: int,
    out_ch: int,
    norm: NormType,
    act: ActType,
    dropout: float,
    adn_ordering: str = "NAD",
) -> Convolution:
    """A 3x3x3 conv -> norm -> act -> dropout unit (MONAI ``Convolution``, same padding); ``adn_ordering="NDA"``
    puts the dropout before the activation (MONAI ``TwoConv``).

    ``(B, in_ch, *S) -> (B, out_ch, *S)``.
    """
    return Convolution(
        spatial_dims,
        in_ch,
        out_ch,
        kernel_size=3,
        adn_ordering=_check_adn_ordering(adn_ordering),
        act=act,
        norm=norm,
        dropout=dropout if dropout > 0 else None,
        bias=True,
    )


class ConvBlock(nn.Sequential):
    """Two 3x3x3 conv units (conv -> norm -> act -> dropout), like MONAI ``TwoConv``.

    ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: NormType = "instance",
        act: ActType = "gelu",
        dropout: float = 0.0,
        adn_ordering: str = "NAD",
    ) -> None:
        super().__init__()
        unit = (norm, act, dropout, adn_ordering)
        self.add_module("conv_0", _conv_unit(spatial_dims, in_channels, out_channels, *unit))
        self.add_module("conv_1", _conv_unit(spatial_dims, out_channels, out_channels, *unit))


class _DownBlock(nn.Sequential):
    """2x max-pooling then a :class:`ConvBlock`, like MONAI ``Down``. ``(B, Cin, *S) -> (B, Cout, *S/2)``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: NormType,
        act: ActType,
        dropout: float,
        adn_ordering: str = "NAD",
    ) -> None:
        super().__init__()
        self.add_module("max_pooling", Pool["MAX", spatial_dims](kernel_size=2))
        self.add_module("convs", ConvBlock(spatial_dims, in_channels, out_channels, norm, act, dropout, adn_ordering))


class Encoder(nn.Module):
    """The paper's CNN encoder: ``len(features)`` levels of two 3x3x3 convs (InstanceNorm, GELU, dropout).

    Level 0 works at full resolution; each later level first max-pools by 2. With the paper's widths
    ``(64, 128, 256, 512, 768)`` a ``(B, 1, 96, 96, 96)`` patch gives maps of spatial size 96, 48, 24, 12, 6.

    Args:
        in_channels: image channels (1 for a single MRI contrast).
        features: width of each level; the number of levels is ``len(features)``.
        dropout: dropout probability after every conv unit.
        norm: MONAI norm name or ``(name, kwargs)``; ``"instance"`` is ``InstanceNorm`` without affine
            parameters and without running statistics (so train and eval modes normalise identically).
        act: MONAI activation name or ``(name, kwargs)``.
        spatial_dims: 3 for volumes (2 works too, for tests and 2D experiments).
        adn_ordering: ``"NAD"`` (conv -> norm -> activation -> dropout, the paper's order) or ``"NDA"`` (dropout
            before the activation: MONAI ``TwoConv``, i.e. the authors' released encoders exactly, also in training
            mode). The same function whenever dropout is inactive (eval mode, or ``dropout=0``).

    Every spatial size of the input must be divisible by ``2 ** (len(features) - 1)`` (16 for five levels),
    and with instance norm the deepest map needs at least two voxels (so ``16^3`` is too small for five levels,
    ``32^3`` is fine); otherwise :meth:`forward` raises ``ValueError`` naming the shape.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = PAPER_ENCODER_FEATURES,
        dropout: float = 0.2,
        norm: NormType = "instance",
        act: ActType = "gelu",
        spatial_dims: int = 3,
        adn_ordering: str = "NAD",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 1 or any(f < 1 for f in features):
            raise ValueError(f"Encoder features must be a non-empty sequence of positive widths, got {features}")
        self.in_channels = int(in_channels)
        self.features = features
        self.spatial_dims = int(spatial_dims)
        self.adn_ordering = _check_adn_ordering(adn_ordering)
        unit = (norm, act, dropout, adn_ordering)
        levels: list[nn.Module] = [ConvBlock(spatial_dims, in_channels, features[0], *unit)]
        for c_in, c_out in zip(features[:-1], features[1:], strict=True):
            levels.append(_DownBlock(spatial_dims, c_in, c_out, *unit))
        self.levels = nn.ModuleList(levels)
        # Instance norm cannot normalise a single voxel, so then the deepest map must hold at least two voxels.
        self._needs_two_deep_voxels = any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in self.modules())

    @property
    def out_channels(self) -> int:
        """Channels of the deepest feature map (``features[-1]``, 768 in the paper)."""
        return self.features[-1]

    @property
    def size_divisor(self) -> int:
        """Every input spatial size must be a multiple of this: ``2 ** (levels - 1)``."""
        return 1 << (len(self.features) - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the shape unless ``x`` is ``(B, in_channels, *S)`` with every size in ``S`` a
        multiple of :attr:`size_divisor` (and, with instance norm, at least two voxels left at the deepest level)."""
        shape = tuple(x.shape)
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"Encoder expects a (B, C, {', '.join('DHW'[-self.spatial_dims :])}) tensor, got shape {shape}"
            )
        if shape[1] != self.in_channels:
            raise ValueError(f"Encoder expects {self.in_channels} input channel(s), got shape {shape}")
        bad = [s for s in shape[2:] if s % self.size_divisor != 0]
        if bad:
            raise ValueError(
                f"Encoder input spatial size must be divisible by {self.size_divisor} "
                f"(2 ** (levels - 1) for {len(self.features)} levels), got shape {shape}"
            )
        if self._needs_two_deep_voxels and math.prod(s // self.size_divisor for s in shape[2:]) < 2:
            raise ValueError(
                f"Encoder input of shape {shape} leaves a single voxel at the deepest level (1/{self.size_divisor} "
                "of each size), which instance norm cannot normalise; make at least one spatial size "
                f"{2 * self.size_divisor} or more"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level, shallowest first.

        ``(B, in_channels, *S) -> [(B, features[i], *S / 2**i) for i in range(levels)]``.
        """
        if not torch.jit.is_scripting():  # shape checks with readable errors; TorchScript keeps the math only
            self.check_input(x)
        maps: list[torch.Tensor] = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps

    @staticmethod
    def global_pool(feature_map: torch.Tensor) -> torch.Tensor:
        """Global average over the spatial axes: ``(B, C, *S) -> (B, C)``."""
        return feature_map.flatten(2).mean(dim=2)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled deepest features ``h``: ``(B, in_channels, *S) -> (B, out_channels)``."""
        return self.global_pool(self.forward(x)[-1])


class PooledEncoder(Encoder):
    """The encoder as a feature extractor: ``(B, in_channels, *S) -> (B, features[-1])``.

    The output is ``h``, the global average of the deepest feature map (what the projector sees in
    pretraining, and what the sequence-invariance evaluation compares). Its state dict has exactly the keys
    of :class:`Encoder`, so a ``seqinv_pretrain`` ``models/model.pt`` loads into it directly; this is the
    network that the bundle's metadata describes, that ``verify_net_in_out`` runs and ``ckpt_export``
    scripts (TorchScript cannot script the list output of :meth:`Encoder.forward` into a single tensor).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, in_channels, *S) -> (B, features[-1])``."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        for level in self.levels:
            x = level(x)
        return x.flatten(2).mean(dim=2)

    @torch.jit.unused
    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every level's feature map, shallowest first (what :meth:`Encoder.forward` returns)."""
        return Encoder.forward(self, x)


def pooled_encoder_from_weights(
    path: str | Path, default_features: Sequence[int] = PAPER_ENCODER_FEATURES, dropout: float = 0.2
) -> PooledEncoder:
    """A :class:`PooledEncoder` with the widths (and weights) of ``path`` if that file exists, else
    ``default_features`` with random initialisation (so a bundle without weights can still be verified)."""
    path = Path(path)
    if not path.is_file():
        return PooledEncoder(1, default_features, dropout)
    state = read_weights(path)
    encoder = PooledEncoder(1, encoder_features_of(state), dropout)
    load_encoder_weights(encoder, state)
    return encoder


class Projector(nn.Module):
    """Contrastive projection head: Linear -> GELU -> Linear. ``(B, in_dim) -> (B, out_dim)``.

    ``norm="batch"`` (not in the paper; the SimCLR projection head has it) puts a ``BatchNorm1d`` after the first
    linear layer. It standardises each hidden unit across the batch, so the embeddings cannot start (or fall
    back) into the collapsed state in which every view has the same embedding: the global average of an
    instance-normalised map varies little between inputs, and without it the embeddings of all views start at
    cosine ~0.99. Needs batches of two or more in training mode.
    """

    def __init__(self, in_dim: int = 768, hidden_dim: int = 512, out_dim: int = 128, norm: str | None = None) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden_dim), int(out_dim)
        if norm not in (None, "none", "batch"):
            raise ValueError(f"projector norm must be None or 'batch', got {norm!r}")
        self.norm = None if norm in (None, "none") else norm
        hidden: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if self.norm == "batch":
            hidden.append(nn.BatchNorm1d(hidden_dim))
        self.net = nn.Sequential(*hidden, nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        return self.net(h)


class Reconstructor(nn.Module):
    """Decoder of the pretraining reconstruction branch (no skip connections).

    ``len(features)`` transposed convolutions (kernel 2, stride 2, each doubling every spatial size, each
    followed by InstanceNorm and GELU; no dropout: the paper gives none here), then a 1x1x1 convolution to
    ``out_channels``. ``(B, in_channels, *S) -> (B, out_channels, *S * 2**len(features))``.

    With the paper's widths, ``(B, 768, 6, 6, 6) -> (B, 1, 96, 96, 96)``: four upsamplings invert the
    encoder's four poolings exactly, so the output has the input patch size. :class:`PretrainingModel`
    checks that the counts agree when it is built, and checks the output size in ``forward``.
    """

    def __init__(
        self,
        in_channels: int = 768,
        features: Sequence[int] = PAPER_RECON_FEATURES,
        out_channels: int = 1,
        norm: NormType = "instance",
        act: ActType = "gelu",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        self.features = features
        ups: list[nn.Module] = []
        c_in = int(in_channels)
        for c_out in features:
            ups.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    c_out,
                    strides=2,
                    kernel_size=2,
                    adn_ordering="NA",
                    act=act,
                    norm=norm,
                    is_transposed=True,
                    padding=0,
                    output_padding=0,
                )
            )
            c_in = c_out
        self.ups = nn.Sequential(*ups)
        self.head = Conv["conv", spatial_dims](c_in, out_channels, kernel_size=1)

    @property
    def upsampling_factor(self) -> int:
        """Factor by which every spatial size grows: ``2 ** len(features)``."""
        return 2 ** len(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S) -> (B, out_channels, *S * 2**len(features))``."""
        return self.head(self.ups(x))


class PretrainingModel(nn.Module):
    """Encoder + projector + reconstructor, the model of the contrastive pretraining stage.

    ``forward(x)`` with ``x`` of shape ``(B, in_channels, *S)`` returns a dict:

    * ``"z"``: projected embedding for the NT-Xent loss, ``(B, proj_dim)``;
    * ``"h"``: global-average-pooled deepest encoder features, ``(B, features[-1])``;
    * ``"recon"``: reconstruction of the (clean) image, ``(B, in_channels, *S)``, or ``None`` when
      ``reconstruction=False`` (then ``self.reconstructor`` is ``None`` too);
    * ``"maps"``: every encoder level's feature map (for the optional dense term, :mod:`custom.dense`).

    ``proj_norm="batch"`` adds a BatchNorm to the projector (see :class:`Projector`; not in the paper).

    ``len(recon_features)`` must equal ``len(features) - 1`` so the reconstruction has the input size
    (``ValueError`` otherwise). The encoder-only weights are ``model.encoder.state_dict()``
    (see :func:`encoder_state_dict`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = PAPER_ENCODER_FEATURES,
        dropout: float = 0.2,
        proj_hidden: int = 512,
        proj_dim: int = 128,
        recon_features: Sequence[int] = PAPER_RECON_FEATURES,
        reconstruction: bool = True,
        norm: NormType = "instance",
        act: ActType = "gelu",
        spatial_dims: int = 3,
        proj_norm: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, features, dropout, norm, act, spatial_dims)
        self.projector = Projector(self.encoder.out_channels, proj_hidden, proj_dim, proj_norm)
        self.reconstructor: Reconstructor | None = None
        if reconstruction:
            recon_features = tuple(recon_features)
            if len(recon_features) != len(self.encoder.features) - 1:
                raise ValueError(
                    f"recon_features {recon_features} has {len(recon_features)} upsamplings but the encoder "
                    f"{self.encoder.features} downsamples {len(self.encoder.features) - 1} times; the "
                    "reconstruction would not have the input size. Give one width per encoder downsampling."
                )
            self.reconstructor = Reconstructor(
                self.encoder.out_channels, recon_features, in_channels, norm, act, spatial_dims
            )

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """``(B, C, *S) -> {"z": (B, proj_dim), "h": (B, features[-1]), "recon": (B, C, *S) or None, "maps"}``."""
        maps = self.encoder(x)
        deepest = maps[-1]
        h = Encoder.global_pool(deepest)
        z = self.projector(h)
        recon = None
        if self.reconstructor is not None:
            recon = self.reconstructor(deepest)
            if recon.shape[2:] != x.shape[2:]:  # cannot happen with the checks above; guard against edits
                raise RuntimeError(f"reconstruction shape {tuple(recon.shape)} != input shape {tuple(x.shape)}")
        return {"z": z, "h": h, "recon": recon, "maps": maps}


class UpBlock(nn.Module):
    """U-Net decoder step: 2x transposed-conv upsampling, concatenation with one skip, :class:`ConvBlock`.

    ``(B, in_channels, *S), (B, skip_channels, *2S) -> (B, out_channels, *2S)``. The upsampling (MONAI
    ``UpSample``, ``mode="deconv"``: kernel 2, stride 2) already maps ``in_channels -> out_channels``, so the
    conv block sees ``out_channels + skip_channels`` channels.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm: NormType = "instance",
        act: ActType = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.upsample = UpSample(spatial_dims, in_channels, out_channels, scale_factor=2, mode="deconv")
        self.convs = ConvBlock(spatial_dims, out_channels + skip_channels, out_channels, norm, act, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``, concatenate ``skip`` (channels), apply the two conv units."""
        return self.convs(torch.cat([self.upsample(x), skip], dim=1))


class FrozenEncoderUNet(nn.Module):
    """Downstream U-Net: the pretrained :class:`Encoder` (frozen by default) and a trainable decoder.

    Decoder widths ``decoder_features`` (paper: ``(768, 512, 256, 128, 64, 32)``) need
    ``len(encoder_features) + 1`` entries and map onto blocks like this (``L = len(encoder_features)``,
    encoder level ``i`` has ``encoder_features[i]`` channels at spatial size ``S / 2**i``):

    * ``decoder_features[0]`` (768): ``bottleneck``, a :class:`ConvBlock` on the deepest encoder map
      (level ``L-1``, ``S/16``); trainable, so the frozen deepest features get adapted to the task;
    * ``decoder_features[1..L-1]`` (512, 256, 128, 64): ``ups[k]`` for ``k = 0..L-2``, an :class:`UpBlock`
      that upsamples by 2 and concatenates the skip from encoder level ``L-2-k`` (levels 3, 2, 1, 0 at
      ``S/8, S/4, S/2, S``); every encoder level is used exactly once (the deepest as the bottleneck input,
      the others as skips);
    * ``decoder_features[L]`` (32): ``final``, one 3x3x3 conv unit (InstanceNorm, GELU, dropout) at full
      resolution;
    * ``head``: a 1x1x1 convolution to ``out_channels`` (logits for segmentation; predicted noise for
      denoising). No output activation.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` with ``S`` divisible by ``2 ** (L - 1)``.

    Args:
        in_channels: image channels.
        out_channels: output channels (4 tissue classes for IXI, 2 for lesion, 1 for denoising).
        encoder_features: widths of the encoder; must match the pretrained weights.
        decoder_features: decoder widths as above.
        dropout: dropout probability of every conv unit (encoder and decoder; the frozen encoder is kept in
            eval mode, so its dropout is inactive while frozen).
        pretrained_encoder: weights for the encoder: a state-dict file, a checkpoint, a MONAI bundle folder,
            or a state dict (see :func:`load_encoder_weights`); ``None`` keeps the random initialisation.
        freeze_encoder: ``True`` (paper): encoder parameters get ``requires_grad=False`` and the encoder stays
            in eval mode even after ``model.train()``. ``False`` fine-tunes it.
        norm, act, spatial_dims: as in :class:`Encoder`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        encoder_features: Sequence[int] = PAPER_ENCODER_FEATURES,
        decoder_features: Sequence[int] = PAPER_DECODER_FEATURES,
        dropout: float = 0.2,
        pretrained_encoder: str | Path | Mapping[str, Any] | None = None,
        freeze_encoder: bool = True,
        norm: NormType = "instance",
        act: ActType = "gelu",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, encoder_features, dropout, norm, act, spatial_dims)
        enc = self.encoder.features
        dec = tuple(int(f) for f in decoder_features)
        if len(dec) != len(enc) + 1:
            raise ValueError(
                f"decoder_features needs len(encoder_features) + 1 = {len(enc) + 1} widths (bottleneck, one per "
                f"upsampling, final block), got {dec} for encoder_features {enc}"
            )
        self.bottleneck = ConvBlock(spatial_dims, enc[-1], dec[0], norm, act, dropout)
        ups = []
        c_in = dec[0]
        for k, c_out in enumerate(dec[1:-1]):
            skip_level = len(enc) - 2 - k
            ups.append(UpBlock(spatial_dims, c_in, enc[skip_level], c_out, norm, act, dropout))
            c_in = c_out
        self.ups = nn.ModuleList(ups)
        self.final = _conv_unit(spatial_dims, c_in, dec[-1], norm, act, dropout)
        self.head = Conv["conv", spatial_dims](dec[-1], out_channels, kernel_size=1)
        self.out_channels = int(out_channels)

        self.encoder_frozen = bool(freeze_encoder)
        self.loaded_encoder_tensors = 0
        if pretrained_encoder is not None:
            self.loaded_encoder_tensors = load_encoder_weights(self.encoder, pretrained_encoder)
        if self.encoder_frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> FrozenEncoderUNet:
        """Set train/eval mode; a frozen encoder always stays in eval mode (no dropout)."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that require gradients (the decoder and head when the encoder is frozen)."""
        return (p for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S) -> (B, out_channels, *S)``."""
        skips = self.encoder(x)
        y = self.bottleneck(skips[-1])
        for k, up in enumerate(self.ups):
            y = up(y, skips[len(skips) - 2 - k])
        return self.head(self.final(y))

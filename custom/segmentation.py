"""Shared definitions of the frozen-encoder downstream bundles (tissue / lesion segmentation, denoising).

Training, evaluation and inference configs build their network, preprocessing and sliding-window inferer here,
from one :class:`DownstreamSettings` record. Training writes that record next to the weights
(``models/model.json`` beside ``models/model.pt``), so evaluation and inference rebuild exactly the trained
network and preprocessing (paper-size or CPU-size) without repeating hyper-parameters in every config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, ResampleToMatchd

from custom.errors import InputError
from custom.fast_inference import SPEED_KEYS, FastSlidingWindowInferer, speed_options
from custom.handlers import is_main_process
from custom.io import atomic_torch_save, atomic_write_text
from custom.networks import FrozenEncoderUNet
from custom.preprocess import image_preprocessing

__all__ = [
    "DownstreamSettings",
    "build_network",
    "build_inferer",
    "build_preprocessing",
    "load_settings",
    "load_trained",
    "BestModelExport",
]

logger = logging.getLogger(__name__)


@dataclass
class DownstreamSettings:
    """Everything needed to rebuild a trained downstream network and its preprocessing.

    Attributes:
        task: ``"segmentation"`` or ``"regression"`` (denoising).
        out_channels: classes (segmentation) or output channels (regression).
        encoder_features, decoder_features, dropout: network widths (see :class:`FrozenEncoderUNet`).
        pixdim: voxel size (mm) images are resampled to, in RAS orientation.
        patch_size: training patch and sliding-window size (voxels).
        normalize: intensity normalisation (``percentile`` or ``zscore``, see :mod:`custom.preprocess`).
        class_names: names of the classes (segmentation).
    """

    task: str = "segmentation"
    out_channels: int = 4
    encoder_features: Sequence[int] = (64, 128, 256, 512, 768)
    decoder_features: Sequence[int] = (768, 512, 256, 128, 64, 32)
    dropout: float = 0.2
    pixdim: Sequence[float] = (1.0, 1.0, 1.0)
    patch_size: Sequence[int] = (96, 96, 96)
    normalize: str = "percentile"
    class_names: Sequence[str] = field(default_factory=lambda: ("background", "GM", "WM", "CSF"))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> DownstreamSettings:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_network(settings: DownstreamSettings, pretrained_encoder: str | None = None) -> FrozenEncoderUNet:
    """The frozen-encoder U-Net of ``settings``; ``pretrained_encoder`` None means a random encoder."""
    network = FrozenEncoderUNet(
        in_channels=1,
        out_channels=int(settings.out_channels),
        encoder_features=tuple(settings.encoder_features),
        decoder_features=tuple(settings.decoder_features),
        dropout=float(settings.dropout),
        pretrained_encoder=pretrained_encoder,
        freeze_encoder=True,
    )
    if pretrained_encoder is not None:
        logger.info("encoder: copied %d tensors from %s; frozen", network.loaded_encoder_tensors, pretrained_encoder)
    return network


def build_preprocessing(
    settings: DownstreamSettings, label_keys: Sequence[str] = (), labels_to_image_grid: bool = False
) -> Compose:
    """Load, RAS-orient, resample to ``settings.pixdim`` and normalise (the same for training and inference).

    ``labels_to_image_grid`` first resamples each label onto its image's voxel grid (nearest neighbour), for
    data whose masks were drawn on another scan's grid (e.g. ARC lesion masks); without it, image and label must
    share a grid (checked by :func:`custom.evaluation.check_labelled_items`).
    """
    pipeline = image_preprocessing(
        keys=("image",), label_keys=tuple(label_keys), pixdim=tuple(settings.pixdim), normalize=settings.normalize
    )
    if labels_to_image_grid and label_keys:
        steps = list(pipeline.transforms)
        steps.insert(1, ResampleToMatchd(keys=list(label_keys), key_dst="image", mode="nearest"))
        pipeline = Compose(steps)
    return pipeline


def build_inferer(
    settings: DownstreamSettings,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    *,
    cpu_fast: bool | str | dict[str, Any] | None = None,
    **speed: Any,
) -> FastSlidingWindowInferer:
    """Sliding-window inference over ``settings.patch_size`` windows, Gaussian-weighted blending.

    With the defaults (overlap 0.25, ``sw_batch_size`` 4, no speed option) this is MONAI's ``SlidingWindowInferer``
    (float32, every window of the image), as training validation, evaluation and inference use it.

    ``cpu_fast``: the inference configs' key of that name, turned into speed options by
    :func:`custom.fast_inference.speed_options` (``true``: bfloat16 where native, channels-last copy and, for
    segmentation, the foreground crop). ``speed``: options of :class:`~custom.fast_inference.FastSlidingWindowInferer`
    (``precision``, ``channels_last``, ``crop_foreground``, ``crop_threshold``, ``crop_margin``, ``whole_volume``);
    they, ``overlap`` and ``sw_batch_size`` override what ``cpu_fast`` sets. Outside a foreground crop, segmentation
    outputs background (logits ``0`` for class 0, ``-1e4`` for the others; ``-1e4`` for a single sigmoid channel) and
    regression outputs ``0`` (a denoiser's predicted noise: the input is kept).
    """
    options: dict[str, Any] = {"overlap": 0.25, "sw_batch_size": 4, **speed_options(cpu_fast, settings.task)}
    options.update(speed)
    if overlap is not None:
        options["overlap"] = overlap
    if sw_batch_size is not None:
        options["sw_batch_size"] = sw_batch_size
    unknown = sorted(set(options) - set(SPEED_KEYS))
    if unknown:
        raise TypeError(f"build_inferer: unknown option(s) {unknown}; choose from {list(SPEED_KEYS)}")
    channels = int(settings.out_channels)
    if settings.task == "segmentation":
        outside: float | list[float] = [0.0] + [-1.0e4] * (channels - 1) if channels > 1 else -1.0e4
    else:
        outside = 0.0
    return FastSlidingWindowInferer(
        roi_size=tuple(settings.patch_size),
        mode="gaussian",
        outside_value=outside,
        size_divisor=2 ** (len(tuple(settings.encoder_features)) - 1),
        **options,
    )


def settings_path(weights: str | Path) -> Path:
    """``models/model.json`` beside ``models/model.pt``."""
    return Path(weights).with_suffix(".json")


def load_settings(weights: str | Path) -> DownstreamSettings:
    """The :class:`DownstreamSettings` that training wrote beside ``weights`` (``model.json`` beside ``model.pt``).

    Inference configs build their ``network_def`` from it, so the network has the widths of the weights it loads.

    Raises:
        InputError: no weights or no settings file, naming the file and the ``--model_path`` option.
    """
    weights = Path(weights)
    meta = settings_path(weights)
    if not weights.is_file():
        raise InputError(
            f"{weights}: no trained weights; train the bundle first (or pass --model_path <model.pt>, with its "
            "model.json beside it)"
        )
    if not meta.is_file():
        raise InputError(f"{meta}: settings of the trained model are missing (written by training beside {weights})")
    try:
        record = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{meta}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise InputError(f"{meta}: expected a JSON object of settings")
    return DownstreamSettings.from_dict(record)


def load_trained(
    weights: str | Path, device: str | torch.device = "cpu"
) -> tuple[FrozenEncoderUNet, DownstreamSettings]:
    """Rebuild a trained downstream network from ``model.pt`` and its ``model.json`` settings."""
    weights = Path(weights)
    meta = settings_path(weights)
    settings = load_settings(weights)
    network = build_network(settings, pretrained_encoder=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{weights}: weights do not match the settings in {meta} ({err})") from err
    return network.to(device).eval(), settings


class BestModelExport:
    """Save the whole network (frozen encoder included) and its settings when the validation metric improves.

    Attach to the validation evaluator; writes ``path`` (state dict) and ``path`` with ``.json`` (settings plus
    the metric and epoch) atomically, rank 0 only. ``mode``: ``max`` when a larger metric is better (Dice),
    ``min`` when smaller is better (MSE).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        settings: DownstreamSettings,
        path: str | Path,
        metric_name: str,
        mode: str = "max",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.network = network
        self.settings = settings
        self.path = Path(path)
        self.metric_name = metric_name
        self.sign = 1.0 if mode == "max" else -1.0
        self.best = -float("inf")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, float]:
        """The best value so far (kept in training checkpoints, so a resumed run does not overwrite a better model)."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics.get(self.metric_name, float("nan")))
        if not is_main_process() or not self.sign * value > self.best:
            return
        self.best = self.sign * value
        net = self.network.module if hasattr(self.network, "module") else self.network
        atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, self.path)
        record = {**self.settings.to_dict(), "best_metric": {self.metric_name: value}}
        trainer = getattr(engine.state, "trainer_epoch", None)
        if trainer is not None:
            record["epoch"] = trainer
        atomic_write_text(json.dumps(record, indent=2), settings_path(self.path))
        logger.info("best %s %.4f: saved %s", self.metric_name, value, self.path)

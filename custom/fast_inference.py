"""Fast sliding-window inference on CPU: bfloat16, channels-last, foreground crop, whole-volume pass.

:func:`custom.segmentation.build_inferer` returns a :class:`FastSlidingWindowInferer`. With its defaults it is
MONAI's ``SlidingWindowInferer`` unchanged (float32, the whole image, ``roi_size`` windows), and every bundle config
uses the defaults unless asked otherwise (the inference configs' ``cpu_fast`` key, :func:`speed_options`). Each
option below trades a small change of the output for speed; ``benchmarks/infer.py --variants`` measures seconds per
scan and label agreement with the default path on one input:

* ``precision``: ``"fp32"`` (default), ``"bf16"`` or ``"auto"``. ``bf16`` runs a bfloat16 copy of the network on CPUs
  that compute bfloat16 natively (oneDNN with AVX512-BF16 or AMX: :func:`bf16_supported`); elsewhere it falls back
  to float32 with one warning. ``auto`` is ``bf16`` on such CPUs and float32 otherwise, and on non-CPU devices (where
  the predictor's ``amp`` autocast applies). Logits come back as float32, so blending, softmax and everything after
  them stay float32. A full bfloat16 copy avoids what ``torch.autocast`` does on CPU: cast every convolution's input
  and output back and forth around the float32 normalisation layers.
* ``channels_last``: run the copy in ``channels_last_3d`` memory format, with every ``InstanceNorm`` replaced by the
  same function written as ``group_norm`` with one group per channel (PyTorch's instance norm makes a contiguous copy
  of channels-last input; group norm has a native channels-last kernel). The same function: float32 results match
  the original to float rounding. oneDNN's bfloat16 convolutions use channels-last blocks, so it goes with ``bf16``.
* ``crop_foreground``: run the sliding window over the bounding box of the head only (voxels brighter than the image
  minimum by ``crop_threshold``, in the preprocessed, normalised units, plus ``crop_margin`` voxels), and paste the
  result back onto the full grid; outside the box every voxel gets ``outside_value`` (for segmentation: logits that
  make it background with probability 1). Fewer windows where the head does not fill the field of view (the 1 mm
  skull-stripped MNI152 template: 12 windows of 96^3 at overlap 0.25 instead of 27). The windows sit elsewhere than
  on the full image, and the network's instance norms normalise each window over what it holds, so labels near
  tissue boundaries can change.
* ``whole_volume``: one network pass over the whole (cropped) image, padded to a multiple of ``size_divisor``, instead
  of overlapping windows: no voxel is computed twice. Instance norm then normalises over the whole image instead of
  a window, so outputs differ more than with the other options, and memory grows with the image.

The bfloat16 / channels-last copy is made when the inferer is called and reused while the network's weights stay
the same (same tensors, same in-place version counters), so loading a checkpoint or a training step makes a fresh
copy; the network itself is never modified.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.utils import convert_to_dst_type

__all__ = [
    "PRECISIONS",
    "FastSlidingWindowInferer",
    "ChannelsLastInstanceNorm",
    "bf16_supported",
    "foreground_box",
    "grow_box",
    "inference_copy",
    "resolve_dtype",
    "speed_options",
    "window_count",
]

logger = logging.getLogger(__name__)

#: Values of ``precision``.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")

#: What ``cpu_fast: true`` of the inference configs turns on (:func:`speed_options`): bfloat16 where the CPU computes
#: it natively and the channels-last copy. The window grid (overlap 0.25, Gaussian blending) stays as in the default
#: path; the foreground crop and the whole-volume pass, which move or remove the windows, are left out (a dict value
#: of ``cpu_fast`` turns them on).
CPU_FAST: dict[str, Any] = {"precision": "auto", "channels_last": True}
#: Options of :class:`FastSlidingWindowInferer` / ``build_inferer`` that :func:`speed_options` accepts.
SPEED_KEYS: tuple[str, ...] = (
    "precision",
    "channels_last",
    "crop_foreground",
    "crop_threshold",
    "crop_margin",
    "whole_volume",
    "overlap",
    "sw_batch_size",
)


def _as_bool(text: str, message: str) -> bool:
    """``"true"`` / ``"false"`` (and ``1``/``0``, ``yes``/``no``, any case) as a command line passes them."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}
    if text.strip().lower() not in words:
        raise ValueError(f"{message}, got {text!r}")
    return words[text.strip().lower()]


def speed_options(cpu_fast: bool | str | dict[str, Any] | None, task: str = "segmentation") -> dict[str, Any]:
    """Keywords of ``build_inferer`` for an inference config's ``cpu_fast`` value.

    ``False`` / ``None`` (or the strings ``"false"``, ``"0"``, ``"no"``, as a command line may pass them): none (the
    default path, unchanged). ``True``: :data:`CPU_FAST`, never with the foreground crop for ``task="regression"``
    (a denoiser would leave the noise outside the box). A dict: :data:`CPU_FAST` updated by it, e.g.
    ``{"crop_foreground": True}`` or ``{"crop_foreground": True, "overlap": 0.0}``; keys outside :data:`SPEED_KEYS`
    are refused.
    """
    if isinstance(cpu_fast, str):
        cpu_fast = _as_bool(cpu_fast, "cpu_fast must be true, false or a dict of options")
    if cpu_fast is None or cpu_fast is False:
        return {}
    if cpu_fast is True:
        extra: dict[str, Any] = {}
    elif isinstance(cpu_fast, dict):
        extra = dict(cpu_fast)
        unknown = sorted(set(extra) - set(SPEED_KEYS))
        if unknown:
            raise ValueError(f"cpu_fast: unknown option(s) {unknown}; choose from {list(SPEED_KEYS)}")
        for key in ("channels_last", "crop_foreground", "whole_volume"):  # {crop_foreground: false} on a command line
            if isinstance(extra.get(key), str):
                extra[key] = _as_bool(extra[key], f"cpu_fast: {key} must be true or false")
    else:
        raise TypeError(f"cpu_fast must be true, false or a dict of options, got {cpu_fast!r}")
    options = dict(CPU_FAST)
    if task != "segmentation":
        options.pop("crop_foreground", None)
    options.update(extra)
    return options


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX).

    Without it PyTorch emulates bfloat16 on CPU, slower than float32; ``precision="bf16"`` then falls back to float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older / newer PyTorch without the probe: assume no support
        return False


def resolve_dtype(precision: str, device: torch.device | str, supported: bool | None = None) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``: ``torch.bfloat16`` or ``torch.float32``.

    ``supported`` (tests): whether bfloat16 is native here; default :func:`bf16_supported` on CPU, and on CUDA
    ``torch.cuda.is_bf16_supported()``. ``"bf16"`` without support falls back to float32 with a warning.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and device.type != "cpu"):
        return torch.float32
    if supported is None:
        if device.type == "cpu":
            supported = bf16_supported()
        else:
            supported = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if supported:
        return torch.bfloat16
    if precision == "bf16":
        logger.warning("precision bf16: this %s has no native bfloat16; running float32 instead", device.type)
    return torch.float32


class ChannelsLastInstanceNorm(nn.Module):
    """Instance norm (no running statistics) computed as ``group_norm`` with one group per channel.

    The same function as ``torch.nn.InstanceNorm{1,2,3}d(track_running_stats=False)`` (affine or not), but it keeps
    channels-last input channels-last instead of copying it to a contiguous tensor first.
    """

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.weight = norm.weight if norm.affine else None
        self.bias = norm.bias if norm.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


def _swap_instance_norms(module: nn.Module) -> int:
    """Replace every instance norm without running statistics in ``module`` (in place); return how many."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            setattr(module, name, ChannelsLastInstanceNorm(child))
            swapped += 1
        else:
            swapped += _swap_instance_norms(child)
    return swapped


def inference_copy(network: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy of ``network`` for inference: floating tensors in ``dtype``, and with ``channels_last``,
    5D weights in ``channels_last_3d`` and instance norms as :class:`ChannelsLastInstanceNorm`.

    The copy's tensors are made directly in ``dtype`` (no float32 duplicate of the weights on the way) and do not
    require gradients; ``network`` is left as it is.
    """
    memo: dict[int, Any] = {}
    for module in network.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                data = p.detach().to(dtype) if p.is_floating_point() else p.detach().clone()
                memo[id(p)] = nn.Parameter(data, requires_grad=False)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b.detach().clone()
    fast = copy.deepcopy(network, memo).eval()
    if channels_last:
        _swap_instance_norms(fast)
        for module in fast.modules():
            for name, p in module._parameters.items():
                if p is not None and p.ndim == 5:
                    module._parameters[name] = nn.Parameter(
                        p.detach().contiguous(memory_format=torch.channels_last_3d), requires_grad=False
                    )
    return fast


def _weights_version(network: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of every tensor of ``network``: changes when its weights change."""
    tensors = [*network.parameters(), *network.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to the tensor(s) of a network output (tensor, tuple/list or dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


class _Cast:
    """Calls ``network`` on input cast to ``dtype`` (and channels-last); returns float32, contiguous output."""

    def __init__(self, network: Callable[..., Any], dtype: torch.dtype, channels_last: bool) -> None:
        self.network, self.dtype, self.channels_last = network, dtype, channels_last

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = x.to(self.dtype)
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = self.network(x, *args, **kwargs)
        return _map_tensors(out, lambda t: t.float().contiguous() if t.is_floating_point() else t)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (a MONAI ``MetaTensor`` without its metadata)."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def foreground_box(image: torch.Tensor, threshold: float = 0.05, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the voxels of ``image`` ``(B, C, *S)`` brighter than its minimum by more than ``threshold``
    (any batch item or channel), grown by ``margin`` voxels on each side and clipped to the image.

    Returns one ``slice`` per spatial axis, or ``None`` when no voxel passes (a constant image).
    """
    spatial = image.shape[2:]
    mask = (image > image.min() + threshold).flatten(0, 1).any(dim=0)
    if not bool(mask.any()):
        return None
    box = []
    for axis, size in enumerate(spatial):
        others = tuple(d for d in range(len(spatial)) if d != axis)
        hits = torch.nonzero(mask.any(dim=others) if others else mask).flatten()
        start, stop = int(hits[0]) - int(margin), int(hits[-1]) + 1 + int(margin)
        box.append(slice(max(start, 0), min(stop, int(size))))
    return tuple(box)


def grow_box(box: tuple[slice, ...], size: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown (about its centre, kept inside ``shape``) to at least ``size`` on each axis where the image
    allows, so the sliding window does not pad a cropped region with ``cval`` (0, not the background of a
    normalised image) where the full image needs no padding."""
    grown = []
    for s, want, full in zip(box, size, shape, strict=True):
        start, stop, want, full = int(s.start), int(s.stop), int(want), int(full)
        missing = min(want, full) - (stop - start)
        if missing > 0:
            start -= missing // 2
            stop += missing - missing // 2
            shift = max(-start, 0) - max(stop - full, 0)
            start, stop = start + shift, stop + shift
        grown.append(slice(start, stop))
    return tuple(grown)


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits over ``shape`` (its padding and scan interval)."""
    padded = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    interval = [int(r) if s == r else max(int(r * (1 - overlap)), 1) for s, r in zip(padded, roi, strict=True)]
    return len(dense_patch_slices(padded, [int(r) for r in roi], interval))


class FastSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` with the speed options of this module (see its docstring).

    With ``precision="fp32"``, ``channels_last=False``, ``crop_foreground=False`` and ``whole_volume=False`` (the
    defaults) a call is exactly ``SlidingWindowInferer.__call__``.

    Args:
        roi_size, sw_batch_size, overlap, mode, **kwargs: as ``SlidingWindowInferer``.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (see :func:`resolve_dtype`).
        channels_last: run a channels-last copy of the network (5D inputs).
        crop_foreground: infer on the foreground bounding box only, paste back onto the full grid.
        crop_threshold: foreground = brighter than the image minimum by more than this (normalised intensity).
        crop_margin: voxels added around the foreground box on each side.
        outside_value: output outside the box: one number, or one per output channel (segmentation logits:
            ``(0, -1e4, ...)`` is background with probability 1; regression: ``0``).
        whole_volume: one pass over the whole (cropped) image padded to a multiple of ``size_divisor``.
        size_divisor: the network's input size multiple (``2 ** (levels - 1)`` for the U-Net; 16 in the paper).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        mode: str = "constant",
        *,
        precision: str = "fp32",
        channels_last: bool = False,
        crop_foreground: bool = False,
        crop_threshold: float = 0.05,
        crop_margin: int = 4,
        outside_value: float | Sequence[float] = 0.0,
        whole_volume: bool = False,
        size_divisor: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, **kwargs)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.crop_foreground = bool(crop_foreground)
        self.crop_threshold = float(crop_threshold)
        self.crop_margin = int(crop_margin)
        self.outside_value = outside_value
        self.whole_volume = bool(whole_volume)
        self.size_divisor = int(size_divisor)
        self._copy: nn.Module | None = None
        self._copy_key: tuple[Any, ...] | None = None
        self._source: weakref.ref | None = None
        #: what the last call did: dtype, box, windows (for logs and benchmarks)
        self.last_run: dict[str, Any] = {}

    @property
    def is_default(self) -> bool:
        """Whether every speed option is off (then a call is plain ``SlidingWindowInferer``)."""
        return (
            self.precision == "fp32" and not self.channels_last and not self.crop_foreground and not self.whole_volume
        )

    def _network_for(self, network: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
        """The network to run: a cached bfloat16 / channels-last copy when the options ask for one, else itself."""
        dtype = resolve_dtype(self.precision, device)
        self.last_run["dtype"] = dtype
        if (dtype == torch.float32 and not self.channels_last) or not isinstance(network, nn.Module):
            return network
        key = (id(network), dtype, self.channels_last, _weights_version(network))
        if self._copy is None or self._copy_key != key or self._source is None or self._source() is not network:
            self._copy = None  # free the old copy before making the new one
            self._copy = inference_copy(network, dtype, self.channels_last)
            self._copy_key, self._source = key, weakref.ref(network)
        return _Cast(self._copy, dtype, self.channels_last)

    def _whole(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One pass over ``inputs`` padded to a multiple of ``size_divisor`` on every axis, with the image's minimum
        (its background, as the voxels around a head in a window of the default path)."""
        spatial = inputs.shape[2:]
        pad: list[int] = []
        for size in reversed(spatial):
            extra = -int(size) % self.size_divisor
            pad += [extra // 2, extra - extra // 2]
        x = F.pad(inputs, pad, mode="constant", value=float(inputs.min())) if any(pad) else inputs
        out = network(x, *args, **kwargs)
        crop = tuple(
            slice(pad[2 * (len(spatial) - 1 - d)], pad[2 * (len(spatial) - 1 - d)] + int(s))
            for d, s in enumerate(spatial)
        )
        return _map_tensors(out, lambda t: t[(slice(None), slice(None), *crop)])

    def _paste(self, out: torch.Tensor, box: tuple[slice, ...], shape: Sequence[int]) -> torch.Tensor:
        """``out`` (the box's output) on the full grid ``shape``, ``outside_value`` elsewhere."""
        if tuple(out.shape[2:]) != tuple(s.stop - s.start for s in box):
            raise RuntimeError(
                f"crop_foreground needs an output of the input's spatial size, got {tuple(out.shape)} for a box of "
                f"{tuple(s.stop - s.start for s in box)}"
            )
        full = torch.empty((*out.shape[:2], *shape), dtype=out.dtype, device=out.device)
        fill = torch.as_tensor(self.outside_value, dtype=out.dtype, device=out.device).flatten()
        if fill.numel() not in (1, out.shape[1]):
            raise ValueError(f"outside_value has {fill.numel()} values for {out.shape[1]} output channels")
        full[:] = fill.reshape(1, -1, *([1] * len(shape)))
        full[(slice(None), slice(None), *box)] = out
        return full

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.last_run = {}
        if self.is_default:
            return super().__call__(inputs, network, *args, **kwargs)
        net = self._network_for(network, inputs.device)
        region, box = inputs, None
        if self.crop_foreground:
            box = foreground_box(inputs, self.crop_threshold, self.crop_margin)
            if box is not None and not self.whole_volume:
                box = grow_box(box, self.roi_size, inputs.shape[2:])
            if box is not None:
                region = inputs[(slice(None), slice(None), *box)]
        self.last_run["box"] = box
        self.last_run["region"] = tuple(int(s) for s in region.shape[2:])
        if self.whole_volume:
            self.last_run["windows"] = 1
            out = self._whole(region, net, *args, **kwargs)
        else:
            self.last_run["windows"] = window_count(region.shape[2:], self.roi_size, self.overlap)
            out = super().__call__(region, net, *args, **kwargs)
        if box is not None:
            out = _map_tensors(out, lambda t: self._paste(_plain(t), box, inputs.shape[2:]))
        elif not self.whole_volume:
            return out  # the sliding window already returns the type of ``inputs``
        return _map_tensors(out, lambda t: convert_to_dst_type(t, inputs, dtype=t.dtype)[0])

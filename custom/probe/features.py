"""Feature functions of the probe: what a function sees (:class:`ProbeVolume`), the baselines (position,
intensity), an encoder as a feature function, and the sampling of level maps at canvas voxels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CHUNK",
    "ProbeVolume",
    "FeatureFunction",
    "PositionFeatures",
    "IntensityFeatures",
    "EncoderFeatures",
    "sample_voxel_features",
    "probe_input",
]

CHUNK = 65536  # voxels per feature-sampling / prediction chunk


@dataclass
class ProbeVolume:
    """One subject under one contrast, on the evaluation canvas (what a feature function sees).

    Attributes:
        subject: subject name. contrast: contrast name.
        image: ``(X, Y, Z)`` float32 normalised image (0 outside the brain and on the padding).
        mask: ``(X, Y, Z)`` bool brain mask. labels: ``(X, Y, Z)`` uint8 tissue labels (0 bg, 1 GM, 2 WM, 3 CSF).
    """

    subject: str
    contrast: str
    image: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


FeatureFunction = Callable[[ProbeVolume], Sequence[torch.Tensor]]
"""``volume -> [(C_l, *S_l), ...]``: feature maps at any resolution dividing the canvas (upsampled for the probe)."""


class PositionFeatures:
    """Baseline: the voxel's canvas coordinates ``x, y, z`` in ``(-1, 1)``, their squares and pairwise products."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        shape = tuple(volume.image.shape)
        if shape not in self._cache:
            axes = [(2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1 for n in shape]
            x, y, z = torch.meshgrid(*axes, indexing="ij")
            self._cache[shape] = torch.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
        return [self._cache[shape]]


class IntensityFeatures:
    """Baseline: the normalised intensity and its 3x3x3 local mean (a trivial local-intensity model)."""

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        image = volume.image.float()[None, None]
        local = F.avg_pool3d(image, kernel_size=3, stride=1, padding=1)
        return [torch.cat([image, local], dim=1)[0]]


class EncoderFeatures:
    """An image encoder as a feature function: ``encoder((1, 1, *S))`` -> its list of level maps (deepest last),
    in eval mode, without gradients (autocast on CUDA)."""

    def __init__(self, encoder: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        x = volume.image.float()[None, None].to(self.device)
        amp = torch.autocast("cuda") if self.device.type == "cuda" else _null_context()
        with torch.inference_mode(), amp:
            out = self.encoder(x)
        maps = list(out) if isinstance(out, list | tuple) else [out]
        return [m[0].float() for m in maps]


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def sample_voxel_features(
    maps: Sequence[torch.Tensor], points: torch.Tensor, shape: Sequence[int], chunk: int = CHUNK
) -> list[torch.Tensor]:
    """Features of each level map at canvas voxels ``points`` ``(N, 3)``: ``[(N, C_l), ...]`` (float32, CPU).

    A map at the canvas size is indexed directly; a coarser map ``(C, *S / f)`` is trilinearly interpolated
    exactly as ``F.interpolate(scale_factor=f, mode="trilinear", align_corners=False)`` would upsample it
    (``grid_sample`` at the voxel centres with border clamping), without building the upsampled map.
    """
    points = torch.as_tensor(points).long()
    out: list[torch.Tensor] = []
    for level in maps:
        if level.ndim != 4:
            raise ValueError(f"feature maps must be (C, X, Y, Z), got shape {tuple(level.shape)}")
        level = level.float()
        if tuple(level.shape[1:]) == tuple(shape):
            idx = points.to(level.device)
            out.append(level[:, idx[:, 0], idx[:, 1], idx[:, 2]].T.cpu())
            continue
        parts = []
        for start in range(0, points.shape[0], chunk):
            p = points[start : start + chunk].to(level.device, torch.float32)
            # normalised coordinates of the full-resolution voxel centres (grid_sample wants x = last axis first)
            norm = torch.stack([(2 * p[:, a] + 1) / float(shape[a]) - 1 for a in (2, 1, 0)], dim=1)
            grid = norm.reshape(1, -1, 1, 1, 3)
            sampled = F.grid_sample(level[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
            parts.append(sampled.reshape(level.shape[0], -1).T.cpu())
        out.append(torch.cat(parts) if parts else torch.zeros(0, level.shape[0]))
    return out


def probe_input(levels: Sequence[torch.Tensor], voxel_standardize: bool) -> torch.Tensor:
    """Concatenated per-level features ``(N, sum C_l)``, each level standardised per voxel when asked."""
    parts = []
    for f in levels:
        if voxel_standardize and f.shape[1] > 1:
            f = (f - f.mean(dim=1, keepdim=True)) / f.std(dim=1, keepdim=True).clamp_min(1e-6)
        parts.append(f)
    return torch.cat(parts, dim=1)

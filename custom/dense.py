"""Dense cross-view contrastive term: features at corresponding locations of the two views pulled together.

Not in the paper (an optional extension, off by default). In SeqInv both views are simulated from the same qMRI
maps, so which voxel of view 2 shows the same tissue as a voxel of view 1 is known exactly: each view's
MetaTensor affine maps its voxel grid to the voxel coordinates of the subject's volume (MONAI tracks the crop,
rotation, shear and flips in it). The pooled NT-Xent term only asks the global average of the deepest map to
match; this term asks the feature map itself to match location by location, which is what a frozen-encoder
segmentation or denoising network reads.

For one encoder level ``l`` (map of size ``S / 2**l``), every location of view 2's map is mapped into view 1's
map (level-``l`` index ``i`` covers input voxels whose centre is ``(i + 0.5) 2**l - 0.5``), view 1's map is
sampled there (trilinear), and an InfoNCE loss over ``points`` sampled locations per sample (negatives: every
other sampled location of every sample in the batch) is computed in both directions. Locations that fall
outside view 1 are not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["level_grid", "map_points", "sample_at", "DenseContrastiveLoss"]


def level_grid(shape: tuple[int, ...], level: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Input-voxel coordinates ``(N, 3)`` of the centres of every location of a level-``level`` map of ``shape``."""
    axes = [(torch.arange(s, device=device, dtype=dtype) + 0.5) * (2**level) - 0.5 for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def map_points(points: torch.Tensor, affine_from: torch.Tensor, affine_to: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates ``(B, N, 3)`` of a view mapped into another view's voxel coordinates.

    ``affine_from`` / ``affine_to``: ``(B, 4, 4)`` voxel-to-world affines of the two views (same world).
    """
    transform = torch.linalg.solve(affine_to.double(), affine_from.double())  # to^-1 @ from
    homog = torch.cat([points.double(), torch.ones_like(points[..., :1], dtype=torch.float64)], dim=-1)
    mapped = torch.einsum("bij,bnj->bni", transform, homog)[..., :3]
    return mapped.to(points.dtype)


def sample_at(feature_map: torch.Tensor, voxels: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples of ``feature_map`` ``(B, C, *s)`` at input-voxel coordinates ``voxels`` ``(B, N, 3)``.

    Returns ``(features (B, N, C), inside (B, N) bool)``; ``inside`` is False where a point lies outside the map.
    """
    size = torch.tensor(feature_map.shape[2:], device=voxels.device, dtype=voxels.dtype)
    index = (voxels + 0.5) / (2**level) - 0.5  # level-l index coordinates
    inside = ((index >= 0) & (index <= size - 1)).all(dim=-1)
    norm = 2.0 * index / torch.clamp(size - 1, min=1) - 1.0  # align_corners=True convention
    grid = norm.flip(-1)[:, :, None, None, :]  # grid_sample wants (x, y, z) = (last, ..., first) axis
    sampled = F.grid_sample(feature_map, grid.to(feature_map.dtype), mode="bilinear", align_corners=True)
    return sampled[:, :, :, 0, 0].transpose(1, 2), inside


class DenseContrastiveLoss(nn.Module):
    """InfoNCE between the feature maps of two views at corresponding locations (see the module docstring).

    Args:
        level: encoder level whose map is used (0 = full resolution; ``-1`` the deepest).
        points: locations sampled per sample (fewer when fewer correspond).
        temperature: InfoNCE temperature.
        seed: sampling seed of the locations (a fresh draw each call from a private generator).
    """

    def __init__(self, level: int = -2, points: int = 64, temperature: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.level = int(level)
        self.points = int(points)
        self.temperature = float(temperature)
        self._generator = torch.Generator().manual_seed(int(seed))

    def forward(
        self,
        maps1: list[torch.Tensor],
        maps2: list[torch.Tensor],
        affine1: torch.Tensor,
        affine2: torch.Tensor,
    ) -> torch.Tensor:
        """``maps1`` / ``maps2``: every encoder level of the two views; ``affine1`` / ``affine2``: ``(B, 4, 4)``."""
        level = self.level % len(maps1)
        f1, f2 = maps1[level], maps2[level]
        batch = f2.shape[0]
        grid = level_grid(tuple(f2.shape[2:]), level, f2.device, torch.float32)
        pts2 = grid.expand(batch, -1, -1)
        pts1 = map_points(pts2, affine2.to(f2.device), affine1.to(f2.device))
        a1, inside = sample_at(f1.float(), pts1, level)
        a2 = f2.float().flatten(2).transpose(1, 2)  # (B, N, C) at the grid points
        anchors1, anchors2 = [], []
        for b in range(batch):
            idx = torch.nonzero(inside[b]).flatten()
            if idx.numel() == 0:
                continue
            if idx.numel() > self.points:
                pick = torch.randperm(idx.numel(), generator=self._generator)[: self.points].to(idx.device)
                idx = idx[pick]
            anchors1.append(a1[b, idx])
            anchors2.append(a2[b, idx])
        if not anchors1 or sum(a.shape[0] for a in anchors1) < 2:
            return f1.sum() * 0.0  # nothing corresponds: no term (keeps the graph)
        # centred before the cosine: the GELU features are mostly positive, so raw cosines all start near 1
        x1, x2 = torch.cat(anchors1), torch.cat(anchors2)
        centre = 0.5 * (x1.mean(0, keepdim=True) + x2.mean(0, keepdim=True))
        z1 = F.normalize(x1 - centre, dim=1)
        z2 = F.normalize(x2 - centre, dim=1)
        logits = z1 @ z2.t() / self.temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def chance(self, n: int) -> float:
        """Loss value when corresponding locations are no closer than any other: ``log(n)`` for ``n`` anchors."""
        return math.log(max(n, 1))

"""Tiny tensor helpers shared by the modules of :mod:`custom.transforms` (private to the package).

MetaTensor handling (strip / restore metadata, affines), seeded torch generators and the brain region.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta

SEED_HIGH = 2**31 - 1
"""torch.Generator seeds drawn from a transform's ``self.R`` lie in [0, 2**31 - 1)."""


def plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata (no copy); arithmetic on it avoids MetaTensor bookkeeping."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def like(x: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``x`` as a MetaTensor carrying ``ref``'s affine and metadata (when metadata tracking is on)."""
    x = plain(x)
    if not get_track_meta():
        return x
    if isinstance(ref, MetaTensor):
        meta = {k: v for k, v in ref.meta.items() if k != "affine"}
        return MetaTensor(x, affine=ref.affine.clone(), meta=meta)
    return MetaTensor(x)


def as_meta(x: torch.Tensor) -> torch.Tensor:
    """Wrap a plain tensor as a MetaTensor (identity affine) so crops record their offset in its affine."""
    if isinstance(x, MetaTensor) or not get_track_meta():
        return x
    return MetaTensor(x)


def view_affine(view: torch.Tensor) -> torch.Tensor:
    """The ``(4, 4)`` float64 voxel-to-volume affine of a view (identity when metadata tracking is off)."""
    affine = getattr(view, "affine", None)
    if affine is None:
        return torch.eye(4, dtype=torch.float64)
    return torch.as_tensor(plain(affine), dtype=torch.float64).clone()


def voxel_offset(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int] | None:
    """Voxel index, in ``before``, of ``after``'s first voxel, from the MetaTensor affines (None: no meta)."""
    if not (isinstance(before, MetaTensor) and isinstance(after, MetaTensor)):
        return None
    a0 = torch.as_tensor(before.affine, dtype=torch.float64).cpu()
    a1 = torch.as_tensor(after.affine, dtype=torch.float64).cpu()
    rel = torch.linalg.solve(a0, a1)
    off = [int(round(v)) for v in rel[:3, 3].tolist()]
    return off[0], off[1], off[2]


def torch_generator(seed: int, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (CPU and CUDA streams differ for one seed)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def brain_region(maps_pd: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Brain region (boolean, shape of the mask or PD map): ``mask > 0`` when a mask is given, else PD > 0."""
    return plain(mask) > 0 if mask is not None else plain(maps_pd) > 0

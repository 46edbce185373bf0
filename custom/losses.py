"""Contrastive pretraining objective: multi-view NT-Xent (DDP-aware) plus L1 reconstruction.

``NTXentLoss`` is SimCLR's normalised-temperature cross entropy, generalised to ``V >= 2`` views per sample:
every embedding is an anchor, its positives are the other ``V - 1`` views of the same sample, and its
candidates are all other embeddings in the (global) batch. For ``V = 2`` it equals SimCLR's NT-Xent and
``monai.losses.ContrastiveLoss``.

Distributed convention (``gather_distributed=True`` and an initialised process group with world size > 1):
every rank gathers the embeddings of all ranks *with gradients*, and computes the mean loss over its *own*
anchors against all gathered candidates. With equal per-rank batches the mean of the per-rank losses equals
the single-process loss on the concatenated batch. The gather's backward sums the incoming gradients over
ranks, so the gradient reaching rank ``r``'s embeddings is ``d(sum_r' L_r') / d z_r``, i.e. ``world_size``
times the single-process gradient slice; after DDP averages parameter gradients over ranks (dividing by
``world_size``), the parameter gradients equal those of the single-process loss on the full batch.

``PretrainingLoss`` is the objective of the authors' pretraining script: NT-Xent on the two projected views
plus the L1 error of each view's reconstruction against its clean target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from custom.dense import DenseContrastiveLoss

__all__ = ["NTXentLoss", "PretrainingLoss", "similarity_stats"]

Views = torch.Tensor | Sequence[torch.Tensor]


def _as_views(views: Views) -> torch.Tensor:
    """Validate ``views`` and return a floating tensor of shape ``(V, B, D)``.

    Args:
        views: a tensor ``(V, B, D)`` or a list/tuple of ``V`` tensors ``(B, D)``.

    Raises:
        ValueError: fewer than two views, wrong number of dimensions, mismatched shapes, an empty batch or
            embedding, or a non-floating dtype.
    """
    if isinstance(views, torch.Tensor):
        if views.ndim != 3:
            raise ValueError(f"views as a tensor must have shape (V, B, D), got {tuple(views.shape)}")
        z = views
    elif isinstance(views, (list, tuple)):
        if len(views) < 2:
            raise ValueError(f"NT-Xent needs at least 2 views, got {len(views)}")
        for i, v in enumerate(views):
            if not isinstance(v, torch.Tensor) or v.ndim != 2:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"each view must be a tensor of shape (B, D); view {i} is {shape}")
            if v.shape != views[0].shape:
                raise ValueError(
                    f"all views must have the same shape; view 0 is {tuple(views[0].shape)}, "
                    f"view {i} is {tuple(v.shape)}"
                )
        z = torch.stack(list(views), dim=0)
    else:
        raise ValueError(f"views must be a tensor (V, B, D) or a list/tuple of (B, D) tensors, got {type(views)}")
    if z.shape[0] < 2:
        raise ValueError(f"NT-Xent needs at least 2 views, got {z.shape[0]}")
    if z.shape[1] < 1 or z.shape[2] < 1:
        raise ValueError(f"empty batch or embedding: views have shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {z.dtype}")
    return z


def _normalise(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension, computing in at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    return F.normalize(z.to(dtype), p=2.0, dim=-1, eps=1e-12)


def _distributed_world_size() -> int:
    """World size of the default process group, or 1 when torch.distributed is unavailable / not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` of equally shaped tensors whose backward sums the gradients of all ranks.

    Forward returns a tensor ``(world_size, *tensor.shape)``. Backward all-reduces (sum) the incoming gradient,
    so each rank receives the gradient of the *sum of all ranks' losses* with respect to its own input, and
    returns this rank's slice.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank = dist.get_rank()
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return torch.stack(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


def _gather_views(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Gather ``(V, b, D)`` embeddings from all ranks into ``(V, N, D)``, with gradients.

    Per-rank batch sizes may differ (rows are padded for the collective and the padding dropped). Samples are
    ordered by rank, so this rank's samples are ``[offset, offset + b)``.

    Returns:
        the gathered embeddings and this rank's offset into the sample dimension.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    n_views, b, dim = z.shape
    sizes_t = torch.tensor([b], device=z.device, dtype=torch.long)
    all_sizes = [torch.zeros_like(sizes_t) for _ in range(world)]
    dist.all_gather(all_sizes, sizes_t)
    sizes = [int(s.item()) for s in all_sizes]
    b_max = max(sizes)
    local = z.transpose(0, 1)  # (b, V, D): pad along samples only
    if b < b_max:
        local = torch.cat([local, local.new_zeros(b_max - b, n_views, dim)], dim=0)
    gathered = _GatherWithGrad.apply(local)  # (world, b_max, V, D)
    parts = [gathered[r, : sizes[r]] for r in range(world)]
    return torch.cat(parts, dim=0).transpose(0, 1), sum(sizes[:rank])


def _ntxent_own_anchors(z_all: torch.Tensor, offset: int, count: int, temperature: float) -> torch.Tensor:
    """Mean multi-positive NT-Xent of the anchors ``z_all[:, offset:offset + count]`` against all of ``z_all``.

    Args:
        z_all: L2-normalised embeddings ``(V, N, D)``.
        offset: index of the first own sample in the sample dimension.
        count: number of own samples.
        temperature: softmax temperature.
    """
    n_views, n_total, dim = z_all.shape
    own = z_all[:, offset : offset + count]  # (V, n, D)
    candidates = z_all.reshape(n_views * n_total, dim)
    logits = own.reshape(n_views * count, dim) @ candidates.T / temperature  # (V*n, V*N)

    # Mask each anchor's self-similarity: anchor (v, i) is candidate v * N + offset + i.
    anchor_ids = torch.arange(n_views * count, device=z_all.device)
    self_cols = (anchor_ids // count) * n_total + offset + anchor_ids % count
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[anchor_ids, self_cols] = True
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)  # (V*n,)

    # Positives of anchor (v, i): views u != v of the same sample i.
    positives = torch.einsum("vnd,und->vnu", own, own) / temperature  # (V, n, V)
    other_view = ~torch.eye(n_views, dtype=torch.bool, device=z_all.device)[:, None, :]
    mean_positive = positives.masked_fill(~other_view, 0.0).sum(dim=-1) / (n_views - 1)  # (V, n)

    return (log_denominator - mean_positive.reshape(-1)).mean()


class NTXentLoss(nn.Module):
    """Multi-view NT-Xent (SimCLR) loss, optionally with negatives gathered across DDP ranks.

    For anchor ``a`` with positives ``P(a)`` (the other views of its sample) and candidates ``C(a)`` (every
    embedding but ``a`` itself)::

        loss(a) = -1/|P(a)| * sum_{p in P(a)} log( exp(s(a, p) / T) / sum_{c in C(a)} exp(s(a, c) / T) )

    with ``s`` the cosine similarity; the result is the mean over anchors. Computed with ``logsumexp`` in at
    least float32 (half / bfloat16 inputs are upcast, autocast is disabled inside), so it is finite for small
    temperatures and for identical embeddings.

    Args:
        temperature: softmax temperature ``T`` (> 0).
        gather_distributed: when torch.distributed is initialised with world size > 1, gather the embeddings
            of all ranks (with gradients) so every rank uses all ranks' negatives. Every rank must then call
            ``forward`` the same number of times. See the module docstring for the gradient convention.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, views: Views) -> torch.Tensor:
        """Return the scalar loss of this rank's anchors.

        Args:
            views: a tensor ``(V, B, D)`` with ``V >= 2`` views of ``B`` samples, or a list/tuple of ``V``
                tensors ``(B, D)``; row ``i`` of every view belongs to sample ``i``.
        """
        z = _as_views(views)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = _normalise(z)
            count = z.shape[1]
            if self.gather_distributed and _distributed_world_size() > 1:
                z_all, offset = _gather_views(z)
            else:
                z_all, offset = z, 0
            return _ntxent_own_anchors(z_all, offset, count, self.temperature)

    def similarity_stats(self, views: Views) -> dict[str, float]:
        """Logging statistics of ``views`` (local batch only); see :func:`similarity_stats`."""
        return similarity_stats(views)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


@torch.no_grad()
def similarity_stats(views: Views) -> dict[str, float]:
    """Detached statistics of the normalised embeddings of the local batch, for TensorBoard.

    Returns:
        ``pos_cosine``: mean cosine similarity between different views of the same sample;
        ``neg_cosine``: mean cosine similarity between different samples (any views; NaN when ``B == 1``);
        ``embedding_std``: mean over dimensions of the per-dimension standard deviation of the normalised
        embeddings (all views and samples pooled). It is 0 when the representation has collapsed to one
        point and about ``1 / sqrt(D)`` for embeddings spread over the sphere.
    """
    z = _normalise(_as_views(views).detach())
    n_views, batch, dim = z.shape
    sim = torch.einsum("vbd,ucd->vbuc", z, z)  # (V, B, V, B)
    same_sample = torch.eye(batch, dtype=torch.bool, device=z.device)[None, :, None, :]
    same_view = torch.eye(n_views, dtype=torch.bool, device=z.device)[:, None, :, None]
    pos = sim[same_sample & ~same_view]
    neg = sim[(~same_sample).expand_as(sim)]
    flat = z.reshape(n_views * batch, dim)
    std = flat.std(dim=0, unbiased=False).mean()
    return {
        "pos_cosine": float(pos.mean()),
        "neg_cosine": float(neg.mean()) if neg.numel() else float("nan"),
        "embedding_std": float(std),
    }


class PretrainingLoss(nn.Module):
    """NT-Xent on two projected views plus the L1 reconstruction error of each view (authors' objective).

    ``loss = contrastive_weight * NTXent(z1, z2) + reconstruction_weight * (L1(recon1, target1) +
    L1(recon2, target2))``, where the targets are the clean (un-augmented) images of the two views.

    Args:
        temperature: NT-Xent temperature.
        contrastive_weight: weight of the NT-Xent term.
        reconstruction_weight: weight of the summed L1 terms.
        reconstruction: whether the reconstruction term is used; when False (or when no reconstructions are
            passed) the ``"reconstruction"`` entry is a zero tensor and is not added to the total.
        gather_distributed: passed to :class:`NTXentLoss`.
        dense_weight: weight of the optional dense cross-view term (:class:`custom.dense.DenseContrastiveLoss`;
            not in the paper; 0 = off). It needs the views' feature maps and affines (``forward`` kwargs).
        dense_level, dense_points: encoder level and sampled locations per sample of the dense term.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        reconstruction: bool = True,
        gather_distributed: bool = True,
        dense_weight: float = 0.0,
        dense_level: int = -2,
        dense_points: int = 64,
    ) -> None:
        super().__init__()
        if dense_weight < 0:
            raise ValueError(f"dense_weight must be non-negative, got {dense_weight}")
        self.dense_weight = float(dense_weight)
        self.dense = (
            DenseContrastiveLoss(level=dense_level, points=dense_points, temperature=temperature)
            if self.dense_weight > 0
            else None
        )
        if contrastive_weight < 0 or reconstruction_weight < 0:
            raise ValueError(
                f"loss weights must be non-negative, got contrastive_weight={contrastive_weight}, "
                f"reconstruction_weight={reconstruction_weight}"
            )
        self.contrastive = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)
        self.contrastive_weight = float(contrastive_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.reconstruction = reconstruction

    @staticmethod
    def _l1(recon: torch.Tensor, target: torch.Tensor | None, name: str) -> torch.Tensor:
        """Mean absolute error in at least float32, with a clear error for a missing or mismatched target."""
        if target is None:
            raise ValueError(f"reconstruction is enabled and recon{name} was given, but target{name} is missing")
        if recon.shape != target.shape:
            raise ValueError(
                f"recon{name} has shape {tuple(recon.shape)} but target{name} has shape {tuple(target.shape)}"
            )
        dtype = torch.promote_types(recon.dtype, torch.float32)
        return F.l1_loss(recon.to(dtype), target.to(dtype))

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        recon1: torch.Tensor | None = None,
        recon2: torch.Tensor | None = None,
        target1: torch.Tensor | None = None,
        target2: torch.Tensor | None = None,
        *,
        maps1: Sequence[torch.Tensor] | None = None,
        maps2: Sequence[torch.Tensor] | None = None,
        affine1: torch.Tensor | None = None,
        affine2: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the objective.

        Args:
            z1, z2: projections of the two views, ``(B, D)``.
            recon1, recon2: reconstructions of the two views (any matching shapes), or None.
            target1, target2: clean targets with the shapes of ``recon1`` / ``recon2``.
            maps1, maps2, affine1, affine2: every encoder level's map of each view and the views' ``(B, 4, 4)``
                voxel-to-volume affines; needed only when ``dense_weight > 0``.

        Returns:
            ``{"loss": total, "contrastive": NT-Xent, "reconstruction": L1(recon1) + L1(recon2)}`` (unweighted
            terms; ``loss`` is the weighted sum), plus ``"dense"`` when the dense term is on.

        Raises:
            ValueError: reconstruction is on and only one reconstruction is given, a target is missing, or a
                target's shape differs from its reconstruction's.
        """
        contrastive = self.contrastive([z1, z2])
        total = self.contrastive_weight * contrastive
        use_recon = self.reconstruction and (recon1 is not None or recon2 is not None)
        if use_recon:
            if recon1 is None or recon2 is None:
                raise ValueError("reconstruction is enabled: pass both recon1 and recon2 (or neither)")
            with torch.autocast(device_type=recon1.device.type, enabled=False):
                reconstruction = self._l1(recon1, target1, "1") + self._l1(recon2, target2, "2")
            total = total + self.reconstruction_weight * reconstruction
        else:
            reconstruction = torch.zeros((), device=contrastive.device, dtype=contrastive.dtype)
        terms = {"contrastive": contrastive, "reconstruction": reconstruction}
        if self.dense is not None:
            if maps1 is None or maps2 is None or affine1 is None or affine2 is None:
                raise ValueError("dense_weight > 0: pass maps1, maps2, affine1 and affine2 (the views' affines)")
            with torch.autocast(device_type=contrastive.device.type, enabled=False):
                terms["dense"] = self.dense(list(maps1), list(maps2), affine1, affine2)
            total = total + self.dense_weight * terms["dense"]
        return {"loss": total, **terms}

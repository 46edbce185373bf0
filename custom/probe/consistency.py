"""Dense consistency of voxel features: same subject under two contrasts against two different subjects."""

from __future__ import annotations

import math

import torch

__all__ = ["dense_consistency"]


def dense_consistency(features: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Same-subject against different-subject cosine similarity of voxel features across contrasts.

    Args:
        features: ``(S, K, P, C)``: subject, contrast, canvas location (the same ``P`` locations for every
            subject), channel. Centred first: the mean over every evaluated (subject, contrast, location in
            that subject's brain) is subtracted.
        masks: ``(S, P)`` bool: which locations are inside each subject's brain.

    Returns:
        ``{"same_subject", "different_subject", "difference"}``: the mean cosine between one subject's features
        under two different contrasts at its brain locations (every pair of contrasts), the mean between two
        different subjects under two different contrasts at the locations inside both brains (every ordered
        pair of contrasts), and ``same - different``. NaN where there is no pair.
    """
    features = torch.as_tensor(features).double()
    masks = torch.as_tensor(masks).bool()
    n_subjects, k = features.shape[:2]
    weights = masks[:, None, :].expand(n_subjects, k, -1).double()
    if float(weights.sum()) == 0:
        return {"same_subject": math.nan, "different_subject": math.nan, "difference": math.nan}
    mean = (features * weights[..., None]).sum(dim=(0, 1, 2)) / weights.sum()
    unit = features - mean
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    same_sum, same_n, diff_sum, diff_n = 0.0, 0, 0.0, 0
    for s in range(n_subjects):
        inside = masks[s]
        if k >= 2 and bool(inside.any()):
            cos = torch.einsum("apc,bpc->abp", unit[s][:, inside], unit[s][:, inside])  # (K, K, P_s)
            values = cos[off_diagonal]
            same_sum += float(values.sum())
            same_n += values.numel()
        for t in range(n_subjects):
            if t == s:
                continue
            both = masks[s] & masks[t]
            if k < 2 or not bool(both.any()):
                continue
            cos = torch.einsum("apc,bpc->abp", unit[s][:, both], unit[t][:, both])
            values = cos[off_diagonal]
            diff_sum += float(values.sum())
            diff_n += values.numel()
    same = same_sum / same_n if same_n else math.nan
    different = diff_sum / diff_n if diff_n else math.nan
    return {"same_subject": same, "different_subject": different, "difference": same - different}

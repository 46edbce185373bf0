"""custom.dense: view correspondence from the views' affines, and the dense cross-view term."""

import math

import torch

from custom import transforms as T
from custom.dense import DenseContrastiveLoss, level_grid, map_points, sample_at
from custom.losses import PretrainingLoss
from custom.networks import PretrainingModel
from tests.test_transforms import phantom


def test_affines_give_exact_voxel_correspondence_between_views():
    """seqaug views of one image (rotated, sheared, flipped differently): view 1 sampled where view 2's voxels map
    to equals view 2 there (up to interpolation), and a wrong affine does not."""
    data = phantom(meta=True)
    aug = {"bias_prob": 0.0, "gibbs_prob": 0.0, "noise_prob": 0.0, "dropout_prob": 0.0, "affine_prob": 1.0}
    t = T.ContrastiveViewsd(mode="seqaug", patch_size=16, augment=aug, view_norm="robust_max", zscore=False)
    errors, wrong = [], []
    for seed in range(4):
        t.set_random_state(seed)
        out = t(dict(data))
        v1, v2 = out["image1_recon"].as_tensor()[None], out["image2_recon"].as_tensor()[None]
        a1, a2 = out["image1_affine"][None], out["image2_affine"][None]
        pts = level_grid((16, 16, 16), 0, torch.device("cpu"), torch.float32)[None]
        mapped = map_points(pts, a2, a1)
        vals, inside = sample_at(v1, mapped, 0)
        ref = v2.flatten(2).transpose(1, 2)
        keep = inside & (ref[..., 0] > 0.05)
        assert keep.sum() > 200
        errors.append(float((vals[keep] - ref[keep]).abs().mean() / ref[keep].mean()))
        vals_w, _ = sample_at(v1, pts, 0)  # ignoring the affines
        wrong.append(float((vals_w[keep] - ref[keep]).abs().mean() / ref[keep].mean()))
    assert max(errors) < 0.08, errors
    assert min(wrong) > 3 * max(errors), (errors, wrong)


def test_dense_loss_chance_and_perfect_match():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 8, 4, 4, 4, generator=g)]
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    loss = DenseContrastiveLoss(level=0, points=16, temperature=0.1)
    same = float(loss(maps, maps, eye, eye))
    other = float(loss(maps, [torch.randn(2, 8, 4, 4, 4, generator=g)], eye, eye))
    assert same < 0.5 and other > 0.5 * math.log(32)


def test_pretraining_loss_with_dense_term_has_gradients():
    model = PretrainingModel(
        features=[4, 8, 8, 16, 16], dropout=0.0, proj_hidden=8, proj_dim=4, recon_features=[8, 8, 4, 4]
    )
    loss = PretrainingLoss(dense_weight=1.0, dense_level=-2, dense_points=8)
    x = torch.randn(4, 1, 32, 32, 32)
    out = model(x)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    terms = loss(
        out["z"][:2],
        out["z"][2:],
        out["recon"][:2],
        out["recon"][2:],
        x[:2],
        x[2:],
        maps1=[m[:2] for m in out["maps"]],
        maps2=[m[2:] for m in out["maps"]],
        affine1=eye,
        affine2=eye,
    )
    assert set(terms) == {"loss", "contrastive", "reconstruction", "dense"}
    terms["loss"].backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

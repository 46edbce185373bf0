"""Regression guard for the pretraining science: the CPU-size recipe's contrastive term leaves chance.

At CPU size the paper's recipe (instance-normalised encoder, dropout 0.2, plain MLP projector) keeps NT-Xent at
its chance value log(2B - 1) with every view embedding at cosine ~0.99 (bundles/seqinv_pretrain/docs). The
settings of ``cpu_small.yaml`` must make the term fall. This test builds the model and loss with those settings
(tiny widths), overfits ONE fixed batch of SeqInv views with reconstruction on, and asserts the drop; the same
batch with the paper's head settings is the control.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from custom import transforms as T
from custom.losses import PretrainingLoss
from custom.networks import PretrainingModel
from tests.test_transforms import phantom

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "seqinv_pretrain" / "configs"
BATCH = 4


def cpu_small() -> dict:
    return yaml.safe_load((CONFIGS / "cpu_small.yaml").read_text())


def fixed_batch(augment: dict) -> tuple[torch.Tensor, ...]:
    data = phantom(n=40)
    t = T.ContrastiveViewsd(mode="seqinv", patch_size=32, augment=augment)
    t.set_random_state(0)
    outs = [t(dict(data)) for _ in range(BATCH)]
    return tuple(
        torch.stack([o[k].as_tensor() for o in outs]) for k in ("image1", "image2", "image1_recon", "image2_recon")
    )


def overfit(dropout: float, projection_norm: str | None, encoder_norm: str, steps: int = 30) -> list[float]:
    cfg = cpu_small()
    torch.manual_seed(0)
    model = PretrainingModel(
        features=[4, 8, 8, 16, 16],
        dropout=dropout,
        proj_hidden=16,
        proj_dim=8,
        recon_features=[8, 8, 4, 4],
        proj_norm=projection_norm,
        norm=encoder_norm,
    )
    loss_fn = PretrainingLoss(temperature=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.get("learning_rate", 1e-3)))
    v1, v2, t1, t2 = fixed_batch(cfg.get("augment", {}))
    history = []
    for _ in range(steps):
        out = model(torch.cat([v1, v2]))
        z, rec = out["z"], out["recon"]
        terms = loss_fn(z[:BATCH], z[BATCH:], rec[:BATCH], rec[BATCH:], t1, t2)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append(float(terms["contrastive"].detach()))
    return history


@pytest.mark.slow
def test_cpu_small_recipe_leaves_chance_with_reconstruction_on():
    cfg = cpu_small()
    chance = math.log(2 * BATCH - 1)
    recipe = overfit(float(cfg.get("dropout", 0.2)), cfg.get("projection_norm"), cfg.get("encoder_norm", "instance"))
    assert sum(recipe[-10:]) / 10 < chance - 0.5, recipe[-10:]
    # control, same batch and steps: the paper's head (dropout 0.2, no projector BatchNorm) stays at chance
    paper = overfit(0.2, None, "instance")
    assert sum(paper[-10:]) / 10 > chance - 0.15, paper[-10:]

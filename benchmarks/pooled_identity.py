"""Does the pooled feature tell two views of one subject from other subjects at initialisation?

Random-weight encoders (dropout 0) of the CPU size, instance norm vs batch norm, on one batch of contrastive
views of 8 synthetic subjects. Printed per encoder init: the median over channels of the coefficient of
variation of ``h`` (global average of the deepest map) across inputs, and the centred cosine (features
standardised over the batch) between the two views of a subject (pos) and between subjects (neg), for
mean pooling, every level's mean concatenated, max pooling, and (instance norm) the deepest map before its norm.
The figures under "Why the CPU-size recipe deviates" in bundles/seqinv_pretrain/docs/README.md come from it.

    python benchmarks/pooled_identity.py --mode base --augment light
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from monai.transforms import Compose, CropForegroundd

from custom.data.qmri import LoadQMRId
from custom.data.qmri_datalist import qmri_datalist
from custom.networks import Encoder
from custom.transforms import ContrastiveViewsd

LIGHT = {"flip_prob": 0.0, "affine_prob": 0.0, "dropout_prob": 0.0, "gibbs_prob": 0.0, "noise_std": [0.0, 0.05]}


def views(dataset_dir: str, mode: str, augment: dict, subjects: int, patch: int) -> torch.Tensor:
    items = qmri_datalist(dataset_dir, val_fraction=0.0)["training"][:subjects]
    keys = ["pd", "r1", "r2s", "mt", "r2", "mask"]
    t = Compose(
        [
            LoadQMRId(),
            CropForegroundd(keys=keys, source_key="pd", margin=2, allow_missing_keys=True),
            ContrastiveViewsd(mode=mode, patch_size=patch, augment=augment, mask_key="mask"),
        ]
    )
    t.set_random_state(0)
    outs = [t(dict(item)) for item in items]
    return torch.stack([o["image1"].as_tensor() for o in outs] + [o["image2"].as_tensor() for o in outs])


def pos_neg(h: torch.Tensor, batch: int) -> tuple[float, float]:
    """Mean centred cosine between the two views of a subject and between different subjects."""
    h = F.normalize((h - h.mean(0)) / (h.std(0) + 1e-8), dim=1)
    s = h @ h.t()
    pos = float(torch.diagonal(s, batch).mean())
    neg_mask = ~torch.eye(2 * batch, dtype=torch.bool)
    idx = torch.arange(batch)
    neg_mask[idx, idx + batch] = False
    neg_mask[idx + batch, idx] = False
    return round(pos, 3), round(float(s[neg_mask].mean()), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="seqinv", choices=["base", "seqaug", "seqinv"])
    ap.add_argument("--augment", default="paper", choices=["paper", "light"])
    ap.add_argument("--dataset_dir", default="data/synthetic/qmri")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--inits", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = views(args.dataset_dir, args.mode, {} if args.augment == "paper" else LIGHT, args.subjects, args.patch)
    batch = x.shape[0] // 2
    print("norm | init | CV of h | mean pool pos/neg | all-level mean pos/neg | max pool pos/neg | pre-norm pos/neg")
    for norm in ("instance", "batch"):
        for seed in range(args.inits):
            torch.manual_seed(seed)
            enc = Encoder(features=[8, 16, 32, 64, 96], dropout=0.0, norm=norm).train()
            captured: dict[str, torch.Tensor] = {}
            last_conv = enc.levels[-1].convs.conv_1.conv
            hook = last_conv.register_forward_hook(lambda m, i, o, c=captured: c.__setitem__("pre", o))
            with torch.no_grad():
                maps = enc(x)
            hook.remove()
            h = maps[-1].flatten(2).mean(2)
            cv = float((h.std(0) / h.mean(0).abs().clamp(min=1e-6)).median())
            levels = torch.cat([m.flatten(2).mean(2) for m in maps], 1)
            print(
                f"{norm} | {seed} | {cv:.3f} | {pos_neg(h, batch)} | {pos_neg(levels, batch)} | "
                f"{pos_neg(maps[-1].flatten(2).amax(2), batch)} | {pos_neg(captured['pre'].flatten(2).mean(2), batch)}"
            )


if __name__ == "__main__":
    main()

"""Ready-made experiment grids: ``cpu`` (3.5-4 h on 2 idle cores) and ``paper`` (Tables 1-3, for a GPU).

Each preset is an ordinary grid (see :mod:`custom.experiment.grid`); ``seqinv experiment --preset cpu --out X
--dry_run`` writes it, resolved, to ``X/grid.yaml`` for editing, and a grid file naming ``preset: cpu`` changes only
the keys it gives (e.g. one encoder's path).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset_grid"]

_COMPARE = "bundles/seqinv_pretrain/runs/compare"

CPU: dict[str, Any] = {
    "description": (
        "CPU preset: tissue segmentation and denoising on T1, 1 training subject vs all, random / Base / SeqAug / "
        "SeqInv encoders of benchmarks/pretrain_compare.py (seed 0), 2 seeds, each bundle's cpu_small.yaml with "
        "shortened schedules (the same number of steps for 1 subject as for all); about 6.5 CPU-hours (3.5-4 h on 2 "
        "idle cores, estimated) on the 24-subject synthetic data set, a third of it evaluation; seeds: [0] halves it."
    ),
    "encoders": {
        "random": "random",
        "base": f"{_COMPARE}/base_s0/model.pt",
        "seqaug": f"{_COMPARE}/seqaug_s0/model.pt",
        "seqinv": f"{_COMPARE}/seqinv_s0/model.pt",
    },
    "seeds": [0, 1],
    "tasks": {
        "tissue_seg": {
            "contrasts": ["T1"],
            "fractions": ["1subject", 1.0],
            "metrics": ["dice_mean", "hd95_mean"],
            "train_configs": ["cpu_small.yaml"],
            # cpu_small.yaml: 100 epochs of 2 images x 4 patches (36-49 min per model); here 25 epochs of 2 x 2
            "train_overrides": {"max_epochs": 25, "val_interval": 5, "samples_per_image": 2},
            # the same number of steps as all 5 GST training subjects of the 24-subject synthetic set (3 per epoch)
            "fraction_overrides": {"1subject": {"train_repeats": 6}},
        },
        "denoise": {
            "contrasts": ["T1"],
            "fractions": ["1subject", 1.0],
            "metrics": ["psnr_denoised", "ssim_denoised", "psnr_gain"],
            "train_configs": ["cpu_small.yaml"],
            # cpu_small.yaml: 30 epochs of 50 steps (17-21 min per model); 10 epochs = 500 steps, about the fewest
            # with which a noise-predicting decoder beats predicting zero (docs of ixi_denoise)
            "train_overrides": {"max_epochs": 10, "val_interval": 5},
            # one subject drawn 100 times per epoch: 50 steps per epoch, as 5 subjects x 20 repeats
            "fraction_overrides": {"1subject": {"train_repeats": 100}},
        },
    },
}

PAPER: dict[str, Any] = {
    "description": (
        "Paper preset (Tables 1-3): tissue segmentation T1/T2/PD, lesion segmentation T1w/T2w/FLAIR, denoising "
        "T1/T2/PD; 1 %, 10 %, 100 % of the training subjects; random / Base / SeqAug / SeqInv paper-size encoders; "
        "3 seeds; the bundles' own (paper) settings. Meant for a GPU. Set data_root (or each task's dataset_dir, "
        "labels_dir / mask_dir) to the real IXI and ARC data."
    ),
    "encoders": {
        "random": "random",
        "base": "bundles/seqinv_pretrain/runs/base/model.pt",
        "seqaug": "bundles/seqinv_pretrain/runs/seqaug/model.pt",
        "seqinv": "bundles/seqinv_pretrain/runs/seqinv/model.pt",
    },
    "seeds": [0, 1, 2],
    "tasks": {
        "tissue_seg": {"contrasts": ["T1", "T2", "PD"], "fractions": [0.01, 0.1, 1.0]},
        "lesion_seg": {"contrasts": ["T1w", "T2w", "FLAIR"], "fractions": [0.01, 0.1, 1.0]},
        "denoise": {"contrasts": ["T1", "T2", "PD"], "fractions": [0.01, 0.1, 1.0]},
    },
}

PRESETS: dict[str, dict[str, Any]] = {"cpu": CPU, "paper": PAPER}


def preset_grid(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s grid mapping."""
    from custom.experiment.grid import GridError

    if name not in PRESETS:
        raise GridError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])

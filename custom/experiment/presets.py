"""Ready-made experiment grids: ``cpu`` (about 1.5 h on 2 idle cores) and ``paper`` (Tables 1-3, for a GPU).

Each preset is an ordinary grid (see :mod:`custom.experiment.grid`); ``seqinv experiment --preset cpu --out X
--dry_run`` writes it, resolved, to ``X/grid.yaml`` for editing, and a grid file naming ``preset: cpu`` changes only
the keys it gives (e.g. one encoder's path).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset_grid"]

_ENCODERS = "docs/experiments/cpu/encoders"

CPU: dict[str, Any] = {
    "description": (
        "CPU preset: tissue segmentation and denoising on T1, 1 training subject vs all, random / Base / SeqAug / "
        "SeqInv CPU-size encoders (docs/experiments/cpu/encoders: what benchmarks/pretrain_compare.py trained with "
        "seqinv_pretrain's cpu_small.yaml, pretraining seed = cell seed), 2 seeds, each bundle's cpu_small.yaml with "
        "shortened schedules (the same number of steps for 1 subject as for all); test sites GST (in domain), HH "
        "(another physics protocol) and IOP rendered by the gmm image model (no signal equation), 4 test subjects "
        "per site; 32 cells, 2 at a time: about 1.5 h on 2 idle cores."
    ),
    "encoders": {
        "random": "random",
        "base": f"{_ENCODERS}/base_s{{seed}}.pt",
        "seqaug": f"{_ENCODERS}/seqaug_s{{seed}}.pt",
        "seqinv": f"{_ENCODERS}/seqinv_s{{seed}}.pt",
    },
    "seeds": [0, 1],
    "jobs": 2,
    # its own data set, made on first use: seed 1, so its subjects are not the pretraining subjects (seed 0), and
    # the IOP site comes from the gmm image model (tissue intensities drawn per image, no signal equation)
    "data_root": "data/experiment_cpu",
    "synthetic_data": {"subjects": 24, "seed": 1, "resolution": 2.0, "ixi_image_models": {"IOP": "gmm"}},
    "eval_overrides": {"test_subjects_per_site": 4},
    "tasks": {
        "tissue_seg": {
            "contrasts": ["T1"],
            "fractions": ["1subject", 1.0],
            "metrics": ["dice_mean", "hd95_mean"],
            "train_configs": ["cpu_small.yaml"],
            # cpu_small.yaml: 100 epochs of 2 images x 4 patches; here 25 epochs of 2 x 2
            "train_overrides": {"max_epochs": 25, "val_interval": 5, "samples_per_image": 2},
            # the same number of steps as all 5 GST training subjects of the 24-subject synthetic set (3 per epoch)
            "fraction_overrides": {"1subject": {"train_repeats": 6}},
        },
        "denoise": {
            "contrasts": ["T1"],
            "fractions": ["1subject", 1.0],
            "metrics": ["psnr_denoised", "ssim_denoised", "psnr_gain"],
            "train_configs": ["cpu_small.yaml"],
            # cpu_small.yaml: 30 epochs of 30 steps; 10 epochs of 50 = 500 steps, about the fewest with which a
            # noise-predicting decoder beats predicting zero (measured: 300 steps do not)
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

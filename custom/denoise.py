"""Denoising task of the paper (Sec. 4.1, Table 3): noise model (``AddNoised``, used by the bundle's transforms) and
PSNR evaluation.

Images are z-scored (zero mean, unit standard deviation over the nonzero voxels or a brain mask), Gaussian noise
of standard deviation ``sigma`` (0.2 by default) is added on the fly, and the network predicts the noise; the
denoised image is the noisy input minus the prediction. A Rician option adds magnitude noise instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from tqdm.auto import tqdm

from custom.errors import InputError
from custom.io import atomic_write_text
from custom.metrics import PSNR_CAPTION, ResultsTable, psnr, ssim
from custom.physics import rician_noise
from custom.segmentation import DownstreamSettings, build_preprocessing

__all__ = ["AddNoised", "combine_denoising_tables", "denoising_caption", "evaluate_denoising", "NOISE_TYPES"]

logger = logging.getLogger(__name__)

NOISE_TYPES = ("gaussian", "rician")
TABLE_METRICS = ("psnr_noisy", "psnr_denoised", "psnr_gain", "ssim_noisy", "ssim_denoised")


def denoising_caption(caption: str, noise_type: str, sigma: float, seed: int) -> str:
    """``caption`` followed by the noise settings and the definition of L in PSNR (the tables' caption)."""
    return f"{caption} Noise: {noise_type}, sigma {sigma} on z-scored images, seed {seed}. {PSNR_CAPTION}".strip()


def _add_noise(image: torch.Tensor, sigma: float, noise_type: str, generator: torch.Generator) -> torch.Tensor:
    """``image`` plus Gaussian noise, or its Rician magnitude (noise generated on the CPU, moved to the device)."""
    if noise_type == "gaussian":
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype) * sigma
        return image + noise.to(image.device)
    return rician_noise(image.cpu(), sigma, generator=generator).to(image.device)


class AddNoised(MapTransform, RandomizableTransform):
    """Add noise to ``image`` on the fly; the network input becomes the noisy image, its target the noise.

    Output keys: ``noisy_key`` (the noisy image), ``noise_key`` (noisy - clean: the regression target) and
    ``clean_key`` (the clean image, kept for metrics). With the default keys the noisy image replaces ``image`` and
    the target goes to ``label``, which is what MONAI's ``SupervisedTrainer`` feeds to the network and the loss.

    Args:
        sigma: noise standard deviation, in the units of the (z-scored) image (paper: 0.2).
        noise_type: ``gaussian`` (paper) or ``rician`` (magnitude data).
    """

    def __init__(
        self,
        keys: Hashable = "image",
        sigma: float = 0.2,
        noise_type: str = "gaussian",
        noisy_key: Hashable = "image",
        noise_key: Hashable = "label",
        clean_key: Hashable = "clean",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if noise_type not in NOISE_TYPES:
            raise InputError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if sigma < 0:
            raise InputError(f"noise sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.noise_type = noise_type
        self.noisy_key, self.noise_key, self.clean_key = noisy_key, noise_key, clean_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        clean = d[key]
        generator = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
        noisy = _add_noise(clean, self.sigma, self.noise_type, generator)
        d[self.clean_key] = clean
        d[self.noisy_key] = noisy
        d[self.noise_key] = noisy - clean
        return d


def _subject_generator(seed: int, name: str) -> torch.Generator:
    """A generator fixed by (seed, subject name): the same noise for a subject in every evaluation run."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))


def evaluate_denoising(
    network: torch.nn.Module,
    settings: DownstreamSettings,
    inferer: Any,
    items: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    sigma: float = 0.2,
    noise_type: str = "gaussian",
    seed: int = 0,
    device: str | torch.device = "cpu",
    caption: str = "",
) -> ResultsTable:
    """PSNR and SSIM of the denoised test images, and of the noisy inputs (the floor), per subject.

    Every clean image is preprocessed as in training (z-scored), given noise fixed by ``seed`` and the subject,
    denoised (noisy - predicted noise) and compared with the clean image within the brain (``label > 0`` when the
    item has a label, else the nonzero voxels of the clean image). Writes ``metrics.csv`` and a Table-3-style
    ``metrics.md`` (site x contrast, mean ± std) whose caption defines L.
    """
    if not items:
        raise InputError("no test images to evaluate")
    has_labels = all(item.get("label") for item in items)
    preprocessing = build_preprocessing(settings, label_keys=["label"] if has_labels else [])
    network = network.to(device).eval()
    rows = []
    for i, item in enumerate(tqdm(items, desc="denoising", leave=False), start=1):
        name = str(item.get("subject", Path(item["image"]).name))
        data = preprocessing({k: item[k] for k in ("image", "label") if item.get(k)})
        clean = data["image"].as_tensor().float()
        mask = (data["label"].as_tensor() > 0) if has_labels else (clean != clean.flatten()[0])
        noisy = _add_noise(clean, sigma, noise_type, _subject_generator(seed, name))
        with torch.no_grad():
            predicted_noise = inferer(noisy[None].to(device), network)[0].cpu().float()
        denoised = noisy - predicted_noise
        c, n, d, m = (t[0].numpy() for t in (clean, noisy, denoised, mask))
        row = {
            "subject": name,
            "site": item.get("site", ""),
            "contrast": item.get("contrast", ""),
            "psnr_denoised": psnr(d, c, mask=m),
            "psnr_noisy": psnr(n, c, mask=m),
            "ssim_denoised": ssim(d, c, mask=m),
            "ssim_noisy": ssim(n, c, mask=m),
        }
        row["psnr_gain"] = row["psnr_denoised"] - row["psnr_noisy"]
        rows.append(row)
        logger.info(
            "[%d/%d] %s (%s %s): PSNR %.2f -> %.2f dB, SSIM %.3f -> %.3f", i, len(items), name, row["site"],
            row["contrast"], row["psnr_noisy"], row["psnr_denoised"], row["ssim_noisy"], row["ssim_denoised"],
        )  # fmt: skip
    table = ResultsTable(rows)
    out = Path(output_dir)
    table.to_csv(out / "metrics.csv")
    markdown = table.to_markdown(
        group_by=("site", "contrast"),
        metrics=list(TABLE_METRICS),
        caption=denoising_caption(caption, noise_type, sigma, seed),
        row_order=["GST", "HH", "IOP"],
        fmt="{:.2f}",
    )
    atomic_write_text(markdown + "\n", out / "metrics.md")
    print(markdown)  # the result table itself goes to stdout; diagnostics go to logging
    logger.info("per-subject metrics: %s; table: %s", out / "metrics.csv", out / "metrics.md")
    return table


def combine_denoising_tables(
    runs_dir: str | Path, caption: str = "", sigma: float = 0.2, noise_type: str = "gaussian", seed: int = 0
) -> str | None:
    """Merge every evaluation run's table (``runs_dir/eval_*/metrics.csv``, e.g. one per contrast) into
    ``runs_dir/table.md``, with the caption :func:`evaluate_denoising` writes; None when there is no run yet."""
    from custom.evaluation import combine_tables

    runs = Path(runs_dir)
    return combine_tables(
        sorted(runs.glob("eval_*/metrics.csv")),
        runs / "table.md",
        list(TABLE_METRICS),
        caption=denoising_caption(caption, noise_type, sigma, seed),
    )


def noise_summary(values: Sequence[float]) -> str:
    """Mean ± std of a list of dB values (helper for notes)."""
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.2f} ± {arr.std(ddof=1) if arr.size > 1 else 0.0:.2f}"

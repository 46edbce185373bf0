"""Invariance metrics that can rank encoders: a cross-contrast linear tissue probe and dense feature consistency.

Cross-sequence retrieval of pooled embeddings (:mod:`custom.invariance`) cannot rank encoders on the synthetic
data: every subject is a warp of one template, so two subjects differ mostly in small deformations. This module
asks instead whether the encoder's *voxel* features say the same thing about the tissue whatever the contrast.

**Cross-contrast linear probe.** Every subject's qMRI maps are imaged with a fixed panel of contrasts
(:func:`probe_contrasts`: one clinical-preset MPRAGE, FSE, GRE and FLAIR protocol, seeded, and the IXI-like
T1w/T2w/PDw protocols of one site of :data:`custom.data.synthetic.SITE_PROTOCOLS`), each with a little Rician
noise and normalised the same way for every encoder (z-score inside the brain mask, background 0, by default).
The voxel features of an encoder are all its level maps upsampled (trilinear) to the input grid and
concatenated. A multinomial logistic regression (:class:`LogisticProbe`) predicting GM / WM / CSF is fit on
class-balanced voxels of the FIT subjects under one *train* contrast and scored by balanced accuracy on the brain
voxels of the held-out TEST subjects under every *test* contrast: a train x test matrix per encoder. Its
off-diagonal mean is the **cross-contrast** accuracy (the features mean the same under another sequence), its
diagonal mean the **same-contrast** accuracy (the features hold tissue information at all). Chance is 1/3.
Bootstrap intervals resample the test subjects.

**Baselines, same voxels, same probe.** ``position`` (the voxel's canvas coordinates, their squares and
products), ``intensity`` (the normalised voxel intensity and its 3x3x3 mean), ``random`` (a randomly initialised
encoder of the same widths, seeded).

**Position cues removed** (``remove_position=True``, default): every volume, fit and test, is flipped at random
per axis and moved by a random integer translation (up to ``max_shift`` voxels per axis) on a zero-padded
canvas, drawn per subject with the seed (one subject's contrasts share its flips and shift); labels move with
it. Without this, voxel position alone predicts the tissue of the aligned synthetic brains far above chance.

**Dense consistency.** Per encoder level: the mean cosine similarity of the (centred) feature vectors at the same
canvas location of ONE test subject under two different contrasts, against that of TWO different test subjects
at the same canvas location under two different contrasts. The difference is high for sequence-invariant,
subject-specific features. Features are centred per level (the mean over all evaluated voxels is subtracted)
so a constant offset does not give 1.

**Retrieval.** :func:`custom.invariance.cross_sequence_retrieval` of the global-average-pooled deepest maps of
the test subjects under the panel, computed on the untransformed (aligned, centred) brains: with the per-subject
flips and shift, which one subject's contrasts share, the pooled map would identify the subject by its pose.

:func:`run_probe` is the entry point (``seqinv invariance`` and the pretraining bundle's ``evaluate.yaml`` call
it); it writes ``probe.json``, ``probe.md`` and ``probe.png`` atomically and returns one row per encoder.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from custom.data.qmri import LoadQMRId
from custom.data.qmri_datalist import find_qmri_subjects
from custom.data.synthetic import SITE_PROTOCOLS
from custom.errors import InputError
from custom.intensity import histogram_equalise, percentile_rescale
from custom.invariance import cross_sequence_retrieval
from custom.io import atomic_write, atomic_write_text
from custom.networks import PAPER_ENCODER_FEATURES, Encoder, encoder_features_of, load_encoder_weights
from custom.physics import rician_noise
from custom.sequences import SequenceSample, as_generator, sample_sequence, simulate
from custom.transforms import robust_max

__all__ = [
    "TISSUES",
    "BASELINES",
    "ProbeInputError",
    "ProbeVolume",
    "LogisticProbe",
    "confusion_matrix",
    "balanced_accuracy",
    "balanced_accuracy_score",
    "probe_contrasts",
    "normalize_image",
    "PositionFeatures",
    "IntensityFeatures",
    "EncoderFeatures",
    "sample_voxel_features",
    "dense_consistency",
    "evaluate_probe",
    "run_probe",
    "format_probe_table",
]

logger = logging.getLogger(__name__)

TISSUES: tuple[str, ...] = ("GM", "WM", "CSF")
"""Probe classes: label values 1, 2, 3 of the ``*_labels`` maps (0 is background, not scored)."""
BASELINES: tuple[str, ...] = ("position", "intensity", "random")
"""Baselines :func:`run_probe` adds to the encoders it is given."""
SITE_ALIASES = {"GST": "Guys", "GUYS": "Guys", "HH": "HH", "IOP": "IOP"}
NOISE_PERCENTILE = 99.5
_LABELS = re.compile(r"_labels\.nii(\.gz)?$", re.IGNORECASE)
_LESION = re.compile(r"_lesion\.nii(\.gz)?$", re.IGNORECASE)
_CHUNK = 65536  # voxels per feature-sampling / prediction chunk


class ProbeInputError(InputError):
    """Unusable probe input (missing labels, unreadable weights, too few subjects); the message names the file."""


# ------------------------------------------------------------------------------------------- probe and scores
class LogisticProbe:
    """Multinomial logistic regression in torch: standardised features, L2 penalty, full-batch L-BFGS.

    The features are standardised with the fit set's mean and standard deviation (a constant feature becomes 0);
    the weights start at zero and L-BFGS (strong Wolfe line search) minimises the mean cross-entropy plus
    ``l2 / 2 * ||W||^2`` (the bias is not penalised), in float64 on the CPU, so a fit is deterministic.

    Args:
        l2: L2 penalty on the weights (on the standardised scale).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, l2: float = 1.0e-3, max_iter: int = 200) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.l2 = float(l2)
        self.max_iter = int(max_iter)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.num_classes = 0

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> LogisticProbe:
        """Fit on features ``x`` ``(N, D)`` and integer classes ``y`` ``(N,)`` in ``[0, num_classes)``."""
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        y = torch.as_tensor(y).detach().to("cpu", torch.long)
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"fit expects x (N, D) and y (N,) with N > 0, got {tuple(x.shape)} and {tuple(y.shape)}")
        self.num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
        self.mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        self.std = torch.where(std > 1e-8, std, torch.ones_like(std))
        z = (x - self.mean) / self.std
        weight = torch.zeros(z.shape[1], self.num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12,
        )  # fmt: skip

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * self.l2 * (weight * weight).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight = weight.detach()
        self.bias = bias.detach()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(N, num_classes)`` of features ``(N, D)`` (float64, CPU)."""
        if self.weight is None or self.mean is None or self.std is None or self.bias is None:
            raise RuntimeError("LogisticProbe.logits called before fit")
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely class of each row of ``x``."""
        return self.logits(x).argmax(dim=1)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` acting on unstandardised features (``x @ W + b`` equals :meth:`logits`), float32."""
        if self.weight is None or self.mean is None or self.std is None or self.bias is None:
            raise RuntimeError("LogisticProbe.folded called before fit")
        weight = self.weight / self.std[:, None]
        return weight.float(), (self.bias - self.mean @ weight).float()


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` counts, rows the true class, columns the predicted one (int64)."""
    y_true = torch.as_tensor(y_true).reshape(-1).long().cpu()
    y_pred = torch.as_tensor(y_pred).reshape(-1).long().cpu()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.numel()} vs {y_pred.numel()}")
    flat = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean recall over the classes present (rows with a count) of a confusion matrix; NaN when it is empty."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    support = confusion.sum(dim=-1)
    present = support > 0
    if not bool(present.any()):
        return math.nan
    recall = confusion.diagonal(dim1=-2, dim2=-1)[present] / support[present]
    return float(recall.mean())


def _balanced_accuracy_batch(confusion: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy of every ``(..., C, C)`` confusion matrix (NaN where empty)."""
    confusion = confusion.double()
    support = confusion.sum(dim=-1)
    recall = confusion.diagonal(dim1=-2, dim2=-1) / support.clamp_min(1)
    present = (support > 0).double()
    return (recall * present).sum(dim=-1) / present.sum(dim=-1)


def balanced_accuracy_score(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int | None = None) -> float:
    """Balanced accuracy (mean per-class recall over the classes present in ``y_true``)."""
    y_true = torch.as_tensor(y_true).reshape(-1).long()
    y_pred = torch.as_tensor(y_pred).reshape(-1).long()
    n = int(num_classes) if num_classes is not None else int(max(int(y_true.max()), int(y_pred.max()))) + 1
    return balanced_accuracy(confusion_matrix(y_true, y_pred, n))


# ------------------------------------------------------------------------------------------------- contrasts
def probe_contrasts(seed: int = 0, preset: str = "clinical", ixi_site: str = "Guys") -> dict[str, SequenceSample]:
    """The probe's contrast panel: ``MPRAGE``, ``FSE``, ``GRE``, ``FLAIR`` (one ``preset`` protocol each, drawn in
    this order from one generator seeded by ``seed``) and ``IXI-T1w``, ``IXI-T2w``, ``IXI-PDw`` (the fixed
    protocols of ``ixi_site`` in :data:`~custom.data.synthetic.SITE_PROTOCOLS`; ``GST`` names ``Guys``)."""
    site = SITE_ALIASES.get(str(ixi_site).upper(), str(ixi_site))
    if site not in SITE_PROTOCOLS:
        raise ValueError(f"unknown IXI site {ixi_site!r}; expected one of {sorted(SITE_PROTOCOLS)} (or GST)")
    g = as_generator(int(seed))
    panel = {
        name.upper(): sample_sequence(name, preset=preset, generator=g) for name in ("mprage", "fse", "gre", "flair")
    }
    site_sequences = SITE_PROTOCOLS[site].sequences
    for key in ("T1", "T2", "PD"):
        panel[f"IXI-{key}w"] = site_sequences[key]
    return panel


def normalize_image(
    image: torch.Tensor, mask: torch.Tensor, method: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Intensity normalisation applied to every probe image, identically for every encoder.

    ``"histeq"``: the pretraining views' normalisation (:mod:`custom.intensity`: 0.5 / 95 percentile rescale,
    histogram equalisation, z-score) computed inside ``mask``; ``"zscore"``: zero mean and unit standard
    deviation inside ``mask``; ``"percentile"``: the 99.5th percentile
    inside ``mask`` scaled to 1; both set the voxels outside ``mask`` to 0 (skull-stripped, so the zero-padded
    canvas shows no box edge). ``"none"``: unchanged. A callable ``(image, mask) -> image`` is used as it is.
    """
    if callable(method):
        return method(image, mask)
    inside = image[mask]
    if method == "histeq":
        # the pretraining views' normalisation (custom.intensity): 0.5/95 percentile rescale and histogram
        # equalisation of the brain, then a z-score inside it
        brain = histogram_equalise(percentile_rescale(inside, 0.5, 95.0))
        out = torch.zeros_like(image)
        out[mask] = (brain - brain.mean()) / brain.std().clamp_min(1e-8)
        return out
    if method == "zscore":
        out = (image - inside.mean()) / inside.std().clamp_min(1e-8)
    elif method == "percentile":
        out = image / robust_max(image, mask, NOISE_PERCENTILE).clamp_min(1e-8)
    elif method == "none":
        return image
    else:
        raise ValueError(
            f"unknown normalisation {method!r}; expected 'histeq', 'zscore', 'percentile', 'none' or a callable"
        )
    return torch.where(mask, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------- feature functions
@dataclass
class ProbeVolume:
    """One subject under one contrast, on the evaluation canvas (what a feature function sees).

    Attributes:
        subject: subject name. contrast: contrast name.
        image: ``(X, Y, Z)`` float32 normalised image (0 outside the brain and on the padding).
        mask: ``(X, Y, Z)`` bool brain mask. labels: ``(X, Y, Z)`` uint8 tissue labels (0 bg, 1 GM, 2 WM, 3 CSF).
    """

    subject: str
    contrast: str
    image: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


FeatureFunction = Callable[[ProbeVolume], Sequence[torch.Tensor]]
"""``volume -> [(C_l, *S_l), ...]``: feature maps at any resolution dividing the canvas (upsampled for the probe)."""


class PositionFeatures:
    """Baseline: the voxel's canvas coordinates ``x, y, z`` in ``(-1, 1)``, their squares and pairwise products."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        shape = tuple(volume.image.shape)
        if shape not in self._cache:
            axes = [(2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1 for n in shape]
            x, y, z = torch.meshgrid(*axes, indexing="ij")
            self._cache[shape] = torch.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
        return [self._cache[shape]]


class IntensityFeatures:
    """Baseline: the normalised intensity and its 3x3x3 local mean (a trivial local-intensity model)."""

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        image = volume.image.float()[None, None]
        local = F.avg_pool3d(image, kernel_size=3, stride=1, padding=1)
        return [torch.cat([image, local], dim=1)[0]]


class EncoderFeatures:
    """An image encoder as a feature function: ``encoder((1, 1, *S))`` -> its list of level maps (deepest last),
    in eval mode, without gradients (autocast on CUDA)."""

    def __init__(self, encoder: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()

    def __call__(self, volume: ProbeVolume) -> list[torch.Tensor]:
        x = volume.image.float()[None, None].to(self.device)
        amp = torch.autocast("cuda") if self.device.type == "cuda" else _null_context()
        with torch.inference_mode(), amp:
            out = self.encoder(x)
        maps = list(out) if isinstance(out, list | tuple) else [out]
        return [m[0].float() for m in maps]


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def sample_voxel_features(
    maps: Sequence[torch.Tensor], points: torch.Tensor, shape: Sequence[int], chunk: int = _CHUNK
) -> list[torch.Tensor]:
    """Features of each level map at canvas voxels ``points`` ``(N, 3)``: ``[(N, C_l), ...]`` (float32, CPU).

    A map at the canvas size is indexed directly; a coarser map ``(C, *S / f)`` is trilinearly interpolated
    exactly as ``F.interpolate(scale_factor=f, mode="trilinear", align_corners=False)`` would upsample it
    (``grid_sample`` at the voxel centres with border clamping), without building the upsampled map.
    """
    points = torch.as_tensor(points).long()
    out: list[torch.Tensor] = []
    for level in maps:
        if level.ndim != 4:
            raise ValueError(f"feature maps must be (C, X, Y, Z), got shape {tuple(level.shape)}")
        level = level.float()
        if tuple(level.shape[1:]) == tuple(shape):
            idx = points.to(level.device)
            out.append(level[:, idx[:, 0], idx[:, 1], idx[:, 2]].T.cpu())
            continue
        parts = []
        for start in range(0, points.shape[0], chunk):
            p = points[start : start + chunk].to(level.device, torch.float32)
            # normalised coordinates of the full-resolution voxel centres (grid_sample wants x = last axis first)
            norm = torch.stack([(2 * p[:, a] + 1) / float(shape[a]) - 1 for a in (2, 1, 0)], dim=1)
            grid = norm.reshape(1, -1, 1, 1, 3)
            sampled = F.grid_sample(level[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
            parts.append(sampled.reshape(level.shape[0], -1).T.cpu())
        out.append(torch.cat(parts) if parts else torch.zeros(0, level.shape[0]))
    return out


def _probe_input(levels: Sequence[torch.Tensor], voxel_standardize: bool) -> torch.Tensor:
    """Concatenated per-level features ``(N, sum C_l)``, each level standardised per voxel when asked."""
    parts = []
    for f in levels:
        if voxel_standardize and f.shape[1] > 1:
            f = (f - f.mean(dim=1, keepdim=True)) / f.std(dim=1, keepdim=True).clamp_min(1e-6)
        parts.append(f)
    return torch.cat(parts, dim=1)


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


# ------------------------------------------------------------------------------------------------- the data
def _find_file(folder: Path, pattern: re.Pattern[str]) -> Path | None:
    hits = sorted(f for f in folder.rglob("*") if f.is_file() and pattern.search(f.name))
    return hits[0] if hits else None


def _subject_folder(item: Mapping[str, Any]) -> Path:
    return Path(str(item["pd"])).parent


def _read_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for broken files
        raise ProbeInputError(f"{path}: cannot read the {what} ({err})") from err
    data = np.squeeze(data)
    if data.ndim != 3:
        raise ProbeInputError(f"{path}: the {what} must be a 3D volume, got shape {data.shape}")
    return data, np.asarray(img.affine)


@dataclass
class _Subject:
    name: str
    item: dict[str, Any]
    mask: np.ndarray  # bool, on the subject grid
    labels: np.ndarray  # uint8
    score: np.ndarray  # bool: brain voxels with a tissue label and no lesion


def _load_subject_labels(item: Mapping[str, Any]) -> _Subject:
    folder = _subject_folder(item)
    name = str(item.get("subject") or folder.name)
    path = _find_file(folder, _LABELS)
    if path is None:
        raise ProbeInputError(
            f"subject folder {folder} has no tissue label map (*_labels.nii.gz: 0 background, 1 GM, 2 WM, 3 CSF); "
            "the linear probe needs one per subject (seqinv synth writes them)"
        )
    labels, _ = _read_volume(path, "tissue labels")
    labels = np.rint(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() > len(TISSUES):
        found = np.unique(labels)[:10].tolist()
        raise ProbeInputError(f"{path}: tissue labels must be 0 (background), 1 GM, 2 WM, 3 CSF; got {found}")
    pd_shape = tuple(nib.load(str(item["pd"])).shape[:3])
    if labels.shape != pd_shape:
        raise ProbeInputError(f"{path}: shape {labels.shape} differs from the qMRI maps' {pd_shape}")
    if item.get("mask"):
        mask, _ = _read_volume(Path(str(item["mask"])), "brain mask")
        if mask.shape != pd_shape:
            raise ProbeInputError(f"{item['mask']}: shape {mask.shape} differs from the qMRI maps' {pd_shape}")
        mask = mask > 0.5
    else:
        mask = labels > 0
    score = (labels > 0) & mask
    lesion_path = _find_file(folder, _LESION)
    if lesion_path is not None:
        lesion, _ = _read_volume(lesion_path, "lesion mask")
        if lesion.shape == pd_shape:
            score &= ~(lesion > 0.5)  # lesion voxels keep their tissue label but not its intensities
    if not score.any():
        raise ProbeInputError(f"{path}: no brain voxel with a tissue label (1, 2 or 3)")
    return _Subject(name=name, item=dict(item), mask=mask, labels=labels.astype(np.uint8), score=score)


def _bbox(region: np.ndarray) -> tuple[slice, ...]:
    nz = np.nonzero(region)
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)


@dataclass
class _Placement:
    box: tuple[slice, ...]  # crop of the subject grid
    flips: tuple[bool, bool, bool]
    offset: tuple[int, int, int]  # where the crop's first voxel lands on the canvas


def _plan_canvas(
    subjects: Sequence[_Subject], remove_position: bool, max_shift: int, multiple: int, seed: int
) -> tuple[tuple[int, int, int], list[_Placement]]:
    """Canvas shape and each subject's crop, flips and translation.

    Subjects on one grid are cropped to the bounding box of the union of their brain masks (keeping their
    alignment); otherwise each to its own brain's box. The canvas holds the largest crop plus ``2 * max_shift``
    (position removal only) per axis, rounded up to ``multiple``; crops are centred, then shifted.
    """
    same_grid = len({s.mask.shape for s in subjects}) == 1
    if same_grid:
        union = np.zeros(subjects[0].mask.shape, bool)
        for s in subjects:
            union |= s.mask
        boxes = [_bbox(union)] * len(subjects)
    else:
        boxes = [_bbox(s.mask) for s in subjects]
    sizes = np.array([[b.stop - b.start for b in box] for box in boxes])
    margin = 2 * int(max_shift) if remove_position else 0
    canvas = tuple(int(math.ceil((int(n) + margin) / multiple) * multiple) for n in sizes.max(axis=0))
    placements = []
    for index, (box, size) in enumerate(zip(boxes, sizes, strict=True)):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_919 * index + 17)
        if remove_position:
            flips = tuple(bool(v) for v in (torch.rand(3, generator=g) < 0.5).tolist())
            shift = torch.randint(-int(max_shift), int(max_shift) + 1, (3,), generator=g).tolist()
        else:
            flips, shift = (False, False, False), [0, 0, 0]
        offset = tuple(int((c - n) // 2 + d) for c, n, d in zip(canvas, size, shift, strict=True))
        placements.append(_Placement(box=box, flips=flips, offset=offset))  # type: ignore[arg-type]
    return canvas, placements


def _to_canvas(volume: torch.Tensor, placement: _Placement, canvas: Sequence[int]) -> torch.Tensor:
    crop = volume[placement.box]
    dims = [a for a, f in enumerate(placement.flips) if f]
    if dims:
        crop = torch.flip(crop, dims)
    out = torch.zeros(tuple(canvas), dtype=crop.dtype)
    target = tuple(slice(o, o + n) for o, n in zip(placement.offset, crop.shape, strict=True))
    out[target] = crop
    return out


def _generator(seed: int, *keys: int) -> torch.Generator:
    value = int(seed)
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def _balanced_points(labels: torch.Tensor, score: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
    points = []
    for c in range(1, len(TISSUES) + 1):
        where = torch.nonzero(score & (labels == c))
        if where.shape[0] > per_class:
            where = where[torch.randperm(where.shape[0], generator=g)[:per_class]]
        points.append(where)
    return torch.cat(points)


def _sample_points(region: torch.Tensor, count: int | None, g: torch.Generator) -> torch.Tensor:
    where = torch.nonzero(region)
    if count is not None and where.shape[0] > count:
        where = where[torch.sort(torch.randperm(where.shape[0], generator=g)[: int(count)]).values]
    return where


# ------------------------------------------------------------------------------------------------ evaluation
def _split_subjects(
    pool: Sequence[Mapping[str, Any]], fit: int | Sequence[str], test: int | Sequence[str], source: str
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    names = [str(item.get("subject") or _subject_folder(item).name) for item in pool]
    by_name = dict(zip(names, pool, strict=True))
    if not isinstance(fit, int) or not isinstance(test, int):
        chosen = []
        for group in (fit, test):
            if isinstance(group, int):
                raise ProbeInputError("give fit_subjects and test_subjects both as counts or both as name lists")
            missing = [n for n in group if n not in by_name]
            if missing:
                raise ProbeInputError(f"subjects {missing} are not in {source} (found: {names})")
            chosen.append([by_name[n] for n in group])
        if set(fit) & set(test):  # type: ignore[arg-type]
            raise ProbeInputError(f"fit and test subjects overlap: {sorted(set(fit) & set(test))}")  # type: ignore[arg-type]
        return chosen[0], chosen[1]
    n_fit, n_test = int(fit), int(test)
    if n_fit < 1 or n_test < 2:
        raise ProbeInputError(f"need fit_subjects >= 1 and test_subjects >= 2, got {n_fit} and {n_test}")
    if len(pool) < n_fit + n_test:
        if len(pool) < 3:
            raise ProbeInputError(
                f"{source} holds {len(pool)} subject(s); the probe needs at least 3 (1 to fit, 2 to test)"
            )
        n_test = max(2, round(len(pool) * n_test / (n_fit + n_test)))
        n_fit = len(pool) - n_test
        logger.warning(
            "%s holds %d subjects, fewer than the %d + %d asked for: fitting on %d, testing on %d",
            source, len(pool), int(fit), int(test), n_fit, n_test,
        )  # fmt: skip
    return list(pool[:n_fit]), list(pool[n_fit : n_fit + n_test])


def _summaries(confusions: torch.Tensor, draws: int, seed: int) -> dict[str, Any]:
    """Matrix, cross/same means and their bootstrap intervals from per-test-subject confusions ``(K, K, S, C, C)``."""
    k, _, n_subjects = confusions.shape[:3]
    matrix = _balanced_accuracy_batch(confusions.sum(dim=2))  # (K, K)
    off = ~torch.eye(k, dtype=torch.bool)
    diag = torch.eye(k, dtype=torch.bool)

    def cross_same(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cross = m[..., off].nanmean(dim=-1) if k > 1 else torch.full(m.shape[:-2], math.nan, dtype=m.dtype)
        return cross, m[..., diag].nanmean(dim=-1)

    cross, same = cross_same(matrix)
    record: dict[str, Any] = {"matrix": matrix.tolist(), "cross_contrast": float(cross), "same_contrast": float(same)}
    if draws > 0:
        g = _generator(seed, 4242)
        picks = torch.randint(n_subjects, (int(draws), n_subjects), generator=g)
        counts = torch.zeros(int(draws), n_subjects, dtype=torch.float64)
        counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
        boot = _balanced_accuracy_batch(torch.einsum("bs,ijsxy->bijxy", counts, confusions.double()))
        b_cross, b_same = cross_same(boot)

        def interval(values: torch.Tensor) -> list[float]:
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                return [math.nan, math.nan]
            q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
            return [float(q[0]), float(q[1])]

        record["cross_contrast_ci"] = interval(b_cross)
        record["same_contrast_ci"] = interval(b_same)
        cells = torch.quantile(boot.reshape(int(draws), -1), torch.tensor([0.025, 0.975], dtype=boot.dtype), dim=0)
        record["matrix_ci"] = cells.reshape(2, k, k).permute(1, 2, 0).tolist()
    else:
        record["cross_contrast_ci"] = [math.nan, math.nan]
        record["same_contrast_ci"] = [math.nan, math.nan]
    return record


def evaluate_probe(
    extractors: Mapping[str, FeatureFunction],
    fit_items: Sequence[Mapping[str, Any]],
    test_items: Sequence[Mapping[str, Any]],
    contrasts: Mapping[str, SequenceSample] | None = None,
    seed: int = 0,
    remove_position: bool = True,
    max_shift: int = 12,
    canvas_multiple: int = 16,
    normalize: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "zscore",
    noise: float = 0.01,
    fit_voxels_per_class: int = 1500,
    test_voxels: int | None = None,
    dense_voxels: int = 4000,
    voxel_standardize: bool = False,
    l2: float = 1.0e-3,
    max_iter: int = 200,
    bootstrap: int = 200,
    retrieval: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe, dense consistency and retrieval of every feature function on the same volumes and voxels.

    Args:
        extractors: name -> feature function (:class:`EncoderFeatures`, :class:`PositionFeatures`, ... or any
            ``ProbeVolume -> [maps]`` callable).
        fit_items, test_items: qMRI datalist items (``pd``, ``r1``, ``r2s``, ``mt``, optional ``r2``, ``mask``;
            see :func:`~custom.data.qmri_datalist.find_qmri_subjects`) whose folders hold ``*_labels`` maps.
        contrasts: name -> protocol (default :func:`probe_contrasts` of ``seed``); at least 2.
        seed: seeds the noise, the flips/shifts, the voxel samples and the bootstrap.
        remove_position, max_shift: random flips and translations (see the module docstring).
        canvas_multiple: the canvas is a multiple of this per axis (16 suits the 5-level encoder).
        normalize: see :func:`normalize_image`. noise: Rician sigma relative to the image's 99.5th brain
            percentile (before normalisation).
        fit_voxels_per_class: GM / WM / CSF voxels sampled per fit subject (all when fewer).
        test_voxels: scored voxels per test subject (``None``: every labelled brain voxel; lesions excluded).
        dense_voxels: canvas locations (inside the union of the test brains) for dense consistency.
        voxel_standardize: standardise each level's feature vector per voxel before concatenation.
        l2, max_iter: :class:`LogisticProbe` settings. bootstrap: subject-bootstrap draws (0: none).
        retrieval: also compute cross-sequence retrieval of the test subjects' pooled deepest maps. With
            ``remove_position`` it runs on the untransformed brains (an extra pass of the test subjects on an
            aligned canvas): one subject's contrasts share its flips and shift, which would identify it.
        progress: tqdm bar over subjects.

    Returns:
        ``{"contrasts", "fit_subjects", "test_subjects", "canvas", "placements", "results": {name: {...}}}``.
    """
    if len(extractors) == 0:
        raise ValueError("evaluate_probe needs at least one feature function")
    contrasts = dict(contrasts) if contrasts is not None else probe_contrasts(seed)
    if len(contrasts) < 2:
        raise ValueError(f"the probe needs at least 2 contrasts (train x test), got {list(contrasts)}")
    if len(test_items) < 2 or len(fit_items) < 1:
        raise ProbeInputError(f"need >= 1 fit and >= 2 test subjects, got {len(fit_items)} and {len(test_items)}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    names = list(contrasts)
    k = len(names)
    n_classes = len(TISSUES)

    subjects = [_load_subject_labels(item) for item in [*fit_items, *test_items]]
    n_fit = len(fit_items)
    seen: set[str] = set()
    for s in subjects:
        if s.name in seen:
            raise ProbeInputError(f"subject {s.name} is listed twice (fit and test subjects must differ)")
        seen.add(s.name)
    canvas, placements = _plan_canvas(subjects, remove_position, max_shift, int(canvas_multiple), seed)
    logger.info("probe canvas %s (%s)", canvas, "random flips and shifts" if remove_position else "aligned")

    def canvas_of(array: np.ndarray, index: int) -> torch.Tensor:
        return _to_canvas(torch.from_numpy(np.ascontiguousarray(array)), placements[index], canvas)

    # fixed voxel sets, shared by every feature function
    test_masks = [canvas_of(s.mask, n_fit + i) for i, s in enumerate(subjects[n_fit:])]
    union = torch.zeros(canvas, dtype=torch.bool)
    for m in test_masks:
        union |= m
    dense_points = _sample_points(union, int(dense_voxels), _generator(seed, 999))
    dense_inside = torch.stack([m[tuple(dense_points.T)] for m in test_masks])  # (S_test, P)
    if retrieval and remove_position:
        aligned_canvas, aligned_placements = _plan_canvas(subjects, False, 0, int(canvas_multiple), seed)

    def features_at(levels: Sequence[torch.Tensor], where: torch.Tensor) -> torch.Tensor:
        return _probe_input(sample_voxel_features(levels, where, canvas), voxel_standardize)

    fit_x: dict[str, dict[str, list[torch.Tensor]]] = {e: {c: [] for c in names} for e in extractors}
    fit_y: list[torch.Tensor] = []
    probes: dict[str, dict[str, LogisticProbe]] = {}
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_test = len(test_items)
    confusions = {e: torch.zeros(k, k, n_test, n_classes, n_classes, dtype=torch.long) for e in extractors}
    dense: dict[str, list[torch.Tensor]] = {}
    pooled: dict[str, torch.Tensor] = {}
    level_counts: dict[str, int] = {}
    loader = LoadQMRId()
    start = time.perf_counter()
    bar = tqdm(subjects, desc="probe", unit="subject", disable=not progress, leave=False)
    for index, subject in enumerate(bar):
        is_fit = index < n_fit
        bar.set_postfix_str(f"{subject.name} ({'fit' if is_fit else 'test'})")
        if not is_fit and not probes:  # all fit subjects seen: fit one probe per feature function and contrast
            y = torch.cat(fit_y)
            for e in extractors:
                probes[e] = {}
                for c in names:
                    probes[e][c] = LogisticProbe(l2=l2, max_iter=max_iter).fit(torch.cat(fit_x[e][c]), y, n_classes)
                fit_x[e] = {}  # free the memory
                # every train contrast's probe in one matrix: scores (N, K * classes) = features @ W + b
                pairs = [probes[e][c].folded() for c in names]
                folded[e] = (torch.cat([w for w, _ in pairs], dim=1), torch.cat([b for _, b in pairs]))
            logger.info("fitted %d probes on %d voxels of %d subjects", len(extractors) * k, y.numel(), n_fit)
        data = loader(subject.item)
        maps = {key: _plain(data[key]) for key in ("pd", "r1", "r2s", "mt") if data.get(key) is not None}
        r2 = _plain(data["r2"]) if data.get("r2") is not None else None
        mask_grid = torch.from_numpy(subject.mask)
        labels_c = canvas_of(subject.labels, index)
        mask_c = canvas_of(subject.mask, index)
        score_c = canvas_of(subject.score, index)
        g_points = _generator(seed, 100 + index)
        if is_fit:
            points = _balanced_points(labels_c, score_c, int(fit_voxels_per_class), g_points)
            fit_y.append(labels_c[tuple(points.T)].long() - 1)
        else:
            points = _sample_points(score_c, test_voxels, g_points)
            truth = labels_c[tuple(points.T)].long() - 1
        for j, (cname, sample) in enumerate(contrasts.items()):
            image = simulate(sample, maps["pd"], maps["r1"], maps["r2s"], maps.get("mt"), r2=r2)
            scale = float(robust_max(image, mask_grid, NOISE_PERCENTILE))
            if not math.isfinite(scale) or scale <= 0:
                raise ProbeInputError(f"subject {subject.name}: {cname} {sample} gives no signal in the brain")
            image = image / scale
            if noise > 0:
                image = rician_noise(image, float(noise), generator=_generator(seed, index, j))
            image = normalize_image(image, mask_grid, normalize).float()
            volume = ProbeVolume(subject.name, cname, canvas_of(image.numpy(), index), mask_c, labels_c)
            aligned = None
            if not is_fit and retrieval and remove_position:  # retrieval sees the untransformed brain
                place = aligned_placements[index]
                aligned = ProbeVolume(
                    subject.name,
                    cname,
                    _to_canvas(image, place, aligned_canvas),
                    _to_canvas(mask_grid, place, aligned_canvas),
                    _to_canvas(torch.from_numpy(subject.labels), place, aligned_canvas),
                )
            for e, extract in extractors.items():
                levels = [m.detach() for m in extract(volume)]
                if not levels:
                    raise ValueError(f"feature function {e!r} returned no feature map")
                level_counts[e] = len(levels)
                if is_fit:
                    fit_x[e][cname].append(features_at(levels, points))
                    continue
                s = index - n_fit
                weight, bias = folded[e]
                for lo in range(0, points.shape[0], _CHUNK):
                    scores = features_at(levels, points[lo : lo + _CHUNK]).to(weight.device) @ weight + bias
                    predicted = scores.reshape(scores.shape[0], k, n_classes).argmax(dim=2).cpu()
                    y_true = truth[lo : lo + _CHUNK]
                    for i in range(k):
                        confusions[e][i, j, s] += confusion_matrix(y_true, predicted[:, i], n_classes)
                per_level = sample_voxel_features(levels, dense_points, canvas)
                if e not in dense:
                    dense[e] = [torch.zeros(n_test, k, dense_points.shape[0], f.shape[1]) for f in per_level]
                for level, f in enumerate(per_level):
                    dense[e][level][s, j] = f
                if retrieval:
                    deepest = (extract(aligned)[-1] if aligned is not None else levels[-1]).detach().float()
                    if e not in pooled:
                        pooled[e] = torch.zeros(n_test, k, deepest.shape[0])
                    pooled[e][s, j] = deepest.flatten(1).mean(dim=1).cpu()
    seconds = time.perf_counter() - start

    results: dict[str, Any] = {}
    for e in extractors:
        record = _summaries(confusions[e], int(bootstrap), seed)
        per_level = [dense_consistency(f, dense_inside) for f in dense[e]]
        record["dense"] = per_level
        record["dense_deepest"] = per_level[-1]
        record["dense_mean"] = {key: float(np.mean([d[key] for d in per_level])) for key in per_level[-1]}
        if retrieval:
            record["retrieval"] = cross_sequence_retrieval(pooled[e], names).to_dict()
        else:
            record["retrieval"] = {"top1": math.nan, "chance_top1": 1.0 / n_test}
        record["levels"] = level_counts[e]
        record["scored_voxels"] = int(confusions[e][0, 0].sum())
        results[e] = record
    return {
        "contrasts": {c: s.to_dict() for c, s in contrasts.items()},
        "fit_subjects": [s.name for s in subjects[:n_fit]],
        "test_subjects": [s.name for s in subjects[n_fit:]],
        "canvas": list(canvas),
        "placements": {
            s.name: {"flips": list(p.flips), "offset": list(p.offset), "box": [[b.start, b.stop] for b in p.box]}
            for s, p in zip(subjects, placements, strict=True)
        },
        "fit_voxels": int(sum(y.numel() for y in fit_y)),
        "dense_voxels": int(dense_points.shape[0]),
        "seconds": round(seconds, 2),
        "results": results,
    }


def _plain(x: Any) -> torch.Tensor:
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.float()[0] if t.ndim == 4 else t.float()


# ----------------------------------------------------------------------------------------------- the report
def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ci(value: float, ci: Sequence[float]) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def format_probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`run_probe` rows."""
    lines = [
        "| encoder | cross-contrast BA [95% CI] | same-contrast BA [95% CI] | dense deepest: same / diff subject "
        "| dense deepest: difference | dense all levels: same / diff subject | dense all levels: difference "
        "| retrieval top-1 (chance) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {_fmt_ci(r['cross_contrast'], r['cross_contrast_ci'])} "
            f"| {_fmt_ci(r['same_contrast'], r['same_contrast_ci'])} "
            f"| {_fmt(r['dense_same_deepest'])} / {_fmt(r['dense_different_deepest'])} "
            f"| {_fmt(r['dense_difference_deepest'], 4)} "
            f"| {_fmt(r['dense_same_mean'])} / {_fmt(r['dense_different_mean'])} "
            f"| {_fmt(r['dense_difference_mean'], 4)} "
            f"| {_fmt(r['retrieval_top1'])} ({_fmt(r['retrieval_chance'])}) |"
        )
    return "\n".join(lines)


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "encoder": name,
                "cross_contrast": r["cross_contrast"],
                "cross_contrast_ci": r["cross_contrast_ci"],
                "same_contrast": r["same_contrast"],
                "same_contrast_ci": r["same_contrast_ci"],
                "dense_same_deepest": r["dense_deepest"]["same_subject"],
                "dense_different_deepest": r["dense_deepest"]["different_subject"],
                "dense_difference_deepest": r["dense_deepest"]["difference"],
                "dense_same_mean": r["dense_mean"]["same_subject"],
                "dense_different_mean": r["dense_mean"]["different_subject"],
                "dense_difference_mean": r["dense_mean"]["difference"],
                "retrieval_top1": r["retrieval"]["top1"],
                "retrieval_chance": r["retrieval"]["chance_top1"],
            }
        )
    return rows


def _write_heatmap(path: Path, results: Mapping[str, Any], contrasts: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 4)
    rows = int(math.ceil(n / cols))
    k = len(contrasts)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.9 * cols + 1.0, 4.1 * rows + 0.4), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (name, r) in zip(axes.flat, results.items(), strict=False):
        matrix = np.asarray(r["matrix"], dtype=float)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(k):
            for j in range(k):
                if math.isfinite(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_title(f"{name}\ncross {_fmt(r['cross_contrast'])}, same {_fmt(r['same_contrast'])}", fontsize=8)
        ax.set_xticks(range(k), contrasts, rotation=90, fontsize=6)
        ax.set_yticks(range(k), contrasts, fontsize=6)
        ax.set_xlabel("test contrast", fontsize=7)
        ax.set_ylabel("train contrast", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="balanced accuracy (chance 1/3)")
    fig.suptitle("GM/WM/CSF linear probe: train contrast (rows) x test contrast (columns)", fontsize=9)
    atomic_write(lambda tmp: fig.savefig(tmp, format="png", dpi=120), path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry point
EncoderSpec = str | Path | nn.Module | FeatureFunction | None


def _build_encoder(name: str, spec: str | Path | None, features: Sequence[int], seed: int) -> tuple[nn.Module, dict]:
    if spec is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            encoder = Encoder(features=tuple(int(f) for f in features))
        return encoder, {"weights": None, "features": list(encoder.features), "init": f"random (seed {seed})"}
    from custom.weights import read_weights  # the bundle-aware reader (file, bundle folder or zip)

    try:
        state = read_weights(spec)
        widths = encoder_features_of(state)
        encoder = Encoder(features=widths)
        copied = load_encoder_weights(encoder, spec)
    except (FileNotFoundError, ValueError) as err:
        raise ProbeInputError(f"encoder {name!r}: cannot use weights {spec}: {err}") from err
    return encoder, {"weights": str(spec), "features": list(widths), "copied_tensors": copied}


def run_probe(
    encoders: Mapping[str, EncoderSpec] | None,
    dataset_dir: str | Path,
    fit_subjects: int | Sequence[str] = 6,
    test_subjects: int | Sequence[str] = 6,
    seed: int = 0,
    features: Sequence[int] = PAPER_ENCODER_FEATURES,
    output_dir: str | Path | None = None,
    baselines: Sequence[str] = BASELINES,
    remove_position: bool = True,
    max_shift: int = 12,
    normalize: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "zscore",
    noise: float = 0.01,
    preset: str = "clinical",
    ixi_site: str = "Guys",
    fit_voxels_per_class: int = 1500,
    test_voxels: int | None = None,
    dense_voxels: int = 4000,
    voxel_standardize: bool = False,
    l2: float = 1.0e-3,
    bootstrap: int = 200,
    device: str | torch.device | None = None,
    progress: bool = True,
    print_table: bool = True,
) -> list[dict[str, Any]]:
    """Cross-contrast linear probe, dense consistency and retrieval of encoders against baselines (module docstring).

    Args:
        encoders: name -> weights (a ``model.pt``, a checkpoint, a bundle folder or zip; widths are read from
            the weights), ``None`` (a random-init encoder of ``features``), an image encoder module (returning
            its list of level maps) or a feature function ``ProbeVolume -> [maps]``. ``None`` or ``{}``:
            baselines only.
        dataset_dir: qMRI subject folders with ``*_labels`` tissue maps (``seqinv synth`` writes them).
        fit_subjects, test_subjects: counts (the first ``fit_subjects`` subject folders in sorted order fit the
            probe, the next ``test_subjects`` test it; with fewer subjects the pool is split in the same ratio,
            at least 1 + 2) or lists of subject names.
        seed: seeds the panel, noise, flips/shifts, voxel samples, random encoder and bootstrap.
        features: widths of the ``random`` baseline when no encoder weights are given (else the first weights').
        output_dir: where ``probe.json``, ``probe.md`` and ``probe.png`` are written (atomically); ``None``:
            nothing written.
        baselines: any of ``position``, ``intensity``, ``random`` (added after the encoders).
        remove_position, max_shift, normalize, noise, fit_voxels_per_class, test_voxels, dense_voxels,
            voxel_standardize, l2, bootstrap: see :func:`evaluate_probe`.
        preset, ixi_site: the contrast panel (:func:`probe_contrasts`).
        device: where encoders run (default: CUDA when available).
        progress: tqdm bar. print_table: print the markdown table.

    Returns:
        One row per encoder (encoders first, then baselines): ``encoder``, ``cross_contrast`` (+ ``_ci``),
        ``same_contrast`` (+ ``_ci``), ``dense_{same,different,difference}_{deepest,mean}``, ``retrieval_top1``,
        ``retrieval_chance``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {list(BASELINES)}")
    encoders = dict(encoders or {})
    clash = [name for name in encoders if name in baselines]
    if clash:
        raise ValueError(f"encoder name(s) {clash} clash with the baselines {list(baselines)}; rename them")

    root = Path(dataset_dir)
    if not root.is_dir():
        raise ProbeInputError(f"probe dataset folder {root} does not exist")
    pool = find_qmri_subjects(root)
    fit_items, test_items = _split_subjects(pool, fit_subjects, test_subjects, str(root))

    extractors: dict[str, FeatureFunction] = {}
    info: dict[str, dict[str, Any]] = {}
    random_widths: Sequence[int] = features
    for name, spec in encoders.items():
        if isinstance(spec, nn.Module):
            extractors[name] = EncoderFeatures(spec, device)
            info[name] = {"module": type(spec).__name__}
        elif callable(spec):
            extractors[name] = spec
            info[name] = {"feature_function": getattr(spec, "__name__", type(spec).__name__)}
        else:
            encoder, info[name] = _build_encoder(name, spec, features, seed)
            if spec is not None and random_widths is features:
                random_widths = info[name]["features"]
            extractors[name] = EncoderFeatures(encoder, device)
    for name in baselines:
        if name == "position":
            extractors[name] = PositionFeatures()
            info[name] = {"baseline": "canvas coordinates, squares and products"}
        elif name == "intensity":
            extractors[name] = IntensityFeatures()
            info[name] = {"baseline": "normalised intensity and 3x3x3 mean"}
        else:
            encoder, info[name] = _build_encoder(name, None, random_widths, seed)
            extractors[name] = EncoderFeatures(encoder, device)
    if not extractors:
        raise ValueError("nothing to evaluate: no encoder and no baseline")

    contrasts = probe_contrasts(seed, preset=preset, ixi_site=ixi_site)
    logger.info(
        "linear probe on %s: %d fit / %d test subjects, %d contrasts, %s",
        root, len(fit_items), len(test_items), len(contrasts), ", ".join(extractors),
    )  # fmt: skip
    start = time.perf_counter()
    report = evaluate_probe(
        extractors, fit_items, test_items, contrasts, seed=seed, remove_position=remove_position, max_shift=max_shift,
        normalize=normalize, noise=noise, fit_voxels_per_class=fit_voxels_per_class, test_voxels=test_voxels,
        dense_voxels=dense_voxels, voxel_standardize=voxel_standardize, l2=l2, bootstrap=bootstrap, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    rows = _rows(report["results"])
    table = format_probe_table(rows)
    position = f"random flips and shifts up to {max_shift} voxels" if remove_position else "aligned (no flips/shifts)"
    header = (
        f"Cross-contrast linear probe (GM/WM/CSF, balanced accuracy, chance 0.333) on {root}: fit on "
        f"{len(fit_items)} subjects, tested on {len(test_items)} held-out subjects; contrasts "
        f"{', '.join(contrasts)}; {position}; normalisation {normalize if isinstance(normalize, str) else 'custom'}."
    )
    if print_table:
        print(header)
        print(table)
    record = {
        "dataset_dir": str(root),
        "seed": int(seed),
        "remove_position": bool(remove_position),
        "max_shift": int(max_shift),
        "normalize": normalize if isinstance(normalize, str) else "custom",
        "noise": float(noise),
        "preset": preset,
        "ixi_site": ixi_site,
        "fit_voxels_per_class": int(fit_voxels_per_class),
        "test_voxels": test_voxels,
        "voxel_standardize": bool(voxel_standardize),
        "l2": float(l2),
        "bootstrap": int(bootstrap),
        "device": str(device),
        "seconds": round(seconds, 2),
        "encoders": info,
        **report,
        "rows": rows,
        "table": table,
    }
    if output_dir is not None:
        out = Path(output_dir)
        atomic_write_text(json.dumps(_clean(record), indent=2) + "\n", out / "probe.json")
        atomic_write_text(f"{header}\n\n{table}\n", out / "probe.md")
        _write_heatmap(out / "probe.png", report["results"], list(contrasts))
        logger.info("wrote %s, %s and %s", out / "probe.json", out / "probe.md", out / "probe.png")
        if print_table:
            print(f"wrote {out / 'probe.json'}, {out / 'probe.md'}, {out / 'probe.png'}")
    return rows


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value

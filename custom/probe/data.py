"""The probe's data: the contrast panel and image normalisation, subjects' tissue labels, the evaluation canvas
(crops, random flips and shifts that remove position cues) and the seeded voxel samples."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from custom.data.synthetic import SITE_PROTOCOLS
from custom.errors import InputError
from custom.fields import region_percentile as robust_max
from custom.intensity import histogram_equalise, percentile_rescale
from custom.sequences import SequenceSample, as_generator, sample_sequence

__all__ = [
    "TISSUES",
    "NOISE_PERCENTILE",
    "ProbeInputError",
    "probe_contrasts",
    "normalize_image",
    "LabelledSubject",
    "load_subject_labels",
    "Placement",
    "plan_canvas",
    "to_canvas",
    "seeded_generator",
    "balanced_points",
    "sample_points",
    "split_subjects",
    "plain_volume",
]

logger = logging.getLogger(__name__)

TISSUES: tuple[str, ...] = ("GM", "WM", "CSF")
"""Probe classes: label values 1, 2, 3 of the ``*_labels`` maps (0 is background, not scored)."""
SITE_ALIASES = {"GST": "Guys", "GUYS": "Guys", "HH": "HH", "IOP": "IOP"}
NOISE_PERCENTILE = 99.5
_LABELS = re.compile(r"_labels\.nii(\.gz)?$", re.IGNORECASE)
_LESION = re.compile(r"_lesion\.nii(\.gz)?$", re.IGNORECASE)


class ProbeInputError(InputError):
    """Unusable probe input (missing labels, unreadable weights, too few subjects); the message names the file."""


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
class LabelledSubject:
    name: str
    item: dict[str, Any]
    mask: np.ndarray  # bool, on the subject grid
    labels: np.ndarray  # uint8
    score: np.ndarray  # bool: brain voxels with a tissue label and no lesion


def load_subject_labels(item: Mapping[str, Any]) -> LabelledSubject:
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
    return LabelledSubject(name=name, item=dict(item), mask=mask, labels=labels.astype(np.uint8), score=score)


def _bbox(region: np.ndarray) -> tuple[slice, ...]:
    nz = np.nonzero(region)
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)


@dataclass
class Placement:
    box: tuple[slice, ...]  # crop of the subject grid
    flips: tuple[bool, bool, bool]
    offset: tuple[int, int, int]  # where the crop's first voxel lands on the canvas


def plan_canvas(
    subjects: Sequence[LabelledSubject], remove_position: bool, max_shift: int, multiple: int, seed: int
) -> tuple[tuple[int, int, int], list[Placement]]:
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
        placements.append(Placement(box=box, flips=flips, offset=offset))  # type: ignore[arg-type]
    return canvas, placements


def to_canvas(volume: torch.Tensor, placement: Placement, canvas: Sequence[int]) -> torch.Tensor:
    crop = volume[placement.box]
    dims = [a for a, f in enumerate(placement.flips) if f]
    if dims:
        crop = torch.flip(crop, dims)
    out = torch.zeros(tuple(canvas), dtype=crop.dtype)
    target = tuple(slice(o, o + n) for o, n in zip(placement.offset, crop.shape, strict=True))
    out[target] = crop
    return out


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    value = int(seed)
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def balanced_points(labels: torch.Tensor, score: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
    points = []
    for c in range(1, len(TISSUES) + 1):
        where = torch.nonzero(score & (labels == c))
        if where.shape[0] > per_class:
            where = where[torch.randperm(where.shape[0], generator=g)[:per_class]]
        points.append(where)
    return torch.cat(points)


def sample_points(region: torch.Tensor, count: int | None, g: torch.Generator) -> torch.Tensor:
    where = torch.nonzero(region)
    if count is not None and where.shape[0] > count:
        where = where[torch.sort(torch.randperm(where.shape[0], generator=g)[: int(count)]).values]
    return where


def split_subjects(
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


def plain_volume(x: Any) -> torch.Tensor:
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.float()[0] if t.ndim == 4 else t.float()

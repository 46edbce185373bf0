"""Datalists of the IXI dataset (T1 / T2 / PD brain MRI from three London sites), MONAI Decathlon-style.

Layout (as downloaded from brain-development.org, one folder per contrast)::

    dataset_dir/IXI-T1/IXI002-Guys-0828-T1.nii.gz
    dataset_dir/IXI-T2/IXI002-Guys-0828-T2.nii.gz
    dataset_dir/IXI-PD/IXI002-Guys-0828-PD.nii.gz
    dataset_dir/labels/IXI002-Guys-0828_labels.nii.gz      (not part of IXI: bring your own)

``dataset_dir`` may also be the folder holding the images itself. The site comes from the file name (Guys ->
GST, HH, IOP). IXI ships no tissue labels: users bring co-registered ones (SPM, FreeSurfer, ...) in a folder of
their own, named by a pattern with ``{subject}`` (``IXI002-Guys-0828``), ``{id}`` (``IXI002``) and ``{contrast}``
(``T1``) placeholders.

Splits follow the paper (paper/NOTES.md): training, validation and in-domain test subjects come from GST
(226 / 31 / 65 of its 322 subjects); HH and IOP are out-of-domain test sites. The split is made per subject from
the sorted GST subject ids of every contrast folder present, so the T1, T2 and PD datalists of one folder agree
(a subject is in the same split for every contrast). Training subsets for label-efficiency experiments (1 %,
10 %, 100 %) are prefixes of one seeded permutation of the training subjects, hence nested.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from custom.data.qmri_datalist import DEFAULT_SYNTHETIC_ROOT
from custom.errors import InputError
from custom.io import atomic_write_text

__all__ = [
    "CONTRASTS",
    "DEFAULT_LABEL_PATTERN",
    "FRACTIONS",
    "IXIDatasetError",
    "PAPER_SPLIT",
    "SITES",
    "IN_DOMAIN_SITE",
    "ixi_datalist",
    "parse_ixi_name",
    "scan_ixi",
    "split_gst_subjects",
    "split_sizes",
    "subset_size",
    "training_subset",
    "write_datalist",
]

logger = logging.getLogger(__name__)

SITES: dict[str, str] = {"Guys": "GST", "HH": "HH", "IOP": "IOP"}
"""Site name in IXI file names -> site code used in datalists and result tables."""

CONTRASTS: tuple[str, ...] = ("T1", "T2", "PD")
"""IXI contrasts with a datalist (folder ``IXI-{contrast}``, file suffix ``-{contrast}``)."""

IN_DOMAIN_SITE = "GST"
"""The site that provides training, validation and in-domain test subjects; the others are test only."""

PAPER_SPLIT: tuple[int, int, int] = (226, 31, 65)
"""Training / validation / test GST subjects in the paper (322 in all)."""

FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
"""Training-set fractions of the paper's label-efficiency experiments."""

DEFAULT_LABEL_PATTERN = "{subject}_labels.nii.gz"
"""Label file name in ``labels_dir`` (the synthetic data's layout)."""

_NAME = re.compile(
    r"^(?P<id>IXI(?P<number>\d+))-(?P<site>[A-Za-z]+)-(?P<scan>\d+)-(?P<contrast>[A-Za-z0-9]+(?:-\d+)?)\.nii(?:\.gz)?$"
)
_PLACEHOLDERS = ("subject", "id", "contrast")


class IXIDatasetError(InputError):
    """The IXI folder, an image or a label is missing or misnamed (the message names the path and what was expected)."""


def parse_ixi_name(filename: str | Path) -> tuple[str, str, str, str] | None:
    """``(subject, number, site, contrast)`` of an IXI file name, or ``None`` if it is not one.

    ``IXI002-Guys-0828-T1.nii.gz`` -> ``("IXI002-Guys-0828", "002", "GST", "T1")``: ``number`` is the IXI
    subject number as written (zero padding kept), ``site`` the code of :data:`SITES`. Names of an unknown site
    or another pattern give ``None``. Other IXI modalities parse too (``MRA``, ``DTI-00``); callers filter.
    """
    match = _NAME.match(Path(filename).name)
    if match is None or match["site"] not in SITES:
        return None
    subject = f"{match['id']}-{match['site']}-{match['scan']}"
    return subject, match["number"], SITES[match["site"]], match["contrast"]


def _check_contrast(contrast: str) -> str:
    if contrast not in CONTRASTS:
        raise IXIDatasetError(f"unknown IXI contrast {contrast!r}: expected one of {', '.join(CONTRASTS)}")
    return contrast


def _image_dir(root: Path, contrast: str) -> Path:
    """``root/IXI-{contrast}`` when it exists, else ``root`` itself."""
    sub = root / f"IXI-{contrast}"
    return sub if sub.is_dir() else root


def _label_path(labels_dir: Path, label_pattern: str, subject: str, contrast: str) -> Path:
    try:
        name = label_pattern.format(subject=subject, id=subject.split("-")[0], contrast=contrast)
    except (KeyError, IndexError, ValueError) as err:
        raise IXIDatasetError(
            f"label_pattern {label_pattern!r} is not a valid pattern ({err!r}): use the placeholders "
            f"{', '.join('{' + p + '}' for p in _PLACEHOLDERS)}, e.g. '{{subject}}-{{contrast}}_seg.nii.gz'"
        ) from None
    return labels_dir / name


def _expected(root: Path, contrast: str) -> str:
    return f"files named like IXI002-Guys-0828-{contrast}.nii.gz in {root / f'IXI-{contrast}'} or in {root} itself"


def scan_ixi(
    root: str | Path,
    contrast: str,
    labels_dir: str | Path | None = None,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
) -> list[dict[str, str]]:
    """One item per subject with an image of ``contrast``, sorted by subject.

    Items are ``{"image", "label", "subject", "site", "contrast"}``; ``"label"`` is absent when
    ``labels_dir / label_pattern.format(...)`` does not exist. Files that are not IXI names (or of an unknown
    site) are skipped and logged; files of other contrasts are ignored.

    Args:
        root: the IXI folder (holding ``IXI-{contrast}/``) or the folder holding the images.
        contrast: ``"T1"``, ``"T2"`` or ``"PD"``.
        labels_dir: folder of label files; default ``root/labels``.
        label_pattern: label file name with ``{subject}``, ``{id}`` and ``{contrast}`` placeholders.

    Raises:
        IXIDatasetError: the folder is missing, holds no image of ``contrast``, or holds two of one subject.
    """
    root = Path(root)
    _check_contrast(contrast)
    if not root.is_dir():
        raise IXIDatasetError(f"IXI dataset folder {root} does not exist (expected {_expected(root, contrast)})")
    image_dir = _image_dir(root, contrast)
    labels = Path(labels_dir) if labels_dir is not None else root / "labels"
    items: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    for path in sorted(p for p in image_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        parsed = parse_ixi_name(path.name)
        if parsed is None:
            skipped.append(path.name)
            continue
        subject, _, site, found = parsed
        if found != contrast:
            continue
        if subject in items:
            raise IXIDatasetError(
                f"two {contrast} images of subject {subject} in {image_dir}: {Path(items[subject]['image']).name} "
                f"and {path.name}; keep one"
            )
        item = {"image": str(path), "subject": subject, "site": site, "contrast": contrast}
        label = _label_path(labels, label_pattern, subject, contrast)
        if label.is_file():
            item["label"] = str(label)
        items[subject] = item
    if skipped:
        logger.warning(
            f"skipped {len(skipped)} file(s) in {image_dir} that are not IXI images of a known site "
            f"({', '.join(SITES)}): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
        )
    if not items:
        raise IXIDatasetError(f"no IXI {contrast} images in {image_dir}: expected {_expected(root, contrast)}")
    return [items[s] for s in sorted(items)]


def _gst_subjects(root: Path) -> list[str]:
    """Sorted GST subject ids with an image of any contrast under ``root`` (the basis of the split)."""
    found: set[str] = set()
    folders = {_image_dir(root, c) for c in CONTRASTS}
    for folder in folders:
        for path in folder.iterdir():
            parsed = parse_ixi_name(path.name)
            if parsed is not None and parsed[2] == IN_DOMAIN_SITE and parsed[3] in CONTRASTS:
                found.add(parsed[0])
    return sorted(found)


def split_sizes(n: int) -> tuple[int, int, int]:
    """Numbers of training / validation / test subjects for ``n`` GST subjects.

    * ``n >= 322``: the paper's 226 / 31 / 65; subjects beyond 322 go to the test set (training stays <= 226).
    * ``3 <= n < 322``: proportional to 226 : 31 : 65 (rounded half up), at least one in each split.
    * ``n == 2``: one training and one validation subject (no in-domain test subject: a training run still has
      validation data; HH and IOP remain test subjects).
    * ``n == 1``: training only (a warning is logged); ``n == 0``: nothing.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = sum(PAPER_SPLIT)
    if n >= total:
        return PAPER_SPLIT[0], PAPER_SPLIT[1], n - PAPER_SPLIT[0] - PAPER_SPLIT[1]
    if n >= 3:
        n_val = max(1, math.floor(n * PAPER_SPLIT[1] / total + 0.5))
        n_test = max(1, math.floor(n * PAPER_SPLIT[2] / total + 0.5))
        return n - n_val - n_test, n_val, n_test
    if n == 2:
        return 1, 1, 0
    if n == 1:
        logger.warning("only one GST subject: it is used for training; there is no validation or in-domain test data")
        return 1, 0, 0
    return 0, 0, 0


def split_gst_subjects(subjects: Iterable[str], seed: int = 0) -> dict[str, list[str]]:
    """Split GST subject ids into ``{"training", "validation", "test"}`` (sizes of :func:`split_sizes`).

    The ids are sorted first and permuted with ``torch.randperm`` seeded by ``seed``, so the split depends only on
    the set of ids and the seed. ``"training"`` keeps the order of that permutation (see :func:`training_subset`);
    validation and test are sorted.
    """
    ids = sorted(set(subjects))
    n_train, n_val, n_test = split_sizes(len(ids))
    generator = torch.Generator().manual_seed(int(seed))
    order = [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
    return {
        "training": order[:n_train],
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def subset_size(fraction: float, n: int) -> int:
    """``max(1, ceil(fraction * n))`` training subjects (0 when ``n == 0``), robust to float rounding."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def _check_fraction(fraction: float) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise IXIDatasetError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < value <= 1.0:
        raise IXIDatasetError(f"fraction must be in (0, 1] (e.g. 0.01, 0.1 or 1.0), got {fraction!r}")
    return value


def _check_subjects(subjects: int, available: int) -> int:
    try:
        value = int(subjects)
    except (TypeError, ValueError):
        raise IXIDatasetError(f"train_subjects must be a whole number >= 1, got {subjects!r}") from None
    if value != float(subjects) or value < 1:
        raise IXIDatasetError(f"train_subjects must be a whole number >= 1, got {subjects!r}")
    if value > available:
        raise IXIDatasetError(f"train_subjects {value} is more than the {available} training subject(s) available")
    return value


def training_subset(training: list[str], fraction: float, subjects: int | None = None) -> list[str]:
    """The first :func:`subset_size` subjects of the (already permuted) training order: nested across fractions.

    ``subjects`` (a number of subjects, e.g. 1) replaces ``fraction`` when given: the first ``subjects`` of the same
    order, so nested with the fractions too; more than there are is an error.
    """
    if subjects is not None:
        return training[: _check_subjects(subjects, len(training))]
    return training[: subset_size(_check_fraction(fraction), len(training))]


def write_datalist(datalist: Mapping[str, object], path: str | Path) -> Path:
    """Write ``datalist`` as indented JSON, atomically; returns the path."""
    return atomic_write_text(json.dumps(datalist, indent=2) + "\n", path)


def _ensure_synthetic(root: Path, seed: int) -> None:
    from custom.data.synthetic import generate_dataset

    subjects = 24
    print(
        f"no IXI data in {root}: creating the embedded synthetic data set there ({subjects} subjects from the "
        f"MNI152 template, seed {seed}); pass --dataset_dir to use your own data"
    )
    generate_dataset(root.parent, subjects=subjects, seed=seed, resolution=2.0, preview=False, progress=True)


def _cap_per_site(items: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The first ``limit`` items of each site, in their order."""
    if limit < 1:
        raise IXIDatasetError(f"test_subjects_per_site must be >= 1 (or null for all), got {limit}")
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item["site"]] = seen.get(item["site"], 0) + 1
        if seen[item["site"]] <= limit:
            kept.append(item)
    return kept


def ixi_datalist(
    dataset_dir: str | Path,
    contrast: str = "T1",
    fraction: float = 1.0,
    labels_dir: str | Path | None = None,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    seed: int = 0,
    require_labels: bool = True,
    output_json: str | Path | None = None,
    synthesize_if_missing: bool | None = None,
    train_subjects: int | None = None,
    test_subjects_per_site: int | None = None,
) -> dict[str, object]:
    """Build the paper's IXI datalist for one contrast.

    Returns ``{"training", "validation", "test", "fractions", "fraction", "contrast", "seed"}`` (and
    ``"train_subjects"`` when given): ``training`` holds the GST training subjects of ``fraction`` (a nested
    subset), ``validation`` the GST validation subjects, ``test`` the GST test subjects followed by every HH and IOP
    subject. Items are ``{"image", "label", "subject", "site", "contrast"}``. ``fractions`` gives the training-set
    size of each of :data:`FRACTIONS` (and of ``fraction``). The split is made on the GST subjects of every contrast
    folder present, so the T1, T2 and PD datalists of one folder and seed put each subject in the same split.

    Args:
        dataset_dir: IXI folder holding ``IXI-T1/``, ``IXI-T2/``, ``IXI-PD/`` (or the images themselves).
        contrast: ``"T1"``, ``"T2"`` or ``"PD"``.
        fraction: share of the training subjects to use, in (0, 1]; at least one subject.
        labels_dir: folder of co-registered label maps (0 background, 1 GM, 2 WM, 3 CSF); default
            ``dataset_dir/labels``.
        label_pattern: label file name, with ``{subject}`` (``IXI002-Guys-0828``), ``{id}`` (``IXI002``) and
            ``{contrast}`` placeholders, e.g. ``"{subject}-{contrast}_seg.nii.gz"``.
        seed: split and subset seed.
        require_labels: a training or validation image without a label is an error (test images without a label
            are kept, with no ``"label"`` key, for inference-only use, and logged). ``False`` keeps them all.
        output_json: also write the datalist there (atomically).
        synthesize_if_missing: create the synthetic data set when ``dataset_dir`` is missing or empty. ``None``
            (default) does so only for the embedded default location ``data/synthetic/ixi``; a folder you name
            yourself that is missing is an error, never silently replaced by synthetic data.
        train_subjects: a number of training subjects (e.g. 1) instead of ``fraction`` (see
            :func:`training_subset`); ``None`` uses ``fraction``.
        test_subjects_per_site: keep at most this many test subjects of each site (GST in the split's order,
            HH / IOP the first by name), to make evaluation cheaper in experiment grids; ``None`` keeps them all.

    Raises:
        IXIDatasetError: missing folder or images, a missing training/validation label, a bad fraction, contrast
            or label pattern.
    """
    root = Path(dataset_dir)
    _check_contrast(contrast)
    fraction = _check_fraction(fraction)
    _label_path(Path("."), label_pattern, "IXI002-Guys-0828", contrast)  # validate the pattern early
    if synthesize_if_missing is None:
        synthesize_if_missing = root.resolve() == (DEFAULT_SYNTHETIC_ROOT / "ixi").resolve()
    empty = not root.is_dir() or not any(root.iterdir())
    if empty and synthesize_if_missing:
        _ensure_synthetic(root, seed)
    elif empty:
        raise IXIDatasetError(
            f"IXI dataset folder {root} is {'empty' if root.is_dir() else 'missing'} "
            f"(expected {_expected(root, contrast)})"
        )
    items = scan_ixi(root, contrast, labels_dir=labels_dir, label_pattern=label_pattern)
    labels = Path(labels_dir) if labels_dir is not None else root / "labels"
    by_subject = {item["subject"]: item for item in items}
    split = split_gst_subjects(_gst_subjects(root), seed)
    train_all = [s for s in split["training"] if s in by_subject]  # permuted order, filtered to this contrast
    val = [by_subject[s] for s in split["validation"] if s in by_subject]
    test_gst = [by_subject[s] for s in split["test"] if s in by_subject]
    ood = sorted((i for i in items if i["site"] != IN_DOMAIN_SITE), key=lambda i: (i["site"], i["subject"]))
    training = [by_subject[s] for s in sorted(training_subset(train_all, fraction, train_subjects))]

    if require_labels:
        for item in [*training, *val]:
            if "label" not in item:
                looked = _label_path(labels, label_pattern, item["subject"], contrast)
                raise IXIDatasetError(
                    f"no label for training/validation image {item['image']}: looked for {looked} "
                    f"(labels_dir={labels}, label_pattern={label_pattern!r}); pass labels_dir/label_pattern "
                    f"matching your label files, or require_labels=False"
                )
    if test_subjects_per_site is not None:
        test_gst, ood = (
            _cap_per_site(test_gst, int(test_subjects_per_site)),
            _cap_per_site(ood, int(test_subjects_per_site)),
        )
    test = [*test_gst, *ood]
    unlabelled = [i["subject"] for i in test if "label" not in i]
    if unlabelled:
        logger.warning(
            f"{len(unlabelled)} of {len(test)} IXI {contrast} test image(s) have no label in {labels} "
            f"(kept without a 'label' key, for inference only): {', '.join(unlabelled[:5])}"
            f"{' ...' if len(unlabelled) > 5 else ''}"
        )
    if not train_all:
        logger.warning(f"no GST (Guys) {contrast} subjects in {root}: the training set is empty")
    sizes = {str(f): subset_size(f, len(train_all)) for f in sorted({*FRACTIONS, fraction})}
    datalist: dict[str, object] = {
        "training": training,
        "validation": val,
        "test": test,
        "fractions": sizes,
        "fraction": fraction,
        "contrast": contrast,
        "seed": int(seed),
    }
    if train_subjects is not None:
        datalist["train_subjects"] = int(train_subjects)
    chosen_by = f"fraction {fraction}" if train_subjects is None else f"train_subjects {train_subjects}"
    logger.info(
        f"IXI {contrast} datalist from {root}: {len(training)} training ({chosen_by} of {len(train_all)}), "
        f"{len(val)} validation, {len(test_gst)} GST + {len(ood)} HH/IOP test subjects"
    )
    if output_json is not None:
        write_datalist(datalist, output_json)
    return datalist

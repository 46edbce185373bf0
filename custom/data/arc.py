"""Datalists of the Aphasia Recovery Cohort (ARC, OpenNeuro ds004884): T1w / T2w / FLAIR with lesion masks.

Layout (OpenNeuro BIDS; ``acq-``/``run-`` entities in the names are fine, the session level may be absent)::

    dataset_dir/sub-M2001/ses-1253/anat/sub-M2001_ses-1253_T1w.nii.gz          (also _T2w, _FLAIR)
    dataset_dir/sub-M2001/ses-1253/anat/sub-M2001_ses-1253_acq-spc3p2_run-7_T2w.nii.gz
    dataset_dir/derivatives/lesion_masks/sub-M2001/ses-1253/anat/sub-M2001_ses-1253_desc-lesion_mask.nii.gz

An image's lesion mask is a file of the SAME subject and session: by default any ``*lesion*mask*.nii[.gz]`` file
(case-insensitive) under ``dataset_dir/derivatives`` whose BIDS entities (``sub-``, ``ses-``; taken from the file
name, else from its folders) are the image's. A user-given ``mask_pattern`` (placeholders ``{subject}``
``sub-M2001``, ``{session}`` ``ses-1253`` and ``{contrast}`` ``T1w``), relative to ``mask_dir``, overrides the
search. ARC shares one expert mask per subject (228 masks over 902 sessions), drawn in one session: only images of
sessions with a mask are labelled data, which is what the paper's splits count (T2w: 159 + 22 + 47 = 228).

Splits follow the paper (paper/NOTES.md) per contrast: T1w 142 / 20 / 41, T2w 159 / 22 / 47, FLAIR 59 / 8 / 18
training / validation / test subjects; fewer subjects are split in proportion. The split is made BY SUBJECT: all
sessions of a subject go to the same split. Training subsets for label-efficiency experiments (1 %, 10 %, 100 %)
are prefixes of one seeded permutation of the training subjects, hence nested.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from custom.data.ixi import FRACTIONS, subset_size, training_subset, write_datalist
from custom.data.qmri_datalist import DEFAULT_SYNTHETIC_ROOT
from custom.errors import InputError

__all__ = [
    "CONTRASTS",
    "DEFAULT_MASK_PATTERN",
    "FRACTIONS",
    "PAPER_SPLITS",
    "ARCDatasetError",
    "arc_datalist",
    "parse_entities",
    "scan_arc",
    "split_sizes",
    "split_subjects",
    "write_datalist",
]

logger = logging.getLogger(__name__)

CONTRASTS: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
"""ARC contrasts with a datalist (BIDS suffix of the ``anat`` images)."""

PAPER_SPLITS: dict[str, tuple[int, int, int]] = {"T1w": (142, 20, 41), "T2w": (159, 22, 47), "FLAIR": (59, 8, 18)}
"""Training / validation / test subjects per contrast in the paper."""

DEFAULT_MASK_PATTERN = "{subject}_{session}_desc-lesion_mask.nii.gz"
"""A typical ``mask_pattern`` for a flat folder of masks (not used unless passed: the default is a search)."""

_PLACEHOLDERS = ("subject", "session", "contrast")
_MASK_NAME = re.compile(r"lesion.*mask.*\.nii(?:\.gz)?$", re.IGNORECASE)
_NII = re.compile(r"\.nii(?:\.gz)?$")
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")


class ARCDatasetError(InputError):
    """The ARC folder, an image or a lesion mask is missing or misnamed (the message names the path and what was
    expected)."""


def parse_entities(path: str | Path, base: str | Path | None = None) -> tuple[str | None, str]:
    """``(subject, session)`` of a BIDS file, with prefixes (``("sub-M2001", "ses-1253")``).

    The entities come from the file name; an entity missing there is taken from the folders between ``base`` and
    the file (all folders when ``base`` is ``None``). ``subject`` is ``None`` when neither has one, ``session`` is
    ``""`` for data without a session level.
    """
    path = Path(path)
    found = {key: f"{key}-{value}" for key, value in _ENTITY.findall(_NII.sub("", path.name))}
    folders = path.parent.relative_to(base).parts if base is not None else path.parent.parts
    for part in folders:
        for key in ("sub", "ses"):
            if part.startswith(f"{key}-") and key not in found:
                found[key] = part
    return found.get("sub"), found.get("ses", "")


def _check_contrast(contrast: str) -> str:
    """The canonical spelling of ``contrast`` (case-insensitive match against :data:`CONTRASTS`)."""
    for known in CONTRASTS:
        if isinstance(contrast, str) and contrast.lower() == known.lower():
            return known
    raise ARCDatasetError(f"unknown ARC contrast {contrast!r}: expected one of {', '.join(CONTRASTS)}")


def _check_fraction(fraction: float) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ARCDatasetError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < value <= 1.0:
        raise ARCDatasetError(f"fraction must be in (0, 1] (e.g. 0.01, 0.1 or 1.0), got {fraction!r}")
    return value


def _expected(root: Path, contrast: str) -> str:
    return (
        f"BIDS files like {root / 'sub-M2001' / 'ses-1253' / 'anat' / f'sub-M2001_ses-1253_{contrast}.nii.gz'} "
        f"(sub-*/ses-*/anat/*_{contrast}.nii[.gz], or sub-*/anat/ without sessions)"
    )


def _format_pattern(pattern: str, subject: str, session: str, contrast: str) -> str:
    """``pattern`` filled in; without a session, the separators around the empty ``{session}`` are dropped."""
    try:
        name = pattern.format(subject=subject, session=session, contrast=contrast)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ARCDatasetError(
            f"mask_pattern {pattern!r} is not a valid pattern ({err!r}): use the placeholders "
            f"{', '.join('{' + p + '}' for p in _PLACEHOLDERS)}, e.g. {DEFAULT_MASK_PATTERN!r}"
        ) from None
    if not session:
        parts = (re.sub(r"_(?=\.)", "", re.sub(r"_{2,}", "_", part)).strip("_") for part in name.split("/"))
        name = "/".join(part for part in parts if part)
    return name


class _MaskFinder:
    """Finds an image's lesion mask: ``mask_dir / mask_pattern`` or a search of ``mask_dir`` by BIDS entities."""

    def __init__(self, root: Path, mask_dir: str | Path | None, mask_pattern: str | None) -> None:
        self.folder = Path(mask_dir) if mask_dir is not None else root / "derivatives"
        self.pattern = mask_pattern
        if mask_pattern is not None:
            _format_pattern(mask_pattern, "sub-M2001", "ses-1253", "T1w")  # validate early
        if mask_dir is not None and not self.folder.is_dir():
            raise ARCDatasetError(f"lesion mask folder {self.folder} (mask_dir) does not exist")
        self.index: dict[tuple[str, str], list[Path]] = {}
        if mask_pattern is None and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                if _MASK_NAME.search(path.name) and path.is_file():
                    subject, session = parse_entities(path, self.folder)
                    if subject is not None:
                        self.index.setdefault((subject, session), []).append(path)

    def describe(self, subject: str, session: str, contrast: str) -> str:
        """Where the mask of ``subject``/``session`` was looked for (for error messages)."""
        if self.pattern is not None:
            where = self.folder / _format_pattern(self.pattern, subject, session, contrast)
            return f"{where} (mask_dir={self.folder}, mask_pattern={self.pattern!r})"
        state = "" if self.folder.is_dir() else ", which does not exist"
        entities = f"{subject}{' and ' + session if session else ' (no session)'}"
        return f"files named like *lesion*mask*.nii[.gz] of {entities} anywhere under {self.folder}{state}"

    def find(self, subject: str, session: str, contrast: str, image: Path) -> Path | None:
        """The mask of ``image`` or ``None``; several candidates are resolved by a ``{contrast}`` token in the name."""
        if self.pattern is not None:
            path = self.folder / _format_pattern(self.pattern, subject, session, contrast)
            return path if path.is_file() else None
        candidates = self.index.get((subject, session), [])
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        token = re.compile(rf"(?:^|[-_.]){re.escape(contrast)}(?:$|[-_.])")
        tagged = [c for c in candidates if token.search(c.name)]
        if len(tagged) == 1:
            return tagged[0]
        raise ARCDatasetError(
            f"{len(candidates)} lesion masks of {subject} {session} match {image}: "
            f"{', '.join(str(c) for c in candidates)}; pass mask_dir and mask_pattern to choose one"
        )


def _anat_folders(subject_dir: Path) -> list[tuple[str, Path]]:
    """``(session, anat folder)`` of one subject: ``ses-*/anat`` folders, and ``anat`` itself (session ``""``)."""
    folders = [(ses.name, ses / "anat") for ses in sorted(subject_dir.glob("ses-*")) if (ses / "anat").is_dir()]
    if (subject_dir / "anat").is_dir():
        folders.insert(0, ("", subject_dir / "anat"))
    return folders


def scan_arc(
    root: str | Path,
    contrast: str,
    mask_dir: str | Path | None = None,
    mask_pattern: str | None = None,
) -> list[dict[str, str]]:
    """One item per ``contrast`` image, sorted by subject, session and file name.

    Items are ``{"image", "label", "subject", "session", "contrast"}`` (``"subject"`` ``sub-M2001``,
    ``"session"`` ``ses-1253`` or ``""`` without a session level); ``"label"`` (the lesion mask of the same
    subject and session) is absent when none is found. Several runs of a contrast in one session give one item
    each. Images whose name does not start with their subject folder's name are skipped and logged.

    Args:
        root: the ARC BIDS folder (holding ``sub-*/``).
        contrast: ``"T1w"``, ``"T2w"`` or ``"FLAIR"``.
        mask_dir: folder of the lesion masks; default ``root/derivatives``.
        mask_pattern: mask path relative to ``mask_dir`` with ``{subject}``, ``{session}`` and ``{contrast}``
            placeholders, e.g. ``"{subject}_{session}_desc-lesion_mask.nii.gz"`` or
            ``"{subject}/{session}/anat/{subject}_{session}_desc-lesion_mask.nii.gz"``. Default: search
            ``mask_dir`` recursively for ``*lesion*mask*.nii[.gz]`` files of the image's subject and session.

    Raises:
        ARCDatasetError: the folder is missing or holds no ``contrast`` image; a given ``mask_dir`` is missing; a
            bad ``mask_pattern``; several masks match one image.
    """
    root = Path(root)
    contrast = _check_contrast(contrast)
    if not root.is_dir():
        raise ARCDatasetError(f"ARC dataset folder {root} does not exist (expected {_expected(root, contrast)})")
    finder = _MaskFinder(root, mask_dir, mask_pattern)
    suffix = re.compile(rf"_{re.escape(contrast)}\.nii(?:\.gz)?$")
    items: list[dict[str, str]] = []
    skipped: list[str] = []
    for subject_dir in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        subject = subject_dir.name
        for session, anat in _anat_folders(subject_dir):
            for path in sorted(p for p in anat.iterdir() if suffix.search(p.name) and p.is_file()):
                if not path.name.startswith(f"{subject}_"):
                    skipped.append(str(path.relative_to(root)))
                    continue
                item = {"image": str(path), "subject": subject, "session": session, "contrast": contrast}
                mask = finder.find(subject, session, contrast, path)
                if mask is not None:
                    item["label"] = str(mask)
                items.append(item)
    if skipped:
        logger.warning(
            f"skipped {len(skipped)} {contrast} file(s) in {root} whose name does not start with their subject "
            f"folder's name: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
        )
    if not items:
        raise ARCDatasetError(f"no ARC {contrast} images in {root}: expected {_expected(root, contrast)}")
    return items


def _scaled_sizes(n: int, paper: tuple[int, int, int]) -> tuple[int, int, int]:
    """Sizes for ``n`` subjects given the paper's ``(train, val, test)`` (the general form of
    :func:`custom.data.ixi.split_sizes`): the paper's when ``n`` reaches their sum (the excess goes to the test
    set), else proportional (rounded half up, at least one per split when ``n >= 3``); 2 -> (1, 1, 0), 1 -> (1, 0,
    0)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = sum(paper)
    if n >= total:
        return paper[0], paper[1], n - paper[0] - paper[1]
    if n >= 3:
        n_val = max(1, math.floor(n * paper[1] / total + 0.5))
        n_test = max(1, math.floor(n * paper[2] / total + 0.5))
        return n - n_val - n_test, n_val, n_test
    return ((0, 0, 0), (1, 0, 0), (1, 1, 0))[n]


def split_sizes(n: int, contrast: str = "T1w") -> tuple[int, int, int]:
    """Numbers of training / validation / test subjects for ``n`` subjects of ``contrast``.

    * ``n >=`` the paper's total (203 T1w, 228 T2w, 85 FLAIR): the paper's sizes of :data:`PAPER_SPLITS`;
      further subjects go to the test set.
    * ``3 <= n <`` total: proportional to the paper's sizes (rounded half up), at least one in each split.
    * ``n == 2``: one training and one validation subject; ``n == 1``: training only (a warning is logged).
    """
    sizes = _scaled_sizes(n, PAPER_SPLITS[_check_contrast(contrast)])
    if n == 1:
        logger.warning(f"only one ARC {contrast} subject: it is used for training; there is no validation/test data")
    return sizes


def split_subjects(subjects: Iterable[str], contrast: str = "T1w", seed: int = 0) -> dict[str, list[str]]:
    """Split subject ids into ``{"training", "validation", "test"}`` (sizes of :func:`split_sizes`).

    The ids are de-duplicated and sorted, then permuted with ``torch.randperm`` seeded by ``seed``, so the split
    depends only on the set of ids, the contrast and the seed. ``"training"`` keeps the permuted order (its
    prefixes are the nested subsets of :func:`custom.data.ixi.training_subset`); validation and test are sorted.
    """
    ids = sorted(set(subjects))
    n_train, n_val, _ = split_sizes(len(ids), contrast)
    generator = torch.Generator().manual_seed(int(seed))
    order = [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]
    return {
        "training": order[:n_train],
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def _ensure_synthetic(root: Path, seed: int) -> None:
    from custom.data.synthetic import generate_dataset

    subjects = 24
    print(
        f"no ARC data in {root}: creating the embedded synthetic data set there ({subjects} subjects from the "
        f"MNI152 template, seed {seed}); pass --dataset_dir to use your own data"
    )
    generate_dataset(root.parent, subjects=subjects, seed=seed, resolution=2.0, preview=False, progress=True)


def _listing(names: list[str]) -> str:
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


def arc_datalist(
    dataset_dir: str | Path,
    contrast: str = "T1w",
    fraction: float = 1.0,
    mask_dir: str | Path | None = None,
    mask_pattern: str | None = None,
    seed: int = 0,
    require_labels: bool = True,
    output_json: str | Path | None = None,
    synthesize_if_missing: bool | None = None,
    train_subjects: int | None = None,
) -> dict[str, object]:
    """Build the paper's ARC lesion-segmentation datalist for one contrast.

    Returns ``{"training", "validation", "test", "fractions", "fraction", "contrast", "seed"}`` (and
    ``"train_subjects"`` when given): ``training`` holds the images of the training subjects of ``fraction`` (a
    nested subset), ``validation`` and ``test`` those of the validation and test subjects. Items are ``{"image",
    "label", "subject", "session", "contrast"}``, sorted by subject and session. ``fractions`` gives the number of
    training SUBJECTS of each of :data:`FRACTIONS` (and of ``fraction``). Splits count subjects, and all images of a
    subject are in its split.

    Args:
        dataset_dir: ARC BIDS folder (``sub-*/[ses-*/]anat/*_{contrast}.nii.gz``, masks under ``derivatives/``).
        contrast: ``"T1w"``, ``"T2w"`` or ``"FLAIR"``.
        fraction: share of the training subjects to use, in (0, 1]; at least one subject.
        mask_dir: folder of the lesion masks; default ``dataset_dir/derivatives``.
        mask_pattern: mask path relative to ``mask_dir`` with ``{subject}`` (``sub-M2001``), ``{session}``
            (``ses-1253``) and ``{contrast}`` placeholders; default: search ``mask_dir`` by BIDS entities (see
            :func:`scan_arc`).
        seed: split and subset seed.
        require_labels: the datalist holds only images with a lesion mask of their own session (ARC masks one
            session per subject; the other sessions are left out and logged), and the split is made over the
            subjects that have one. No mask for any image is an error naming an image and where its mask was
            looked for. ``False`` keeps every image (``"label"`` where found) and splits all subjects.
        output_json: also write the datalist there (atomically).
        synthesize_if_missing: create the synthetic data set when ``dataset_dir`` is missing or empty. ``None``
            (default) does so only for the embedded default location ``data/synthetic/arc``; a folder you name
            yourself that is missing is an error, never silently replaced by synthetic data.
        train_subjects: a number of training subjects (e.g. 1) instead of ``fraction`` (see
            :func:`custom.data.ixi.training_subset`); ``None`` uses ``fraction``.

    Raises:
        ARCDatasetError: missing folder or images, no lesion mask at all (with ``require_labels``), a bad
            fraction, contrast or mask pattern, a missing ``mask_dir``, several masks for one image.
    """
    root = Path(dataset_dir)
    contrast = _check_contrast(contrast)
    fraction = _check_fraction(fraction)
    if mask_pattern is not None:
        _format_pattern(mask_pattern, "sub-M2001", "ses-1253", contrast)  # validate the pattern early
    if synthesize_if_missing is None:
        synthesize_if_missing = root.resolve() == (DEFAULT_SYNTHETIC_ROOT / "arc").resolve()
    empty = not root.is_dir() or not any(root.iterdir())
    if empty and synthesize_if_missing:
        _ensure_synthetic(root, seed)
    elif empty:
        raise ARCDatasetError(
            f"ARC dataset folder {root} is {'empty' if root.is_dir() else 'missing'} "
            f"(expected {_expected(root, contrast)})"
        )
    items = scan_arc(root, contrast, mask_dir=mask_dir, mask_pattern=mask_pattern)
    if require_labels:
        unlabelled = [i for i in items if "label" not in i]
        if len(unlabelled) == len(items):
            first = unlabelled[0]
            where = _MaskFinder(root, mask_dir, mask_pattern).describe(first["subject"], first["session"], contrast)
            raise ARCDatasetError(
                f"no lesion mask for any of the {len(items)} ARC {contrast} image(s) in {root}: e.g. for "
                f"{first['image']} looked for {where}; pass mask_dir/mask_pattern matching your mask files, or "
                f"require_labels=False"
            )
        if unlabelled:
            labelled_subjects = {i["subject"] for i in items if "label" in i}
            dropped = sorted({i["subject"] for i in unlabelled} - labelled_subjects)
            logger.warning(
                f"left out {len(unlabelled)} ARC {contrast} image(s) without a lesion mask of their own session "
                f"(not labelled data), {len(dropped)} subject(s) entirely{': ' + _listing(dropped) if dropped else ''}"
                f"; e.g. {unlabelled[0]['image']}"
            )
            items = [i for i in items if "label" in i]
    by_subject: dict[str, list[dict[str, str]]] = {}
    for item in items:
        by_subject.setdefault(item["subject"], []).append(item)
    split = split_subjects(by_subject, contrast, seed)
    train_all = split["training"]
    chosen = set(training_subset(train_all, fraction, train_subjects))

    def images(subjects: Iterable[str]) -> list[dict[str, str]]:
        return [item for subject in sorted(subjects) for item in by_subject[subject]]

    training, validation, test = images(chosen), images(split["validation"]), images(split["test"])
    if not require_labels:
        missing = [i["subject"] for i in items if "label" not in i]
        if missing:
            logger.warning(
                f"{len(missing)} of {len(items)} ARC {contrast} image(s) have no lesion mask (kept without a "
                f"'label' key): {_listing(missing)}"
            )
    sizes = {str(f): subset_size(f, len(train_all)) for f in sorted({*FRACTIONS, fraction})}
    datalist: dict[str, object] = {
        "training": training,
        "validation": validation,
        "test": test,
        "fractions": sizes,
        "fraction": fraction,
        "contrast": contrast,
        "seed": int(seed),
    }
    if train_subjects is not None:
        datalist["train_subjects"] = int(train_subjects)
    logger.info(
        f"ARC {contrast} datalist from {root}: {len(chosen)} training subjects "
        f"({'fraction ' + str(fraction) if train_subjects is None else f'train_subjects {train_subjects}'} of "
        f"{len(train_all)}; {len(training)} images), {len(split['validation'])} validation and "
        f"{len(split['test'])} test subjects ({len(validation)} and {len(test)} images)"
    )
    if output_json is not None:
        write_datalist(datalist, output_json)
    return datalist

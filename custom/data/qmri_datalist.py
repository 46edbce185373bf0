"""Datalists of qMRI subjects (hMRI-toolbox style folders) for pretraining, MONAI Decathlon-style.

Layout: one folder per subject under ``dataset_dir`` (``sub-001/``...), holding NIfTI maps named
``*_PD``, ``*_R1``, ``*_R2s*`` (e.g. ``_R2s_OLS``), ``*_MT*`` (e.g. ``_MTsat``), optionally ``*_R2``,
``*_mask`` (brain mask) and a real MPRAGE/T1w image (``*_MPRAGE`` or ``*_T1w``; used by Base mode).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from custom.errors import InputError
from custom.io import atomic_write_text

__all__ = [
    "DEFAULT_SYNTHETIC_ROOT",
    "DEFAULT_HELDOUT_ROOT",
    "QMRIDatasetError",
    "find_qmri_subjects",
    "heldout_qmri_dir",
    "qmri_datalist",
    "split_subjects",
]

logger = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")
"""Where the bundles' embedded synthetic data lives (relative to the working directory)."""
DEFAULT_HELDOUT_ROOT = Path("data/heldout")
"""Where the invariance probe's held-out synthetic subjects live by default (another seed than training's)."""

_NII = r"\.nii(\.gz)?$"
# key in the datalist -> file-name pattern (matched against the name, case-insensitive); first match wins
MAP_PATTERNS: dict[str, str] = {
    "pd": r"_PD" + _NII,
    "r1": r"_R1" + _NII,
    "r2s": r"_R2s[^/]*" + _NII,
    "mt": r"_MT[^/]*" + _NII,
    "r2": r"_R2" + _NII,
    "mask": r"_(brain)?mask" + _NII,
    "mprage": r"_(MPRAGE|T1w)" + _NII,
}
REQUIRED = ("pd", "r1", "r2s", "mt")


class QMRIDatasetError(InputError):
    """The qMRI dataset folder is missing, empty or incomplete (the message names the folder or file)."""


def _match(files: list[Path], pattern: str) -> Path | None:
    regex = re.compile(pattern, re.IGNORECASE)
    hits = sorted(f for f in files if regex.search(f.name))
    return hits[0] if hits else None


def find_qmri_subjects(dataset_dir: str | Path) -> list[dict[str, str]]:
    """One dict per subject folder: ``{"subject", "pd", "r1", "r2s", "mt"[, "r2", "mask", "mprage"]}``."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise QMRIDatasetError(f"qMRI dataset folder {root} does not exist")
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in folder.rglob("*") if f.is_file()]
        entry: dict[str, str] = {"subject": folder.name}
        for key, pattern in MAP_PATTERNS.items():
            hit = _match(files, pattern)
            if hit is not None:
                entry[key] = str(hit)
        if not any(k in entry for k in REQUIRED):
            continue  # not a subject folder (e.g. derivatives)
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            names = ", ".join(sorted(f.name for f in files)) or "no files"
            raise QMRIDatasetError(
                f"subject folder {folder} is missing the {'/'.join(m.upper() for m in missing)} map "
                f"(expected names matching {[MAP_PATTERNS[m] for m in missing]}; found: {names})"
            )
        subjects.append(entry)
    if not subjects:
        raise QMRIDatasetError(
            f"no qMRI subjects in {root}: expected subject folders holding *_PD, *_R1, *_R2s, *_MT NIfTI maps"
        )
    return subjects


def split_subjects(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split; at least one training subject, and one validation subject when there are >= 2."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(items) * val_fraction)
    n_val = min(max(n_val, 1 if len(items) >= 2 and val_fraction > 0 else 0), len(items) - 1)
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def _ensure_synthetic(dataset_dir: Path, subjects: int, seed: int) -> None:
    from custom.data.synthetic import generate_dataset

    root = dataset_dir.parent
    logger.warning(
        "no qMRI data in %s: creating the embedded synthetic data set there (%d subjects from the MNI152 "
        "template, seed %d); pass --dataset_dir to use your own data", dataset_dir, subjects, seed,
    )  # fmt: skip
    generate_dataset(root, subjects=subjects, seed=seed, resolution=2.0, preview=False, progress=True)


def qmri_datalist(
    dataset_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    synthesize_if_missing: bool | None = None,
    synthetic_subjects: int = 24,
    output_json: str | Path | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Build ``{"training": [...], "validation": [...]}`` from a qMRI folder.

    Args:
        dataset_dir: folder of subject folders.
        val_fraction: share of subjects held out for validation (the retrieval evaluation uses them).
        seed: split seed.
        synthesize_if_missing: create the synthetic data set when ``dataset_dir`` is missing or empty. ``None``
            (default) does so only for the embedded default location ``data/synthetic/qmri``; a folder you
            name yourself that is missing is an error, never silently replaced by synthetic data.
        synthetic_subjects: how many subjects to synthesise then.
        output_json: also write the datalist there (atomically).
    """
    root = Path(dataset_dir)
    if synthesize_if_missing is None:
        synthesize_if_missing = root.resolve() == (DEFAULT_SYNTHETIC_ROOT / "qmri").resolve()
    empty = not root.is_dir() or not any(root.iterdir())
    if empty and synthesize_if_missing:
        _ensure_synthetic(root, synthetic_subjects, seed)
    elif empty:
        raise QMRIDatasetError(f"qMRI dataset folder {root} is {'empty' if root.is_dir() else 'missing'}")
    subjects = find_qmri_subjects(root)
    train, val = split_subjects(subjects, val_fraction, seed)
    datalist = {"training": train, "validation": val}
    logger.info(f"qMRI datalist from {root}: {len(train)} training, {len(val)} validation subjects")
    if output_json is not None:
        atomic_write_text(json.dumps(datalist, indent=2), output_json)
    return datalist


def heldout_qmri_dir(dataset_dir: str | Path, subjects: int = 12, seed: int = 1000) -> str:
    """``dataset_dir``, after synthesising it when it is the embedded held-out default and is missing or empty.

    The invariance probe needs labelled subjects that pretraining never saw: by default ``data/heldout/qmri``,
    synthetic subjects drawn with another seed than the training set's. A folder you name yourself is returned
    as it is (a missing one is reported by the probe, naming it).
    """
    root = Path(dataset_dir)
    is_default = root.resolve() == (DEFAULT_HELDOUT_ROOT / "qmri").resolve()
    if is_default and (not root.is_dir() or not any(root.iterdir())):
        from custom.data.synthetic import generate_dataset

        logger.info("no held-out subjects in %s: synthesising %d (seed %d)", root, subjects, seed)
        generate_dataset(root.parent, subjects=subjects, seed=seed, resolution=2.0, preview=False, progress=True)
    return str(root)

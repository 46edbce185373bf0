"""Folder layouts of the synthetic datasets, mimicking the real ones so their datalist builders can be exercised.

* qMRI: hMRI-toolbox style maps per subject (PD and MT in percent, rates in 1/s), mask, labels, lesion;
* IXI-like: T1/T2/PD images from three sites with fixed per-site protocols, and tissue labels;
* ARC-like: BIDS T1w/T2w/FLAIR sessions with JSON sidecars, lesion masks under ``derivatives/``.

Each dataset draws its own anatomies; subject ``k`` of a dataset is generated from :func:`subject_rng` seeded
with ``(seed, dataset, k)`` alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.data.synthetic.acquisition import acquire_session, physics_ixi_images
from custom.data.synthetic.files import PooledWriter
from custom.data.synthetic.protocols import ARC_PROTOCOL, IXI_SITES, SITE_PROTOCOLS
from custom.data.synthetic.subject import Subject, make_subject
from custom.data.synthetic.template import Template
from custom.data.synthetic.tissues import QMRI_KINDS
from custom.sequences import SequenceSample

__all__ = [
    "QMRI_UNITS_ON_DISK",
    "subject_rng",
    "qmri_subject_id",
    "is_stroke_qmri",
    "ixi_subject_id",
    "arc_subject_id",
    "arc_sessions",
    "write_qmri",
    "write_ixi",
    "write_arc",
    "write_arc_metadata",
]

QMRI_UNITS_ON_DISK = {"PD": "percent", "MT": "percent", "R1": "1/s", "R2s": "1/s", "R2": "1/s"}
"""Units of the qMRI layout's files (hMRI toolbox conventions)."""

_DATASET_STREAMS = {"qmri": 0, "ixi": 1, "arc": 2}


def subject_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """Random generator of subject ``index`` of ``dataset`` ("qmri", "ixi" or "arc"), seeded by these alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _DATASET_STREAMS[dataset], int(index)]))


def qmri_subject_id(index: int) -> str:
    """``sub-001`` for subject index 0."""
    return f"sub-{index + 1:03d}"


def is_stroke_qmri(index: int) -> bool:
    """Every second qMRI subject (sub-002, sub-004, ...) carries a stroke lesion."""
    return index % 2 == 1


def ixi_subject_id(index: int, seed: int) -> str:
    """``IXI{NNN}-{Site}-{NNNN}``: NNN = index + 2, site cycling Guys/HH/IOP, NNNN deterministic in (seed, index)."""
    number = int(np.random.default_rng([int(seed), 101, int(index)]).integers(0, 10000))
    return f"IXI{index + 2:03d}-{IXI_SITES[index % len(IXI_SITES)]}-{number:04d}"


def arc_subject_id(index: int) -> str:
    """``sub-M2001`` for subject index 0."""
    return f"sub-M2{index + 1:03d}"


def write_qmri(out: Path, index: int, template: Template, seed: int, writer: PooledWriter) -> tuple[Path, Subject]:
    """qMRI subject ``index`` in hMRI-toolbox style under ``out/qmri/sub-XXX/`` (PD, MT in percent)."""
    rng = subject_rng(seed, "qmri", index)
    subject = make_subject(template, rng, stroke=is_stroke_qmri(index))
    sid = qmri_subject_id(index)
    folder = out / "qmri" / sid
    for kind in QMRI_KINDS:
        scale = 100.0 if QMRI_UNITS_ON_DISK[kind] == "percent" else 1.0
        writer.nifti(folder / f"{sid}_{kind}.nii.gz", subject.maps[kind] * np.float32(scale), template.affine)
    writer.nifti(folder / f"{sid}_mask.nii.gz", subject.mask, template.affine, np.uint8)
    writer.nifti(folder / f"{sid}_labels.nii.gz", subject.labels, template.affine, np.uint8)
    if subject.lesion_mask is not None:
        writer.nifti(folder / f"{sid}_lesion.nii.gz", subject.lesion_mask, template.affine, np.uint8)
    return folder, subject


def write_ixi(
    out: Path,
    index: int,
    template: Template,
    seed: int,
    writer: PooledWriter,
    image_model: str = "physics",
) -> tuple[str, Subject]:
    """IXI-like subject ``index``: ``IXI-{T1,T2,PD}/IXI...-{contrast}.nii.gz`` and ``labels/IXI..._labels.nii.gz``.

    The subject is acquired at site ``IXI_SITES[index % 3]``; ``image_model`` (one of
    :data:`custom.data.image_models.IMAGE_MODELS`) makes its images from its anatomy: ``"physics"`` (default) the
    site's protocols simulated from the qMRI maps, ``"gmm"`` random per-tissue intensities, ``"template"`` the
    MNI152 T1 intensities under the subject's warp (T1 only: no T2 / PD files for that subject). The anatomy and
    labels are the same for every model.
    """
    from custom.data import image_models  # imports this package: a module-level import would be circular

    rng = subject_rng(seed, "ixi", index)
    site = IXI_SITES[index % len(IXI_SITES)]
    name = ixi_subject_id(index, seed)
    if image_model == "physics":
        subject = make_subject(template, rng, stroke=False)
        images = physics_ixi_images(subject, site, rng)
    else:
        anatomy = image_models.make_subject_anatomy(template, rng, stroke=False)
        subject = anatomy.subject
        images = image_models.site_images(image_model, anatomy, template, SITE_PROTOCOLS[site], rng)
    for contrast, image in images.items():
        writer.nifti(out / "ixi" / f"IXI-{contrast}" / f"{name}-{contrast}.nii.gz", image, template.affine)
    writer.nifti(out / "ixi" / "labels" / f"{name}_labels.nii.gz", subject.labels, template.affine, np.uint8)
    return name, subject


def _bids_sidecar(sample: SequenceSample) -> str:
    p = sample.params
    meta: dict[str, object] = {"RepetitionTime": p["tr"], "EchoTime": p.get("te")}
    if "ti" in p:
        meta["InversionTime"] = p["ti"]
    if "flip" in p:
        meta["FlipAngle"] = round(math.degrees(p["flip"]), 3)
    meta["SimulatedSequence"] = sample.to_dict()
    meta["Manufacturer"] = "synthetic (custom.data.synthetic)"
    return json.dumps(meta, indent=2) + "\n"


def arc_sessions(index: int, rng: np.random.Generator) -> list[str]:
    """Session ids (4 digits, increasing); every third subject (index 0, 3, ...) has a second session."""
    first = int(rng.integers(100, 3000))
    sessions = [f"ses-{first:04d}"]
    if index % 3 == 0:
        sessions.append(f"ses-{first + int(rng.integers(30, 900)):04d}")
    return sessions


def write_arc(out: Path, index: int, template: Template, seed: int, writer: PooledWriter) -> dict[str, Any]:
    """ARC-like BIDS subject ``index`` with a lesion: T1w/T2w/FLAIR per session and a lesion mask per session.

    A second session re-draws the noise, the receiver gain and the bias field; anatomy and lesion are the same.
    """
    rng = subject_rng(seed, "arc", index)
    subject = make_subject(template, rng, stroke=True)
    sid = arc_subject_id(index)
    sessions = arc_sessions(index, rng)
    lesion_mask = subject.lesion_mask
    lesion = subject.lesion
    assert lesion_mask is not None and lesion is not None
    for ses in sessions:
        anat = out / "arc" / sid / ses / "anat"
        for contrast, image in acquire_session(subject, ARC_PROTOCOL, rng).items():
            writer.nifti(anat / f"{sid}_{ses}_{contrast}.nii.gz", image, template.affine)
            writer.text(anat / f"{sid}_{ses}_{contrast}.json", _bids_sidecar(ARC_PROTOCOL.sequences[contrast]))
        deriv = out / "arc" / "derivatives" / "lesion_masks" / sid / ses / "anat"
        writer.nifti(deriv / f"{sid}_{ses}_desc-lesion_mask.nii.gz", lesion_mask, template.affine, np.uint8)
    return {
        "participant_id": sid,
        "sex": "M" if rng.random() < 0.6 else "F",
        "age": int(rng.integers(35, 80)),
        "sessions": sessions,
        "lesion_ml": float(lesion.sum(dtype=np.float64)) * template.voxel_ml,
    }


def write_arc_metadata(out: Path, participants: Sequence[Mapping[str, object]], writer: PooledWriter) -> None:
    """BIDS ``dataset_description.json`` (raw and derivative) and ``participants.tsv`` / ``.json``."""
    arc = out / "arc"
    description = {
        "Name": "Synthetic ARC-like stroke dataset (seqinv embedded data)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["seqinv contributors"],
        "GeneratedBy": [{"Name": "custom.data.synthetic", "Description": "MNI152 2009a template, qMRI simulation"}],
    }
    writer.text(arc / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    derivative = {
        "Name": "Synthetic lesion masks",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "custom.data.synthetic"}],
    }
    deriv = arc / "derivatives" / "lesion_masks" / "dataset_description.json"
    writer.text(deriv, json.dumps(derivative, indent=2) + "\n")
    rows = ["participant_id\tsex\tage\tlesion_volume_ml"]
    rows += [f"{p['participant_id']}\t{p['sex']}\t{p['age']}\t{float(p['lesion_ml']):.2f}" for p in participants]
    writer.text(arc / "participants.tsv", "\n".join(rows) + "\n")
    sidecar = {
        "sex": {"Description": "sex of the (synthetic) participant", "Levels": {"M": "male", "F": "female"}},
        "age": {"Description": "age at first session", "Units": "years"},
        "lesion_volume_ml": {"Description": "partial-volume lesion volume", "Units": "mL"},
    }
    writer.text(arc / "participants.json", json.dumps(sidecar, indent=2) + "\n")

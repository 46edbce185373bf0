"""Entry point of the synthetic data: :func:`generate_dataset` writes the qMRI, IXI-like and ARC-like datasets
(and optionally a preview montage read back from the written files)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from custom.data.synthetic.files import PooledWriter
from custom.data.synthetic.layouts import (
    is_stroke_qmri,
    qmri_subject_id,
    write_arc,
    write_arc_metadata,
    write_ixi,
    write_qmri,
)
from custom.data.synthetic.protocols import ARC_PROTOCOL, IXI_SITES, SITE_PROTOCOLS
from custom.data.synthetic.template import load_template
from custom.data.synthetic.tissues import QMRI_KINDS, TISSUES
from custom.sequences import sample_sequence, simulate

__all__ = ["generate_dataset", "write_preview"]


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def write_preview(
    out: Path,
    qmri_dirs: Sequence[str | os.PathLike[str]],
    ixi_names: Sequence[str],
    arc_rows: Sequence[Mapping[str, object]],
    seed: int,
    resolution: float,
) -> Path:
    """``out/preview.png`` read back from the written files: the first qMRI subject's maps (converted to SI with
    :func:`custom.data.qmri_units.to_si`) and labels, the first IXI subject of each site present, the first ARC
    subject with its lesion outlined, and one image per sequence type of the ``clinical`` and ``paper`` presets
    simulated from the first qMRI subject (``sample_sequence`` seeded with ``seed + 4 * preset_index + i``)."""
    from custom.data.preview import write_montage
    from custom.data.qmri_units import to_si

    images: dict[str, np.ndarray] = {}
    outlines: dict[str, np.ndarray] = {}
    cmaps: dict[str, str] = {}
    maps: dict[str, np.ndarray] = {}
    if qmri_dirs:
        folder = Path(qmri_dirs[0])
        sid = folder.name
        for kind in QMRI_KINDS:
            maps[kind], _ = to_si(_load(folder / f"{sid}_{kind}.nii.gz"), kind, path=folder / f"{sid}_{kind}.nii.gz")
        for kind, unit in (("PD", "fraction"), ("R1", "1/s"), ("R2s", "1/s"), ("MT", "fraction")):
            images[f"qMRI {sid} {kind} ({unit})"] = maps[kind]
        key = f"qMRI {sid} tissue labels (0 bg, 1 GM, 2 WM, 3 CSF)"
        images[key] = _load(folder / f"{sid}_labels.nii.gz")
        cmaps[key] = "viridis"
    for site in IXI_SITES:
        names = [n for n in ixi_names if f"-{site}-" in n]
        for contrast in SITE_PROTOCOLS[site].sequences if names else ():
            path = out / "ixi" / f"IXI-{contrast}" / f"{names[0]}-{contrast}.nii.gz"
            images[f"IXI {names[0]} {contrast}"] = _load(path)
    if arc_rows:
        sid, ses = str(arc_rows[0]["participant_id"]), str(arc_rows[0]["sessions"][0])  # type: ignore[index]
        deriv = out / "arc" / "derivatives" / "lesion_masks" / sid / ses / "anat"
        lesion = _load(deriv / f"{sid}_{ses}_desc-lesion_mask.nii.gz")
        for contrast in ARC_PROTOCOL.sequences:
            key = f"ARC {sid} {ses} {contrast} (red: lesion)"
            images[key] = _load(out / "arc" / sid / ses / "anat" / f"{sid}_{ses}_{contrast}.nii.gz")
            outlines[key] = lesion
    if maps:
        tensors = {k: torch.from_numpy(v) for k, v in maps.items()}
        for p, preset in enumerate(("clinical", "paper")):
            for i, name in enumerate(("fse", "gre", "flair", "mprage")):
                sample = sample_sequence(name, preset=preset, generator=seed + 4 * p + i)
                img = simulate(sample, tensors["PD"], tensors["R1"], tensors["R2s"], tensors["MT"], r2=tensors["R2"])
                images[f"{preset}: {sample}"] = img.numpy()
    title = f"seqinv synthetic data (seed {seed}, {resolution:g} mm voxels)"
    return write_montage(out / "preview.png", images, title=title, outlines=outlines, cmaps=cmaps, columns=4)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads: the simulation's element-wise operations on ~1M voxels are
    memory bound and slow down badly when their threads compete with the file writers (or other processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ixi_site_models(models: Mapping[str, str] | None) -> dict[str, str]:
    """IXI site (``Guys`` / ``HH`` / ``IOP``) -> image model, ``"physics"`` where ``models`` names none.

    ``GST`` is accepted for Guys (the paper's name). An unknown site or model is a ``ValueError`` naming it.
    """
    from custom.data.image_models import IMAGE_MODELS

    resolved = dict.fromkeys(IXI_SITES, "physics")
    for site, model in (models or {}).items():
        name = "Guys" if str(site).upper() in ("GST", "GUYS") else str(site).upper()
        if name not in resolved:
            raise ValueError(f"unknown IXI site {site!r} in ixi_image_models; sites: GST (Guys), HH, IOP")
        if model not in IMAGE_MODELS:
            raise ValueError(f"unknown image model {model!r} for site {site}; models: {', '.join(IMAGE_MODELS)}")
        resolved[name] = str(model)
    return resolved


def generate_dataset(
    out_dir: str | os.PathLike[str],
    subjects: int = 4,
    seed: int = 0,
    resolution: float = 2.0,
    preview: bool = False,
    progress: bool = True,
    ixi_image_models: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """Write the synthetic qMRI, IXI-like and ARC-like datasets under ``out_dir``.

    Layout (``NNN`` zero-padded numbers; see :mod:`custom.data.synthetic` for the simulation):

    * ``qmri/sub-001/sub-001_{PD,R1,R2s,MT,R2}.nii.gz`` (PD, MT in percent; R1, R2*, R2 in 1/s), ``_mask`` and
      ``_labels`` (0 bg, 1 GM, 2 WM, 3 CSF); every second subject also has a stroke lesion and ``_lesion``.
    * ``ixi/IXI-{T1,T2,PD}/IXI{NNN}-{Site}-{NNNN}-{T1,T2,PD}.nii.gz`` and ``ixi/labels/IXI..._labels.nii.gz``;
      subject k is acquired at site ``IXI_SITES[k % 3]`` with :data:`SITE_PROTOCOLS`.
    * ``arc/`` BIDS: ``sub-M2NNN/ses-NNNN/anat/sub-M2NNN_ses-NNNN_{T1w,T2w,FLAIR}.nii.gz`` (+ JSON sidecars),
      ``derivatives/lesion_masks/.../*_desc-lesion_mask.nii.gz``, ``participants.tsv``,
      ``dataset_description.json``; every third subject has a second session.
    * ``preview.png`` when ``preview`` is true.

    Images and maps are float32, labels and masks uint8, all on one grid (RAS+, isotropic ``resolution`` mm
    voxels); every file is written atomically. Existing files are overwritten; other files are left alone.

    Args:
        out_dir: output folder (created).
        subjects: number of subjects of each dataset.
        seed: random seed; the data arrays are identical for equal seeds, and subject k does not depend on
            ``subjects``.
        resolution: isotropic voxel size, mm (1 and 2 use nilearn's templates as they are; other values
            resample the 2 mm template).
        preview: also write ``out_dir/preview.png``.
        progress: show a tqdm progress bar over subjects on stderr.
        ixi_image_models: IXI site -> image model (:data:`custom.data.image_models.IMAGE_MODELS`) for the sites
            whose images should not come from the signal equations, e.g. ``{"HH": "gmm", "IOP": "template"}``
            (sites as in the file names, ``Guys`` / ``HH`` / ``IOP``, or ``GST`` for Guys). Unnamed sites use
            ``"physics"``. The anatomy and labels of every subject are the same whatever its model; ``"template"``
            writes T1 images only.

    Returns:
        A JSON-serialisable summary: ``out_dir``, ``seed``, ``resolution_mm``, ``shape``, ``subjects``, ``qmri``
        (subject folders), ``qmri_stroke`` (their ids), ``ixi`` (count), ``ixi_subjects``, ``ixi_sites`` (count
        per site), ``arc`` (count), ``arc_sessions`` (count), ``arc_subjects`` (id, sessions, lesion mL),
        ``ixi_image_models`` (site -> model), ``tissue_fractions`` (mean GM / WM / CSF fraction of the brain),
        ``files`` (number written),
        ``preview`` (path or None), ``seconds`` and ``seconds_per_subject``.
    """
    start = time.perf_counter()
    if int(subjects) < 0:
        raise ValueError(f"subjects must be >= 0, got {subjects}")
    site_models = ixi_site_models(ixi_image_models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = load_template(float(resolution))
    qmri_dirs: list[str] = []
    ixi_names: list[str] = []
    arc_rows: list[dict[str, Any]] = []
    fractions: list[dict[str, float]] = []
    loop_start = time.perf_counter()
    with _torch_threads(1), ThreadPoolExecutor(max_workers=2) as pool:
        writer = PooledWriter(pool)
        for k in tqdm(range(int(subjects)), desc="synthetic subjects", unit="subj", disable=not progress):
            folder, subject = write_qmri(out, k, template, seed, writer)
            qmri_dirs.append(str(folder))
            fractions.append(subject.fractions)
            site_model = site_models[IXI_SITES[k % len(IXI_SITES)]]
            name, subject = write_ixi(out, k, template, seed, writer, image_model=site_model)
            ixi_names.append(name)
            fractions.append(subject.fractions)
            arc_rows.append(write_arc(out, k, template, seed, writer))
            writer.wait()
        loop_seconds = time.perf_counter() - loop_start
        if subjects:
            write_arc_metadata(out, arc_rows, writer)
        writer.wait()
    summary: dict[str, object] = {
        "out_dir": str(out),
        "seed": int(seed),
        "resolution_mm": float(resolution),
        "shape": list(template.shape),
        "subjects": int(subjects),
        "qmri": qmri_dirs,
        "qmri_stroke": [qmri_subject_id(k) for k in range(int(subjects)) if is_stroke_qmri(k)],
        "ixi": len(ixi_names),
        "ixi_subjects": ixi_names,
        "ixi_sites": {s: sum(f"-{s}-" in n for n in ixi_names) for s in IXI_SITES},
        "ixi_image_models": site_models,
        "arc": len(arc_rows),
        "arc_sessions": sum(len(r["sessions"]) for r in arc_rows),
        "arc_subjects": arc_rows,
        "tissue_fractions": {t: float(np.mean([f[t] for f in fractions])) for t in TISSUES} if fractions else {},
        "files": len(writer.written),
        "preview": None,
    }
    if preview and subjects:
        with _torch_threads(1):
            path = write_preview(out, qmri_dirs, ixi_names, arc_rows, int(seed), float(resolution))
        summary["preview"] = str(path)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["seconds_per_subject"] = round(loop_seconds / max(int(subjects), 1), 3)
    return summary

"""Tests of the embedded synthetic data generator, its preview and the qMRI unit handling (CPU, 4 mm voxels)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.data import synthetic
from custom.data.preview import write_montage
from custom.data.qmri_units import detect_units, to_si

RES = 4.0
SUBJECTS = 3
IXI_NAME = re.compile(r"^IXI\d{3}-(Guys|HH|IOP)-\d{4}-(T1|T2|PD)\.nii\.gz$")
BIDS_NAME = re.compile(r"^(sub-M2\d{3})_(ses-\d{4})_(T1w|T2w|FLAIR)\.nii\.gz$")
LESION_NAME = re.compile(r"^sub-M2\d{3}_ses-\d{4}_desc-lesion_mask\.nii\.gz$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    summary = synthetic.generate_dataset(out, subjects=SUBJECTS, seed=0, resolution=RES, preview=True, progress=False)
    return out, summary


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _niftis(root: Path) -> list[Path]:
    return sorted(root.rglob("*.nii.gz"))


def _ixi(out: Path, name: str, contrast: str) -> np.ndarray:
    return _load(out / "ixi" / f"IXI-{contrast}" / f"{name}-{contrast}.nii.gz").astype(np.float64)


def test_summary_counts(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    assert summary["subjects"] == SUBJECTS
    assert [Path(p).name for p in summary["qmri"]] == ["sub-001", "sub-002", "sub-003"]
    assert summary["qmri_stroke"] == ["sub-002"]
    assert summary["ixi"] == SUBJECTS and summary["ixi_sites"] == {"Guys": 1, "HH": 1, "IOP": 1}
    assert summary["arc"] == SUBJECTS and summary["arc_sessions"] == SUBJECTS + 1  # subject 0 has two sessions
    assert summary["files"] > 0 and summary["seconds"] > 0
    json.dumps(summary)  # the CLI prints it
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "preview.png").stat().st_mode & 0o777 == 0o666 & ~umask  # atomic writes keep usual permissions
    assert (Path(summary["qmri"][0]) / "sub-001_PD.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_names(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    for contrast in ("T1", "T2", "PD"):
        names = sorted(p.name for p in (out / "ixi" / f"IXI-{contrast}").iterdir())
        assert len(names) == SUBJECTS and all(IXI_NAME.match(n) for n in names), names
        assert [n.split("-")[1] for n in names] == ["Guys", "HH", "IOP"]
    for name in summary["ixi_subjects"]:
        assert (out / "ixi" / "labels" / f"{name}_labels.nii.gz").is_file()
    anat = [p for p in _niftis(out / "arc") if "derivatives" not in p.parts]
    assert len(anat) == 3 * (SUBJECTS + 1)
    for path in anat:
        m = BIDS_NAME.match(path.name)
        assert m, path.name
        assert path.parent.name == "anat" and path.parent.parent.name == m.group(2)
        assert path.parent.parent.parent.name == m.group(1)
    lesions = _niftis(out / "arc" / "derivatives" / "lesion_masks")
    assert len(lesions) == SUBJECTS + 1 and all(LESION_NAME.match(p.name) for p in lesions)
    assert sorted(p.name for p in (out / "arc").glob("sub-M2001/ses-*")) == sorted(
        summary["arc_subjects"][0]["sessions"]
    )
    description = json.loads((out / "arc" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and "BIDSVersion" in description
    rows = (out / "arc" / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t")[0] == "participant_id" and len(rows) == SUBJECTS + 1
    qmri = sorted(p.name for p in (out / "qmri" / "sub-002").iterdir())
    expected = [f"sub-002_{k}.nii.gz" for k in ("MT", "PD", "R1", "R2", "R2s", "labels", "lesion", "mask")]
    assert qmri == sorted(expected)
    assert not (out / "qmri" / "sub-001" / "sub-001_lesion.nii.gz").exists()


def test_shapes_affines_dtypes(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    shape = tuple(synthetic.load_template(RES).shape)
    assert shape == tuple(summary["shape"]) == (49, 58, 47)
    reference = None
    for path in _niftis(out):
        img = nib.load(str(path))
        assert img.shape == shape, path
        assert np.allclose(img.header.get_zooms()[:3], (RES,) * 3), path
        assert abs(np.linalg.det(img.affine)) > 1e-6
        assert np.allclose(np.diag(img.affine)[:3], RES) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
        if reference is None:
            reference = img.affine
        assert np.allclose(img.affine, reference), path
        integer = any(tag in path.name for tag in ("labels", "mask", "lesion"))
        assert img.get_data_dtype() == (np.uint8 if integer else np.float32), path


def test_labels_and_tissue_fractions(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    label_files = list((out / "qmri").rglob("*_labels.nii.gz")) + list((out / "ixi" / "labels").iterdir())
    assert len(label_files) == 2 * SUBJECTS
    for path in label_files:
        labels = _load(path)
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}, path
        brain = np.count_nonzero(labels)
        gm, wm, csf = (np.count_nonzero(labels == k) / brain for k in (1, 2, 3))
        assert 0.40 <= gm <= 0.65 and 0.25 <= wm <= 0.45 and 0.04 <= csf <= 0.25, (path, gm, wm, csf)
        assert 900 <= brain * RES**3 / 1000 <= 2600, "brain volume (mL) implausible"
    for tissue, value in summary["tissue_fractions"].items():
        low, high = synthetic.PLAUSIBLE_FRACTIONS[tissue]
        assert low <= value <= high, (tissue, value)


def test_determinism(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = dataset
    again = synthetic.generate_dataset(tmp_path / "same", subjects=1, seed=0, resolution=RES, progress=False)
    other = synthetic.generate_dataset(tmp_path / "other", subjects=1, seed=1, resolution=RES, progress=False)
    assert again["ixi_subjects"][0] == summary["ixi_subjects"][0]
    files = [p.relative_to(tmp_path / "same") for p in _niftis(tmp_path / "same")]
    assert len(files) > 10
    for rel in files:  # subject 0 does not depend on how many subjects are generated
        assert np.array_equal(_load(tmp_path / "same" / rel), _load(out / rel)), rel
    rel = Path("qmri/sub-001/sub-001_PD.nii.gz")
    assert not np.array_equal(_load(tmp_path / "other" / rel), _load(out / rel))
    name0, name1 = summary["ixi_subjects"][0], other["ixi_subjects"][0]
    assert not np.array_equal(_ixi(tmp_path / "other", name1, "T1"), _ixi(out, name0, "T1"))


def test_qmri_units_on_disk(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    folder = out / "qmri" / "sub-001"
    labels = _load(folder / "sub-001_labels.nii.gz")
    pd_percent = _load(folder / "sub-001_PD.nii.gz")
    assert 60 < np.percentile(pd_percent[labels > 0], 99) <= 100.5
    pd, description = to_si(pd_percent, "PD", path=folder / "sub-001_PD.nii.gz")
    assert "percent" in description and "sub-001_PD" in description
    assert pd.max() <= 1.0 + 1e-6 and 0.6 < np.median(pd[labels == 2]) < 0.8
    mt, description = to_si(_load(folder / "sub-001_MT.nii.gz"), "MT")
    assert "percent" in description and 0.01 < np.median(mt[labels == 2]) < 0.025
    for kind, lo, hi in (("R1", 0.85, 1.25), ("R2s", 17.0, 26.0), ("R2", 11.0, 15.0)):
        rate, description = to_si(_load(folder / f"sub-001_{kind}.nii.gz"), kind)
        assert "units 1/s" in description and lo < np.median(rate[labels == 2]) < hi, kind


def test_ixi_contrasts(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    for name in summary["ixi_subjects"]:
        labels = _load(out / "ixi" / "labels" / f"{name}_labels.nii.gz")
        t1, t2, pdw = (_ixi(out, name, c) for c in ("T1", "T2", "PD"))
        gm, wm, csf = (t1[labels == k].mean() for k in (1, 2, 3))
        assert wm > gm > csf, (name, "T1", wm, gm, csf)
        gm, wm, csf = (t2[labels == k].mean() for k in (1, 2, 3))
        assert csf > gm > wm, (name, "T2", csf, gm, wm)
        assert pdw[labels == 1].mean() > pdw[labels == 2].mean()
        air = t1[labels == 0]
        assert 0 < air.mean() < 0.1 * t1[labels == 2].mean(), "air should hold noise only"
        assert 300 < np.percentile(t1[labels > 0], 99) < 3000, "scanner-like intensity scale"


def test_lesions(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    template = synthetic.load_template(RES)
    for k, row in enumerate(summary["arc_subjects"]):
        sid = row["participant_id"]
        assert 0.3 < row["lesion_ml"] < 30
        # the subject's anatomy, replayed from its seed, gives the tissue labels the ARC layout does not store
        subject = synthetic.make_subject(template, synthetic.subject_rng(0, "arc", k), stroke=True)
        near = ndimage.distance_transform_edt(subject.lesion_mask == 0) * RES < 20.0  # bias-field-fair reference
        wm = (subject.labels == 2) & (subject.lesion == 0) & near
        for ses in row["sessions"]:
            anat = out / "arc" / sid / ses / "anat"
            lesion = (
                _load(
                    out / "arc/derivatives/lesion_masks" / sid / ses / "anat" / f"{sid}_{ses}_desc-lesion_mask.nii.gz"
                )
                > 0
            )
            assert lesion.any() and np.array_equal(lesion, subject.lesion_mask > 0)
            flair, t1w, t2w = (
                _load(anat / f"{sid}_{ses}_{c}.nii.gz").astype(np.float64) for c in ("FLAIR", "T1w", "T2w")
            )
            assert flair[lesion].mean() > flair[wm].mean(), (sid, ses, "FLAIR")
            assert flair[subject.labels == 3].mean() < flair[wm].mean(), (sid, ses, "FLAIR CSF")
            assert t2w[lesion].mean() > t2w[wm].mean(), (sid, ses, "T2w")
            assert t1w[lesion].mean() < t1w[wm].mean(), (sid, ses, "T1w")
    lesion = _load(out / "qmri" / "sub-002" / "sub-002_lesion.nii.gz")
    assert lesion.any() and set(np.unique(lesion).tolist()) == {0, 1}


def test_preview_png(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    path = Path(summary["preview"])
    assert path == out / "preview.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 600
    assert len(data) > 100_000


def test_write_montage_atomic(tmp_path: Path) -> None:
    vol = np.random.default_rng(0).random((20, 24, 18)).astype(np.float32)
    mask = np.zeros_like(vol)
    mask[5:9, 6:10, 4:8] = 1
    path = write_montage(tmp_path / "m.png", {"a": vol, "b": vol * 2}, title="t", outlines={"b": mask}, columns=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_qmri_units_detection() -> None:
    rng = np.random.default_rng(0)
    pd_fraction = rng.uniform(0.6, 1.0, 1000)
    out, description = to_si(pd_fraction * 100.0, "PD", path="sub_PD.nii")
    assert "percent" in description and np.allclose(out, pd_fraction)
    out, description = to_si(pd_fraction, "pd")
    assert "fraction" in description and np.allclose(out, pd_fraction)
    r2s = rng.uniform(10.0, 40.0, 1000)
    out, description = to_si(r2s / 1000.0, "R2s", path="old_R2s.nii")
    assert "1/ms" in description and np.allclose(out, r2s, rtol=1e-6)
    assert detect_units(r2s, "R2*")[0] == "1/s"
    assert detect_units(np.array([0.0, 0.8, 1.0]), "R1")[0] == "1/s"


def test_qmri_units_explicit_and_times() -> None:
    t1_ms = np.array([0.0, 1000.0, 2000.0, -5.0], dtype=np.float32)
    out, description = to_si(t1_ms, "R1", units="ms")
    assert np.allclose(out, [0.0, 1.0, 0.5, 0.0]) and "inverted" in description
    out, _ = to_si(np.array([0.0, 0.08, 0.1]), "R2", units="s")
    assert np.allclose(out, [0.0, 12.5, 10.0])
    out, _ = to_si(np.array([1.5, np.nan]), "MT", units="percent")
    assert np.allclose(out, [0.015, 0.0])
    with pytest.raises(ValueError, match="do not apply"):
        to_si(np.ones(3), "PD", units="1/s")
    with pytest.raises(ValueError, match="unknown qMRI map kind"):
        to_si(np.ones(3), "T2")


def test_qmri_units_nonsense_range_names_file() -> None:
    with pytest.raises(ValueError) as info:
        to_si(np.full(100, 5000.0), "PD", path="/data/sub-01/sub-01_PD.nii.gz")
    message = str(info.value)
    assert "/data/sub-01/sub-01_PD.nii.gz" in message and "PD" in message and "5000" in message
    with pytest.raises(ValueError, match="odd_R2s.nii"):
        to_si(np.full(100, 0.5), "R2s", path="odd_R2s.nii")
    with pytest.raises(ValueError, match="no nonzero"):
        to_si(np.zeros(10), "R1", path="empty_R1.nii")

"""IXI datalists: name parsing, the paper's site-based splits, nested training subsets and clear input errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.data.ixi import (
    CONTRASTS,
    IXIDatasetError,
    ixi_datalist,
    parse_ixi_name,
    scan_ixi,
    split_gst_subjects,
    split_sizes,
    write_datalist,
)
from custom.errors import InputError

SITE_NAMES = {"GST": "Guys", "HH": "HH", "IOP": "IOP"}


def _nifti(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4)), str(path))


def subject_ids(n_gst: int, n_hh: int = 0, n_iop: int = 0) -> list[str]:
    """IXI-style ids: ``IXI{NNN}-{Site}-{NNNN}``, numbers running over all sites."""
    ids = []
    for site, n in (("Guys", n_gst), ("HH", n_hh), ("IOP", n_iop)):
        for _ in range(n):
            k = len(ids) + 2
            ids.append(f"IXI{k:03d}-{site}-{(7 * k) % 10000:04d}")
    return ids


def fake_ixi(
    root: Path,
    subjects: list[str],
    contrasts: tuple[str, ...] = CONTRASTS,
    labels: bool = True,
    label_pattern: str = "{subject}_labels.nii.gz",
) -> Path:
    """Tiny IXI folder: ``IXI-{contrast}/{subject}-{contrast}.nii.gz`` (+ labels); content is irrelevant."""
    for contrast in contrasts:
        for subject in subjects:
            _nifti(root / f"IXI-{contrast}" / f"{subject}-{contrast}.nii.gz")
            if labels:
                name = label_pattern.format(subject=subject, id=subject.split("-")[0], contrast=contrast)
                _nifti(root / "labels" / name)
    return root


def subjects_of(items: list[dict]) -> set[str]:
    return {item["subject"] for item in items}


# ---------------------------------------------------------------------------------------------------------------
# names and scanning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IXI002-Guys-0828-T1.nii.gz", ("IXI002-Guys-0828", "002", "GST", "T1")),
        ("IXI012-HH-1211-T2.nii.gz", ("IXI012-HH-1211", "012", "HH", "T2")),
        ("IXI025-IOP-0869-PD.nii", ("IXI025-IOP-0869", "025", "IOP", "PD")),
        ("/some/dir/IXI100-Guys-0001-T1.nii.gz", ("IXI100-Guys-0001", "100", "GST", "T1")),
    ],
)
def test_parse_ixi_name(name, expected):
    assert parse_ixi_name(name) == expected


@pytest.mark.parametrize(
    "name",
    ["IXI002-Mars-0828-T1.nii.gz", "sub-01_T1w.nii.gz", "IXI002-Guys-0828-T1.txt", "README", "IXI-Guys-0828-T1.nii"],
)
def test_parse_rejects_other_names(name):
    assert parse_ixi_name(name) is None


def test_scan_skips_and_logs_bad_names(tmp_path, caplog):
    root = fake_ixi(tmp_path / "ixi", subject_ids(2, 1, 1), contrasts=("T1",))
    _nifti(root / "IXI-T1" / "IXI099-Mars-0001-T1.nii.gz")
    (root / "IXI-T1" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="custom.data.ixi"):
        items = scan_ixi(root, "T1")
    assert [i["site"] for i in items] == ["GST", "GST", "HH", "IOP"]
    assert all(set(i) == {"image", "label", "subject", "site", "contrast"} for i in items)
    assert "IXI099-Mars-0001-T1.nii.gz" in caplog.text and "notes.txt" in caplog.text


def test_scan_accepts_the_image_folder_itself(tmp_path):
    root = tmp_path / "flat"
    for subject in subject_ids(3):
        _nifti(root / f"{subject}-T1.nii.gz")
        _nifti(root / f"{subject}-T2.nii.gz")
    items = scan_ixi(root, "T2")
    assert len(items) == 3 and all(i["image"].endswith("-T2.nii.gz") and "label" not in i for i in items)


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(IXIDatasetError, match="nowhere") as info:
        ixi_datalist(missing)
    assert isinstance(info.value, InputError)
    assert "IXI002-Guys-0828-T1.nii.gz" in str(info.value)
    with pytest.raises(IXIDatasetError, match="nowhere"):
        scan_ixi(missing, "T1")


def test_folder_without_images_names_expected_files(tmp_path):
    root = fake_ixi(tmp_path / "ixi", subject_ids(3), contrasts=("T1",))
    with pytest.raises(IXIDatasetError, match=r"no IXI PD images.*IXI002-Guys-0828-PD\.nii\.gz"):
        ixi_datalist(root, contrast="PD")


# ---------------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------------


def test_paper_split_sizes_and_out_of_domain_sites(tmp_path):
    ids = subject_ids(322, 5, 4)
    root = fake_ixi(tmp_path / "ixi", ids, contrasts=("T1",))
    datalist = ixi_datalist(root)
    assert (len(datalist["training"]), len(datalist["validation"])) == (226, 31)
    test_sites = [i["site"] for i in datalist["test"]]
    assert test_sites.count("GST") == 65 and test_sites.count("HH") == 5 and test_sites.count("IOP") == 4
    assert {i["site"] for i in datalist["training"] + datalist["validation"]} == {"GST"}
    assert datalist["fractions"] == {"0.01": 3, "0.1": 23, "1.0": 226}
    everything = [datalist["training"], datalist["validation"], datalist["test"]]
    assert sum(len(part) for part in everything) == len(ids)
    assert set.union(*(subjects_of(p) for p in everything)) == set(ids)


def test_split_sizes():
    assert split_sizes(322) == (226, 31, 65)
    assert split_sizes(400) == (226, 31, 143)
    assert split_sizes(20) == (14, 2, 4)
    for n in range(3, 322):
        train, val, test = split_sizes(n)
        assert train + val + test == n and min(train, val, test) >= 1
    assert split_sizes(2) == (1, 1, 0)
    assert split_sizes(1) == (1, 0, 0)
    assert split_sizes(0) == (0, 0, 0)


def test_proportional_split_with_few_subjects(tmp_path):
    root = fake_ixi(tmp_path / "ixi", subject_ids(20, 2, 2), contrasts=("T1",))
    datalist = ixi_datalist(root)
    n_train, n_val, _ = split_sizes(20)
    assert len(datalist["training"]) == n_train and len(datalist["validation"]) == n_val >= 1
    assert sum(i["site"] == "GST" for i in datalist["test"]) >= 1
    parts = [subjects_of(datalist[k]) for k in ("training", "validation", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_split_is_by_subject_across_contrasts(tmp_path):
    ids = subject_ids(30, 3, 3)
    root = fake_ixi(tmp_path / "ixi", ids)
    # a subject without a PD image must not shift the other subjects' splits
    (root / "IXI-PD" / f"{ids[4]}-PD.nii.gz").unlink()
    lists = {c: ixi_datalist(root, contrast=c, seed=3) for c in CONTRASTS}
    for part in ("training", "validation", "test"):
        t1, t2, pd = (subjects_of(lists[c][part]) for c in CONTRASTS)
        assert t1 == t2 and pd == t1 - {ids[4]}
    assert all(i["contrast"] == "PD" and i["image"].endswith("-PD.nii.gz") for i in lists["PD"]["test"])


def test_nested_training_subsets(tmp_path):
    root = fake_ixi(tmp_path / "ixi", subject_ids(60), contrasts=("T1",))
    subsets = {f: subjects_of(ixi_datalist(root, fraction=f, seed=1)["training"]) for f in (0.01, 0.1, 1.0)}
    assert 1 <= len(subsets[0.01]) < len(subsets[0.1]) < len(subsets[1.0])
    assert subsets[0.01] <= subsets[0.1] <= subsets[1.0]
    counts = ixi_datalist(root, fraction=0.1, seed=1)["fractions"]
    assert counts == {k: len(subsets[float(k)]) for k in ("0.01", "0.1", "1.0")}
    validation = [subjects_of(ixi_datalist(root, fraction=f, seed=1)["validation"]) for f in (0.01, 1.0)]
    assert validation[0] == validation[1]


def test_determinism_and_seed(tmp_path):
    root = fake_ixi(tmp_path / "ixi", subject_ids(20), contrasts=("T1",))
    assert ixi_datalist(root, seed=0) == ixi_datalist(root, seed=0)
    assert split_gst_subjects(subject_ids(20), 0) == split_gst_subjects(reversed(subject_ids(20)), 0)
    a, b = ixi_datalist(root, seed=0), ixi_datalist(root, seed=1)
    assert subjects_of(a["validation"]) | subjects_of(a["test"]) != subjects_of(b["validation"]) | subjects_of(
        b["test"]
    )


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, "half"])
def test_fraction_must_be_in_unit_interval(tmp_path, fraction):
    root = fake_ixi(tmp_path / "ixi", subject_ids(3), contrasts=("T1",))
    with pytest.raises(IXIDatasetError, match="fraction"):
        ixi_datalist(root, fraction=fraction)


# ---------------------------------------------------------------------------------------------------------------
# labels and JSON
# ---------------------------------------------------------------------------------------------------------------


def test_label_pattern_with_contrast_and_own_folder(tmp_path):
    pattern = "{subject}-{contrast}_seg.nii.gz"
    ids = subject_ids(6, 1)
    root = fake_ixi(tmp_path / "ixi", ids, labels=False)
    for contrast in ("T1", "T2"):
        for subject in ids:
            _nifti(tmp_path / "spm" / f"{subject}-{contrast}_seg.nii.gz")
    datalist = ixi_datalist(root, contrast="T2", labels_dir=tmp_path / "spm", label_pattern=pattern)
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert all(Path(i["label"]).name == f"{i['subject']}-T2_seg.nii.gz" for i in items)
    by_id = scan_ixi(root, "T1", labels_dir=tmp_path / "spm", label_pattern="{id}.nii.gz")
    assert all("label" not in i for i in by_id)
    with pytest.raises(IXIDatasetError, match="placeholders"):
        ixi_datalist(root, label_pattern="{patient}.nii.gz")


def test_missing_training_label_names_image_and_label(tmp_path):
    ids = subject_ids(10)
    root = fake_ixi(tmp_path / "ixi", ids, contrasts=("T1",))
    for path in (root / "labels").iterdir():
        path.unlink()
    with pytest.raises(IXIDatasetError) as info:
        ixi_datalist(root)
    message = str(info.value)
    assert "-T1.nii.gz" in message and "_labels.nii.gz" in message and str(root / "labels") in message
    relaxed = ixi_datalist(root, require_labels=False)
    assert all("label" not in i for i in relaxed["training"])


def test_test_images_without_labels_are_kept(tmp_path, caplog):
    ids = subject_ids(6, 2, 2)
    root = fake_ixi(tmp_path / "ixi", ids, contrasts=("T1",))
    for subject in ids[6:]:  # HH and IOP: no labels
        (root / "labels" / f"{subject}_labels.nii.gz").unlink()
    with caplog.at_level(logging.WARNING, logger="custom.data.ixi"):
        datalist = ixi_datalist(root)
    unlabelled = [i for i in datalist["test"] if "label" not in i]
    assert {i["site"] for i in unlabelled} == {"HH", "IOP"} and len(unlabelled) == 4
    assert "inference only" in caplog.text


def test_json_is_written_and_rereadable(tmp_path):
    root = fake_ixi(tmp_path / "ixi", subject_ids(8, 2, 1), contrasts=("T1",))
    target = tmp_path / "out" / "ixi_T1.json"
    datalist = ixi_datalist(root, fraction=0.1, output_json=target)
    assert json.loads(target.read_text()) == datalist
    other = write_datalist({"training": [], "validation": []}, tmp_path / "plain.json")
    assert json.loads(other.read_text()) == {"training": [], "validation": []}
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_missing_named_folder_is_not_synthesised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IXIDatasetError, match="missing"):
        ixi_datalist(tmp_path / "mine" / "ixi")
    assert not (tmp_path / "data").exists()


def test_synthetic_layout(tmp_path):
    from custom.data.synthetic import generate_dataset

    summary = generate_dataset(tmp_path, subjects=6, seed=0, resolution=6.0, progress=False)
    datalists = {c: ixi_datalist(tmp_path / "ixi", contrast=c) for c in CONTRASTS}
    t1 = datalists["T1"]
    assert len(t1["training"]) == 1 and len(t1["validation"]) == 1
    assert sorted(i["site"] for i in t1["test"]) == ["HH", "HH", "IOP", "IOP"]
    items = t1["training"] + t1["validation"] + t1["test"]
    assert sorted(i["subject"] for i in items) == sorted(summary["ixi_subjects"])
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    for c in ("T2", "PD"):
        assert subjects_of(datalists[c]["training"]) == subjects_of(t1["training"])


def test_default_root_is_synthesised_when_missing(tmp_path, monkeypatch, capsys):
    import custom.data.synthetic as synthetic

    calls = []

    def fake_generate(out_dir, subjects, seed, resolution, **kwargs):
        calls.append((Path(out_dir), subjects, seed, resolution))
        fake_ixi(Path(out_dir) / "ixi", subject_ids(3, 1, 1))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synthetic, "generate_dataset", fake_generate)
    datalist = ixi_datalist("data/synthetic/ixi", seed=2)
    assert calls == [(Path("data/synthetic"), 24, 2, 2.0)]
    assert "synthetic" in capsys.readouterr().out
    assert len(datalist["training"]) == 1 and len(datalist["test"]) == 3
    ixi_datalist("data/synthetic/ixi", seed=2)  # present now: not generated again
    assert len(calls) == 1

"""ARC datalists: BIDS scanning, image-mask matching by subject and session, subject-level splits of the paper's
sizes, nested training subsets and clear input errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.data.arc import (
    CONTRASTS,
    PAPER_SPLITS,
    ARCDatasetError,
    arc_datalist,
    parse_entities,
    scan_arc,
    split_sizes,
    split_subjects,
)
from custom.errors import InputError

MASKS = Path("derivatives") / "lesion_masks"


def _nifti(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.uint8), np.eye(4)), str(path))


def subject_ids(n: int) -> list[str]:
    return [f"sub-M2{k + 1:03d}" for k in range(n)]


def sessions_of(subject: str, n_sessions: int) -> list[str]:
    """Distinct session ids per subject (``ses-NNNN``), so a wrong-session match would be visible."""
    number = int(subject[-3:])
    return [f"ses-{(37 * number + 101 * s) % 9000 + 100:04d}" for s in range(n_sessions)]


def fake_arc(
    root: Path,
    n_subjects: int,
    contrasts: tuple[str, ...] = CONTRASTS,
    two_sessions: tuple[int, ...] = (),
    masks: bool = True,
) -> Path:
    """Tiny ARC BIDS tree: subjects ``sub-M2001...``, one session each (two for indices in ``two_sessions``),
    every contrast per session and a lesion mask per session under ``derivatives/lesion_masks``."""
    for k, subject in enumerate(subject_ids(n_subjects)):
        for session in sessions_of(subject, 2 if k in two_sessions else 1):
            for contrast in contrasts:
                _nifti(root / subject / session / "anat" / f"{subject}_{session}_{contrast}.nii.gz")
            if masks:
                name = f"{subject}_{session}_desc-lesion_mask.nii.gz"
                _nifti(root / MASKS / subject / session / "anat" / name)
    return root


def subjects_of(items: list[dict]) -> set[str]:
    return {item["subject"] for item in items}


def all_items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


# ---------------------------------------------------------------------------------------------------------------
# scanning and mask matching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("sub-M2001/ses-1253/anat/sub-M2001_ses-1253_T1w.nii.gz", ("sub-M2001", "ses-1253")),
        ("sub-M2001/ses-1253/anat/sub-M2001_ses-1253_acq-spc_run-7_T2w.nii", ("sub-M2001", "ses-1253")),
        ("masks/sub-M2002/ses-0042/lesion_mask.nii.gz", ("sub-M2002", "ses-0042")),
        ("sub-M2003/anat/sub-M2003_desc-lesion_mask.nii.gz", ("sub-M2003", "")),
        ("other/lesion_mask.nii.gz", (None, "")),
    ],
)
def test_parse_entities(path, expected):
    assert parse_entities(path) == expected


def test_images_are_matched_to_the_mask_of_their_subject_and_session(tmp_path):
    root = fake_arc(tmp_path / "arc", 4, two_sessions=(0, 2))
    items = scan_arc(root, "T2w")
    assert len(items) == 6
    assert all(set(i) == {"image", "label", "subject", "session", "contrast"} for i in items)
    for item in items:
        image, label = Path(item["image"]), Path(item["label"])
        assert image.name == f"{item['subject']}_{item['session']}_T2w.nii.gz"
        assert label.name == f"{item['subject']}_{item['session']}_desc-lesion_mask.nii.gz"
        assert label.parent.parts[-3:] == (item["subject"], item["session"], "anat")
    # a mask of another session of the same subject is never used
    subject = subject_ids(1)[0]
    first, second = sessions_of(subject, 2)
    (root / MASKS / subject / second / "anat" / f"{subject}_{second}_desc-lesion_mask.nii.gz").unlink()
    by_session = {i["session"]: i for i in scan_arc(root, "T2w") if i["subject"] == subject}
    assert "label" in by_session[first] and "label" not in by_session[second]


def test_scan_tolerates_no_session_level_nii_and_other_entities(tmp_path, caplog):
    root = tmp_path / "arc"
    _nifti(root / "sub-M2001" / "anat" / "sub-M2001_acq-tfl_run-2_T1w.nii")
    _nifti(root / MASKS / "sub-M2001" / "anat" / "sub-M2001_desc-lesion_mask.nii.gz")
    _nifti(root / "sub-M2002" / "ses-0100" / "anat" / "sub-M2002_ses-0100_T1w.nii.gz")
    _nifti(root / "sub-M2002" / "ses-0100" / "anat" / "sub-M2002_ses-0100_T2w.nii.gz")
    _nifti(root / "sub-M2002" / "ses-0100" / "anat" / "sub-M9999_ses-0100_T1w.nii.gz")  # wrong subject folder
    (root / "sub-M2002" / "ses-0100" / "anat" / "sub-M2002_ses-0100_T1w.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="custom.data.arc"):
        items = scan_arc(root, "t1w")
    assert [(i["subject"], i["session"], i["contrast"]) for i in items] == [
        ("sub-M2001", "", "T1w"),
        ("sub-M2002", "ses-0100", "T1w"),
    ]
    assert Path(items[0]["label"]).name == "sub-M2001_desc-lesion_mask.nii.gz" and "label" not in items[1]
    assert "sub-M9999_ses-0100_T1w.nii.gz" in caplog.text


def test_contrast_specific_masks_are_told_apart(tmp_path):
    root = fake_arc(tmp_path / "arc", 3, masks=False)
    for subject in subject_ids(3):
        session = sessions_of(subject, 1)[0]
        for space in ("T1w", "T2w"):
            _nifti(
                root / MASKS / subject / session / "anat" / f"{subject}_{session}_space-{space}_desc-lesion_mask.nii"
            )
    assert all("space-T1w" in i["label"] for i in scan_arc(root, "T1w"))
    assert all("space-T2w" in i["label"] for i in scan_arc(root, "T2w"))
    with pytest.raises(ARCDatasetError, match="2 lesion masks.*mask_pattern"):
        scan_arc(root, "FLAIR")


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ARCDatasetError, match="nowhere") as info:
        arc_datalist(missing)
    assert isinstance(info.value, InputError)
    assert "sub-*/ses-*/anat/*_T1w.nii" in str(info.value)
    with pytest.raises(ARCDatasetError, match="nowhere.*does not exist"):
        scan_arc(missing, "T1w")


def test_folder_without_images_names_expected_files(tmp_path):
    root = fake_arc(tmp_path / "arc", 3, contrasts=("T1w",))
    with pytest.raises(ARCDatasetError, match=r"no ARC FLAIR images.*sub-M2001_ses-1253_FLAIR\.nii\.gz"):
        arc_datalist(root, contrast="FLAIR")
    with pytest.raises(ARCDatasetError, match="unknown ARC contrast"):
        arc_datalist(root, contrast="PD")


# ---------------------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------------------


def test_split_sizes():
    for contrast, paper in PAPER_SPLITS.items():
        total = sum(paper)
        assert split_sizes(total, contrast) == paper
        assert split_sizes(total + 7, contrast) == (paper[0], paper[1], paper[2] + 7)
        for n in range(3, total):
            train, val, test = split_sizes(n, contrast)
            assert train + val + test == n and min(train, val, test) >= 1
    assert split_sizes(20, "T1w") == (14, 2, 4)
    assert split_sizes(2, "FLAIR") == (1, 1, 0)
    assert split_sizes(1, "T2w") == (1, 0, 0)
    assert split_sizes(0) == (0, 0, 0)


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_paper_split_sizes_with_enough_subjects(tmp_path, contrast):
    n = sum(PAPER_SPLITS[contrast])
    root = fake_arc(tmp_path / "arc", n, contrasts=(contrast,), two_sessions=(1, 5, 9))
    datalist = arc_datalist(root, contrast=contrast)
    sizes = tuple(len(subjects_of(datalist[k])) for k in ("training", "validation", "test"))
    assert sizes == PAPER_SPLITS[contrast]
    assert len(all_items(datalist)) == n + 3  # the second sessions come along, not counted as subjects
    assert datalist["fractions"]["1.0"] == PAPER_SPLITS[contrast][0]
    assert all(i["contrast"] == contrast and i["image"].endswith(f"_{contrast}.nii.gz") for i in all_items(datalist))


def test_proportional_split_with_few_subjects(tmp_path):
    root = fake_arc(tmp_path / "arc", 12, contrasts=("FLAIR",), two_sessions=(0, 3, 6, 9))
    datalist = arc_datalist(root, contrast="FLAIR")
    parts = [subjects_of(datalist[k]) for k in ("training", "validation", "test")]
    assert tuple(len(p) for p in parts) == split_sizes(12, "FLAIR") and min(len(p) for p in parts) >= 1
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(subject_ids(12)) and len(all_items(datalist)) == 16


def test_a_subject_with_two_sessions_stays_in_one_split(tmp_path):
    two = (0, 1, 2, 3, 4, 5, 6, 7)
    root = fake_arc(tmp_path / "arc", 16, contrasts=("T1w",), two_sessions=two)
    for seed in range(8):
        datalist = arc_datalist(root, seed=seed)
        where = {}
        for part in ("training", "validation", "test"):
            for item in datalist[part]:
                assert where.setdefault(item["subject"], part) == part, f"{item['subject']} spans two splits"
        for k in two:
            subject = subject_ids(16)[k]
            sessions = {i["session"] for i in datalist[where[subject]] if i["subject"] == subject}
            assert sessions == set(sessions_of(subject, 2))
        assert set(where.values()) == {"training", "validation", "test"}
    assert split_subjects(["b", "a", "a", "c"], "T1w", 0) == split_subjects(["c", "b", "a"], "T1w", 0)


def test_nested_training_subsets(tmp_path):
    root = fake_arc(tmp_path / "arc", 60, contrasts=("T2w",), two_sessions=(2, 4))
    subsets = {f: subjects_of(arc_datalist(root, "T2w", fraction=f, seed=1)["training"]) for f in (0.01, 0.1, 1.0)}
    assert 1 <= len(subsets[0.01]) < len(subsets[0.1]) < len(subsets[1.0])
    assert subsets[0.01] <= subsets[0.1] <= subsets[1.0]
    counts = arc_datalist(root, "T2w", fraction=0.1, seed=1)["fractions"]
    assert counts == {k: len(subsets[float(k)]) for k in ("0.01", "0.1", "1.0")}
    others = [arc_datalist(root, "T2w", fraction=f, seed=1) for f in (0.01, 1.0)]
    assert others[0]["validation"] == others[1]["validation"] and others[0]["test"] == others[1]["test"]


def test_determinism_and_seed(tmp_path):
    root = fake_arc(tmp_path / "arc", 20, contrasts=("T1w",), two_sessions=(0, 3))
    assert arc_datalist(root, seed=0) == arc_datalist(root, seed=0)
    a, b = arc_datalist(root, seed=0), arc_datalist(root, seed=1)
    assert subjects_of(a["validation"] + a["test"]) != subjects_of(b["validation"] + b["test"])
    ids = subject_ids(20)
    assert split_subjects(ids, "T1w", 3) == split_subjects(list(reversed(ids)), "T1w", 3)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, "half"])
def test_fraction_must_be_in_unit_interval(tmp_path, fraction):
    root = fake_arc(tmp_path / "arc", 3, contrasts=("T1w",))
    with pytest.raises(ARCDatasetError, match="fraction"):
        arc_datalist(root, fraction=fraction)


# ---------------------------------------------------------------------------------------------------------------
# masks and JSON
# ---------------------------------------------------------------------------------------------------------------


def test_missing_masks_are_a_clear_error(tmp_path):
    root = fake_arc(tmp_path / "arc", 6, contrasts=("T1w",), masks=False)
    with pytest.raises(ARCDatasetError) as info:
        arc_datalist(root)
    message = str(info.value)
    assert "_T1w.nii.gz" in message and str(root / "derivatives") in message and "does not exist" in message
    assert "lesion*mask" in message and "sub-M2001 and ses-" in message
    relaxed = arc_datalist(root, require_labels=False)
    assert len(all_items(relaxed)) == 6 and all("label" not in i for i in all_items(relaxed))
    with pytest.raises(ARCDatasetError, match=r"sub-M2001_ses-\d+_lesion\.nii\.gz.*mask_pattern"):
        arc_datalist(root, mask_dir=root, mask_pattern="{subject}_{session}_lesion.nii.gz")
    with pytest.raises(ARCDatasetError, match="mask_dir.*does not exist"):
        arc_datalist(root, mask_dir=tmp_path / "no_masks")


def test_sessions_without_a_mask_are_left_out(tmp_path, caplog):
    root = fake_arc(tmp_path / "arc", 10, contrasts=("T1w",), two_sessions=(0, 1))
    subjects = subject_ids(10)
    second = sessions_of(subjects[0], 2)[1]
    (root / MASKS / subjects[0] / second / "anat" / f"{subjects[0]}_{second}_desc-lesion_mask.nii.gz").unlink()
    for session in sessions_of(subjects[1], 2):  # a subject without any mask
        (root / MASKS / subjects[1] / session / "anat" / f"{subjects[1]}_{session}_desc-lesion_mask.nii.gz").unlink()
    with caplog.at_level(logging.WARNING, logger="custom.data.arc"):
        datalist = arc_datalist(root)
    items = all_items(datalist)
    assert all("label" in i for i in items) and len(items) == 9
    assert subjects[1] not in subjects_of(items) and len(subjects_of(items)) == 9
    assert [i["session"] for i in items if i["subject"] == subjects[0]] == sessions_of(subjects[0], 2)[:1]
    assert "left out 3" in caplog.text and subjects[1] in caplog.text


def test_custom_mask_dir_and_pattern(tmp_path):
    root = fake_arc(tmp_path / "arc", 8, contrasts=("T2w", "FLAIR"), two_sessions=(1,), masks=False)
    masks = tmp_path / "my_masks"
    for k, subject in enumerate(subject_ids(8)):
        for session in sessions_of(subject, 2 if k == 1 else 1):
            for contrast in ("T2w", "FLAIR"):
                _nifti(masks / f"{subject}_{session}_{contrast}_lesion.nii.gz")
    datalist = arc_datalist(root, "FLAIR", mask_dir=masks, mask_pattern="{subject}_{session}_{contrast}_lesion.nii.gz")
    items = all_items(datalist)
    assert len(items) == 9
    assert all(Path(i["label"]) == masks / f"{i['subject']}_{i['session']}_FLAIR_lesion.nii.gz" for i in items)
    # nested pattern, relative to the default mask_dir (dataset_dir/derivatives)
    nested = "lesion_masks/{subject}/{session}/anat/{subject}_{session}_desc-lesion_mask.nii.gz"
    fake_arc(root, 8, contrasts=(), two_sessions=(1,))
    assert all("label" in i for i in all_items(arc_datalist(root, "T2w", mask_pattern=nested)))
    with pytest.raises(ARCDatasetError, match="placeholders"):
        arc_datalist(root, mask_pattern="{patient}.nii.gz")


def test_pattern_without_sessions_drops_the_empty_session(tmp_path):
    root = tmp_path / "arc"
    for subject in subject_ids(3):
        _nifti(root / subject / "anat" / f"{subject}_T1w.nii.gz")
        _nifti(tmp_path / "masks" / f"{subject}_desc-lesion_mask.nii.gz")
    items = scan_arc(
        root, "T1w", mask_dir=tmp_path / "masks", mask_pattern="{subject}_{session}_desc-lesion_mask.nii.gz"
    )
    assert all(Path(i["label"]).name == f"{i['subject']}_desc-lesion_mask.nii.gz" for i in items)


def test_json_is_written_and_rereadable(tmp_path):
    root = fake_arc(tmp_path / "arc", 8, contrasts=("T1w",), two_sessions=(0,))
    target = tmp_path / "out" / "arc_T1w.json"
    datalist = arc_datalist(root, fraction=0.1, output_json=target)
    assert json.loads(target.read_text()) == datalist
    assert set(datalist) == {"training", "validation", "test", "fractions", "fraction", "contrast", "seed"}
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_missing_named_folder_is_not_synthesised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ARCDatasetError, match="missing"):
        arc_datalist(tmp_path / "mine" / "arc")
    assert not (tmp_path / "data").exists()


def test_default_root_is_synthesised_when_missing(tmp_path, monkeypatch, capsys):
    import custom.data.synthetic as synthetic

    calls = []

    def fake_generate(out_dir, subjects, seed, resolution, **kwargs):
        calls.append((Path(out_dir), subjects, seed, resolution))
        fake_arc(Path(out_dir) / "arc", 5, two_sessions=(0,))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synthetic, "generate_dataset", fake_generate)
    datalist = arc_datalist("data/synthetic/arc", "T2w", seed=2)
    assert calls == [(Path("data/synthetic"), 24, 2, 2.0)]
    assert "synthetic" in capsys.readouterr().out
    assert len(subjects_of(all_items(datalist))) == 5 and len(all_items(datalist)) == 6
    arc_datalist("data/synthetic/arc", seed=2)  # present now: not generated again
    assert len(calls) == 1


def test_synthetic_layout(tmp_path):
    from custom.data.synthetic import generate_dataset

    summary = generate_dataset(tmp_path, subjects=6, seed=0, resolution=6.0, progress=False)
    expected = {(row["participant_id"], ses) for row in summary["arc_subjects"] for ses in row["sessions"]}
    for contrast in CONTRASTS:
        datalist = arc_datalist(tmp_path / "arc", contrast=contrast)
        items = all_items(datalist)
        assert {(i["subject"], i["session"]) for i in items} == expected
        assert tuple(len(subjects_of(datalist[k])) for k in ("training", "validation", "test")) == split_sizes(6)
        for item in items:
            assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
            assert Path(item["label"]).name == f"{item['subject']}_{item['session']}_desc-lesion_mask.nii.gz"
        parts = [subjects_of(datalist[k]) for k in ("training", "validation", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])

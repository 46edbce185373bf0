"""Tests of the cross-contrast linear probe and dense consistency (custom.probe), on a tiny 4 mm synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from custom.cli import main
from custom.networks import Encoder
from custom.probe import (
    LogisticProbe,
    ProbeInputError,
    ProbeVolume,
    balanced_accuracy,
    balanced_accuracy_score,
    confusion_matrix,
    dense_consistency,
    probe_contrasts,
    run_probe,
    sample_voxel_features,
)

TINY = (4, 8, 8, 16, 16)
SMALL_RUN = {"fit_subjects": 2, "test_subjects": 2, "max_shift": 6, "bootstrap": 50, "progress": False}


@pytest.fixture(scope="module")
def qmri_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(subjects=4, seed=3, resolution=4.0) / "qmri"


def label_features(volume: ProbeVolume) -> list[torch.Tensor]:
    """A fake encoder whose only feature map IS the one-hot tissue labels (GM, WM, CSF), whatever the contrast."""
    return [F.one_hot(volume.labels.long(), 4)[..., 1:].permute(3, 0, 1, 2).float()]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["encoder"]: r for r in rows}


def test_logistic_probe_recovers_a_separable_problem() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0, 1.0], [0.0, 4.0, 0.0, 1.0], [0.0, 0.0, 4.0, 1.0]])  # last: constant
    y = torch.arange(3).repeat_interleave(200)
    x = centres[y] + 0.5 * torch.randn(600, 4, generator=g)
    x[:, 3] = 1.0
    probe = LogisticProbe(l2=1e-3).fit(x, y, 3)
    assert torch.equal(probe.predict(x), y)
    again = LogisticProbe(l2=1e-3).fit(x, y, 3)
    assert torch.equal(probe.weight, again.weight), "deterministic fit"
    weight, bias = probe.folded()
    assert torch.allclose(x @ weight + bias, probe.logits(x).float(), atol=1e-4)
    test = centres[y] + 0.5 * torch.randn(600, 4, generator=g)
    assert balanced_accuracy_score(y, probe.predict(test), 3) > 0.98


def test_balanced_accuracy_on_a_hand_example() -> None:
    y_true = torch.tensor([0, 0, 0, 1, 2, 2])
    y_pred = torch.tensor([0, 0, 1, 1, 2, 0])
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert balanced_accuracy_score(y_true, y_pred, 3) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3, abs=1e-12)
    assert balanced_accuracy(torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])) == pytest.approx((0.75 + 0.5) / 2)
    assert math.isnan(balanced_accuracy(torch.zeros(3, 3)))


def test_voxel_sampling_equals_trilinear_upsampling() -> None:
    g = torch.Generator().manual_seed(1)
    shape = (16, 8, 12)
    maps = [torch.randn(2, *shape, generator=g), torch.randn(3, 8, 4, 6, generator=g), torch.randn(4, 2, 1, 3)]
    points = torch.stack([torch.randint(0, n, (50,), generator=g) for n in shape], dim=1)
    sampled = sample_voxel_features(maps, points, shape, chunk=17)
    for level, got in zip(maps, sampled, strict=True):
        full = F.interpolate(level[None], size=shape, mode="trilinear", align_corners=False)[0]
        assert torch.allclose(got, full[:, points[:, 0], points[:, 1], points[:, 2]].T, atol=1e-5)


def test_dense_consistency_of_identical_features() -> None:
    g = torch.Generator().manual_seed(2)
    subjects, contrasts, points, channels = 3, 4, 40, 5
    per_subject = torch.randn(subjects, 1, points, channels, generator=g) + 3.0  # the offset is centred away
    identical = per_subject.expand(subjects, contrasts, points, channels)
    masks = torch.ones(subjects, points, dtype=torch.bool)
    masks[0, :10] = False
    result = dense_consistency(identical, masks)
    assert result["same_subject"] == pytest.approx(1.0)
    assert abs(result["different_subject"]) < 0.3
    assert result["difference"] == pytest.approx(1.0 - result["different_subject"])
    constant = dense_consistency(torch.ones(subjects, contrasts, points, channels), masks)
    assert constant["same_subject"] == pytest.approx(0.0) and constant["difference"] == pytest.approx(0.0)


def test_probe_contrasts_panel() -> None:
    panel = probe_contrasts(seed=0)
    assert list(panel) == ["MPRAGE", "FSE", "GRE", "FLAIR", "IXI-T1w", "IXI-T2w", "IXI-PDw"]
    assert [panel[c].name for c in ("MPRAGE", "FSE", "GRE", "FLAIR")] == ["mprage", "fse", "gre", "flair"]
    assert panel["IXI-T2w"].params == probe_contrasts(seed=5, ixi_site="GST")["IXI-T2w"].params
    assert panel["MPRAGE"].to_dict() == probe_contrasts(seed=0)["MPRAGE"].to_dict()
    with pytest.raises(ValueError, match="IXI site"):
        probe_contrasts(ixi_site="nowhere")


@pytest.fixture(scope="module")
def probe_run(qmri_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("probe_out")
    torch.manual_seed(5)
    weights = out / "tiny.pt"
    torch.save(Encoder(features=TINY).state_dict(), weights)
    rows = run_probe(
        {"labels": label_features, "tiny": str(weights)}, qmri_dir, seed=0, output_dir=out / "report", **SMALL_RUN
    )
    return rows, out / "report"


def test_label_encoder_scores_one_across_contrasts_and_intensity_does_not(probe_run) -> None:
    rows = by_name(probe_run[0])
    assert list(rows) == ["labels", "tiny", "position", "intensity", "random"]
    labels, intensity = rows["labels"], rows["intensity"]
    assert labels["cross_contrast"] > 0.99 and labels["same_contrast"] > 0.99
    assert labels["dense_same_deepest"] == pytest.approx(1.0)  # identical features under every contrast
    assert labels["retrieval_top1"] == 1.0
    # a local-intensity model learns one contrast's intensities well but they do not carry over to another
    assert intensity["same_contrast"] > 0.6
    assert intensity["cross_contrast"] < intensity["same_contrast"] - 0.15
    assert intensity["cross_contrast"] < labels["cross_contrast"] - 0.4
    for row in rows.values():
        low, high = row["cross_contrast_ci"]
        assert low <= row["cross_contrast"] + 1e-9 and row["cross_contrast"] <= high + 1e-9


def test_report_files_are_written(probe_run) -> None:
    rows, out = probe_run
    record = json.loads((out / "probe.json").read_text())
    assert set(record["results"]) == {r["encoder"] for r in rows}
    assert len(record["results"]["tiny"]["matrix"]) == 7 and len(record["results"]["tiny"]["dense"]) == 5
    assert record["encoders"]["tiny"]["features"] == list(TINY)
    assert record["encoders"]["random"]["features"] == list(TINY), "random baseline takes the weights' widths"
    assert len(record["fit_subjects"]) == 2 and len(record["test_subjects"]) == 2
    assert not set(record["fit_subjects"]) & set(record["test_subjects"])
    table = (out / "probe.md").read_text()
    assert "| encoder | cross-contrast BA [95% CI]" in table and "| labels | 1.000" in table
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_position_baseline_falls_under_flips_and_shifts(qmri_dir: Path) -> None:
    """On aligned brains voxel position alone predicts the tissue above chance; after random flips and shifts per
    subject it falls towards chance (1/3)."""
    common = {**SMALL_RUN, "baselines": ("position",), "print_table": False, "seed": 0}
    aligned = run_probe({}, qmri_dir, remove_position=False, **common)[0]
    moved = run_probe({}, qmri_dir, remove_position=True, **common)[0]
    assert aligned["cross_contrast"] > 0.43
    assert moved["cross_contrast"] < aligned["cross_contrast"] - 0.04
    assert moved["cross_contrast"] < 0.41
    assert aligned["dense_difference_deepest"] == pytest.approx(0.0, abs=1e-9)  # no subject information


def test_input_errors(qmri_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ProbeInputError, match="broken.pt"):
        run_probe({"x": str(broken)}, qmri_dir, **SMALL_RUN)
    with pytest.raises(ProbeInputError, match="missing.pt"):
        run_probe({"x": str(tmp_path / "missing.pt")}, qmri_dir, **SMALL_RUN)
    unlabelled = tmp_path / "unlabelled"
    for folder in sorted(qmri_dir.iterdir())[:3]:
        (unlabelled / folder.name).mkdir(parents=True)
        for f in folder.iterdir():
            if "_labels" not in f.name:
                (unlabelled / folder.name / f.name).symlink_to(f)
    with pytest.raises(ProbeInputError, match=r"sub-001 has no tissue label map"):
        run_probe({}, unlabelled, baselines=("position",), **SMALL_RUN)
    with pytest.raises(ProbeInputError, match="both as counts or both as name lists"):
        run_probe({}, qmri_dir, baselines=("position",), **{**SMALL_RUN, "fit_subjects": ["sub-001"]})
    with pytest.raises(ProbeInputError, match="overlap"):
        run_probe({}, qmri_dir, **{**SMALL_RUN, "fit_subjects": ["sub-001"], "test_subjects": ["sub-001", "sub-002"]})
    with pytest.raises(ValueError, match="clash"):
        run_probe({"random": None}, qmri_dir, **SMALL_RUN)


def test_cli_runs_the_probe_end_to_end(qmri_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(6)
    weights = tmp_path / "model.pt"
    torch.save(Encoder(features=TINY).state_dict(), weights)
    out = tmp_path / "cli"
    args = ["invariance", "--weights", str(weights), "--dataset_dir", str(qmri_dir), "--output_dir", str(out)]
    args += ["--fit_subjects", "2", "--test_subjects", "2", "--max_shift", "4", "--baselines", "position", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| pretrained |" in printed and "| position |" in printed and "| random |" not in printed
    assert (out / "probe.json").is_file() and (out / "probe.md").is_file() and (out / "probe.png").is_file()
    # the earlier retrieval evaluation stays reachable
    retrieval = ["invariance", "--retrieval_only", "--weights", str(weights), "--features", "[4,8,8,16,16]"]
    retrieval += ["--dataset_dir", str(qmri_dir), "--split", "all", "--k", "2", "--quiet"]
    assert main(retrieval) == 0
    assert "| encoder | top-1 | chance | distance ratio |" in capsys.readouterr().out
    assert main(["invariance", "--dataset_dir", str(qmri_dir), "--split", "validation"]) == 2
    assert "--retrieval_only" in capsys.readouterr().err

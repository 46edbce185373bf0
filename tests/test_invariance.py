"""Tests of the label-free sequence-invariance evaluation (CPU, tiny synthetic qMRI subjects of 32^3 voxels)."""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom.data.qmri_datalist import find_qmri_subjects
from custom.invariance import (
    InvarianceResult,
    cross_sequence_retrieval,
    embed_volume,
    evaluate_invariance,
    run_invariance,
    sequence_panel,
)
from custom.networks import Encoder
from custom.sequences import SEQUENCES

SHAPE = (32, 32, 32)
TINY = (4, 8, 8, 16, 16)
# Tissue values (PD, MT fractions; R1, R2*, R2 in 1/s), the same in every subject, so that the only difference
# between subjects is anatomy. No tissue is CSF-like, so a CSF-nulled FLAIR still shows all of them.
TISSUES = {
    "gm": {"PD": 0.80, "R1": 0.70, "R2s": 18.0, "MT": 0.008, "R2": 14.0},
    "wm": {"PD": 0.70, "R1": 1.10, "R2s": 22.0, "MT": 0.015, "R2": 16.0},
    "deep": {"PD": 0.90, "R1": 0.60, "R2s": 15.0, "MT": 0.004, "R2": 12.0},
}


def _ellipsoid(centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def _write_subject(root: Path, index: int) -> None:
    """One subject of three tissues whose shapes and positions depend on ``index``."""
    rng = np.random.default_rng(index)
    centre = 15.5 + rng.uniform(-2, 2, 3)
    brain = _ellipsoid(tuple(centre), tuple(rng.uniform(9, 14, 3)))
    deep = _ellipsoid(tuple(centre + rng.uniform(-3, 3, 3)), tuple(rng.uniform(3, 5, 3)))
    wm = _ellipsoid(tuple(15.5 + rng.uniform(-3, 3, 3)), tuple(rng.uniform(4, 8, 3))) & brain & ~deep
    labels = {"gm": brain & ~wm & ~deep, "wm": wm, "deep": deep}
    # every tissue fills more than 0.5 % of the brain, so the 99.5th percentile is the brightest tissue's value
    assert all(where.sum() > 0.01 * brain.sum() for where in labels.values())
    name = f"sub-{index + 1:03d}"
    folder = root / name
    folder.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for kind in ("PD", "R1", "R2s", "MT", "R2"):
        data = np.zeros(SHAPE, np.float32)
        for tissue, where in labels.items():
            data[where] = TISSUES[tissue][kind]
        nib.save(nib.Nifti1Image(data, affine), str(folder / f"{name}_{kind}.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(folder / f"{name}_mask.nii.gz"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qmri")
    for i in range(4):
        _write_subject(root, i)
    return root


@pytest.fixture(scope="module")
def subjects(dataset: Path) -> list[dict[str, str]]:
    return find_qmri_subjects(dataset)


class AnatomyEncoder(nn.Module):
    """Oracle: the binarised image (the brain outline, whatever the contrast) at 4^3, one voxel per channel."""

    size_divisor = 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        coarse = F.adaptive_avg_pool3d((x > 0.08).float(), 4)
        return [x, coarse.reshape(x.shape[0], -1, 1, 1, 1)]


class ContrastEncoder(nn.Module):
    """Contrast only: the darkest and brightest foreground intensity (the same for every subject of a protocol)."""

    size_divisor = 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fg = x[x > 0]
        stats = torch.stack([fg.min(), fg.max(), torch.ones((), dtype=x.dtype)])
        return [torch.round(stats * 1e4).reshape(1, 3, 1, 1, 1) / 1e4]


def test_sequence_panel_round_robin_and_deterministic() -> None:
    panel = sequence_panel(8, preset="clinical", seed=3)
    assert [p.name for p in panel] == list(SEQUENCES) * 2
    assert set(p.name for p in sequence_panel(4)) == set(SEQUENCES)
    assert [p.to_dict() for p in panel] == [p.to_dict() for p in sequence_panel(8, preset="clinical", seed=3)]
    assert [p.to_dict() for p in panel] != [p.to_dict() for p in sequence_panel(8, preset="clinical", seed=4)]
    assert panel[0].params != panel[4].params  # two FSE protocols with different parameters
    assert [p.name for p in sequence_panel(2)] == ["fse", "gre"]
    with pytest.raises(ValueError, match="k >= 1"):
        sequence_panel(0)


def test_embed_volume_pads_crops_and_restores_mode() -> None:
    torch.manual_seed(0)
    encoder = Encoder(features=TINY).train()
    image = torch.rand(1, 20, 33, 17)
    h = embed_volume(encoder, image)
    assert h.shape == (16,) and h.dtype == torch.float32 and torch.isfinite(h).all()
    assert encoder.training, "the encoder's mode must be restored"
    assert torch.equal(h, embed_volume(encoder, image)), "eval mode: dropout off, deterministic"
    mask = torch.zeros(20, 33, 17)
    mask[5:15, 3:30, 2:12] = 1
    cropped = embed_volume(encoder, image, crop=mask)
    assert torch.allclose(cropped, embed_volume(encoder, image[:, 5:15, 3:30, 2:12]))
    with pytest.raises(ValueError, match="does not match"):
        embed_volume(encoder, image, crop=torch.ones(4, 4, 4))


def test_retrieval_metrics_on_constructed_embeddings() -> None:
    subjects, k = 3, 4
    identity = torch.eye(subjects)[:, None, :].expand(subjects, k, subjects) + 0.01 * torch.randn(subjects, k, subjects)
    perfect = cross_sequence_retrieval(identity, ["fse", "gre", "flair", "mprage"])
    assert perfect.top1 == 1.0 and perfect.distance_ratio < 0.1 and perfect.chance_top1 == pytest.approx(1 / 3)
    assert perfect.per_sequence_top1 == {"fse": 1.0, "gre": 1.0, "flair": 1.0, "mprage": 1.0}
    protocol_only = torch.eye(k)[None].expand(subjects, k, k)  # same vector for every subject of a protocol
    result = cross_sequence_retrieval(protocol_only)
    assert result.top1 == pytest.approx(1 / subjects)  # ties share the credit: exactly chance
    assert result.distance_ratio > 1
    same = cross_sequence_retrieval(torch.ones(subjects, k, 5))
    assert same.top1 == pytest.approx(1 / subjects) and same.distance_ratio == 1.0
    with pytest.raises(ValueError, match="2 subjects"):
        cross_sequence_retrieval(torch.ones(1, k, 5))
    with pytest.raises(ValueError, match="2 protocols"):
        cross_sequence_retrieval(torch.ones(subjects, 1, 5))


def test_anatomy_oracle_is_invariant(subjects: list[dict[str, str]]) -> None:
    result = evaluate_invariance(AnatomyEncoder(), subjects, k=8, progress=False)
    assert isinstance(result, InvarianceResult)
    assert result.n_subjects == 4 and result.k == 8 and result.chance_top1 == 0.25
    assert result.top1 == 1.0
    assert result.distance_ratio < 1.0
    assert set(result.per_sequence_top1) == set(SEQUENCES)
    assert [p["sequence"] for p in result.protocols] == list(SEQUENCES) * 2
    assert "top-1 1.000" in str(result) and "\n" not in str(result)
    json.dumps(result.to_dict())


def test_contrast_only_encoder_scores_chance(subjects: list[dict[str, str]]) -> None:
    result = evaluate_invariance(
        ContrastEncoder(), subjects, k=8, noise=0.0, b1_field=0.0, jitter_mm=0.0, progress=False
    )
    assert result.top1 == pytest.approx(result.chance_top1)
    assert result.distance_ratio > 1.0
    noisy = evaluate_invariance(ContrastEncoder(), subjects, k=8, noise=0.01, progress=False)
    assert noisy.top1 <= 0.5


def test_position_jitter_is_off_by_default(subjects: list[dict[str, str]]) -> None:
    """Every protocol's cube sits at the same place unless jitter_mm asks otherwise (on the synthetic data a jitter
    of a few mm is as large as the anatomical differences retrieval relies on)."""
    assert inspect.signature(evaluate_invariance).parameters["jitter_mm"].default == 0.0
    assert inspect.signature(run_invariance).parameters["jitter_mm"].default == 0.0
    exact = evaluate_invariance(ContrastEncoder(), subjects, k=4, noise=0.0, b1_field=0.0, progress=False)
    assert exact.top1 == pytest.approx(exact.chance_top1)
    cube = {"k": 4, "noise": 0.0, "b1_field": 0.0, "roi_mm": 40.0, "progress": False}  # 20 of the 32 voxels
    jittered = evaluate_invariance(AnatomyEncoder(), subjects, jitter_mm=8.0, **cube)
    still = evaluate_invariance(AnatomyEncoder(), subjects, **cube)
    assert still.same_subject_distance == pytest.approx(0.0, abs=1e-9)  # same cube, same outline: identical
    assert jittered.same_subject_distance > 1e-6


def test_random_tiny_encoder_end_to_end(subjects: list[dict[str, str]]) -> None:
    torch.manual_seed(0)
    result = evaluate_invariance(Encoder(features=TINY), subjects[:3], k=4, progress=False)
    assert 0.0 <= result.top1 <= 1.0 and 0.0 <= result.chance_top1 <= 1.0
    assert all(0.0 <= v <= 1.0 for v in result.per_sequence_top1.values())
    assert math.isfinite(result.distance_ratio) and result.distance_ratio >= 0
    assert result.n_subjects == 3 and result.k == 4


def test_input_errors(subjects: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="at least 2 subjects"):
        evaluate_invariance(AnatomyEncoder(), subjects[:1], k=4, progress=False)
    with pytest.raises(ValueError, match="k >= 2"):
        evaluate_invariance(AnatomyEncoder(), subjects, k=1, progress=False)
    with pytest.raises(ValueError, match="noise"):
        evaluate_invariance(AnatomyEncoder(), subjects, k=2, noise=-1.0, progress=False)


def test_run_invariance_writes_json(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="custom.invariance")
    torch.manual_seed(1)
    weights = tmp_path / "model.pt"
    torch.save(Encoder(features=TINY).state_dict(), weights)
    out = tmp_path / "out" / "invariance.json"
    record = run_invariance(
        str(weights), str(dataset), features=TINY, k=2, device="cpu", output_json=str(out), split="all",
        subjects_limit=3, progress=False,
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["jitter_mm"] == 0.0 and record["roi_mm"] == 128.0
    assert record["n_subjects"] == 3 and record["subjects"] == ["sub-001", "sub-002", "sub-003"]
    assert set(record["results"]) == {"pretrained", "random init"}
    for r in record["results"].values():
        assert 0.0 <= r["top1"] <= 1.0 and r["chance_top1"] == pytest.approx(1 / 3) and r["k"] == 2
    printed = capsys.readouterr().out  # the table goes to stdout, the load report to the log
    assert "| encoder | top-1 | chance | distance ratio |" in printed and "copied" in caplog.text
    caplog.clear()

    baseline = run_invariance(
        None, str(dataset), features=TINY, k=2, device="cpu", split="all", subjects_limit=2, progress=False
    )
    assert set(baseline["results"]) == {"random init"} and baseline["weights"] is None
    assert "randomly initialised" in caplog.text
    with pytest.raises(ValueError, match="split='all'"):  # 10 % of 4 subjects holds out one
        run_invariance(None, str(dataset), features=TINY, k=2, device="cpu", split="validation", progress=False)

"""Sequence presets, sampling, replay, and the tissue-contrast order of simulated images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from custom import sequences as S

# docs/paper-notes.md tissue values (fractions, 1/s): GM, WM, CSF
PD = torch.tensor([0.80, 0.70, 0.98])
R1 = torch.tensor([0.64, 1.02, 0.27])
R2S = torch.tensor([17.0, 21.0, 5.0])
R2 = torch.tensor([12.0, 13.0, 0.6])
MT = torch.tensor([0.008, 0.016, 0.001])
GM, WM, CSF = 0, 1, 2


@pytest.mark.parametrize("preset", sorted(S.PRESETS))
@pytest.mark.parametrize("name", S.SEQUENCES)
def test_samples_stay_in_preset_ranges(preset, name):
    table = S.PRESETS[preset][name]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sample = S.sample_sequence(name, preset=preset, generator=g)
        assert sample.name == name and sample.preset == preset
        for key, dist in table.items():
            value = sample.params[key]
            assert math.isfinite(value) and value >= 0
            if isinstance(dist, S.Uniform | S.LogUniform):
                assert dist.low <= value <= dist.high
            if isinstance(dist, S.Degrees) and isinstance(dist.dist, S.Uniform):
                assert math.radians(dist.dist.low) <= value <= math.radians(dist.dist.high)
            if isinstance(dist, S.IntUniform):
                assert value == int(value) and dist.low <= value <= dist.high
        if name == "mprage":
            assert sample.params["td"] >= 0
        if S.TE_BELOW_TR[preset]:
            assert sample.params["te"] < sample.params["tr"]


def test_paper_preset_follows_notes():
    g = torch.Generator().manual_seed(1)
    tr = [S.sample_sequence("mprage", preset="paper", generator=g).params["tr"] for _ in range(2000)]
    assert np.mean(tr) == pytest.approx(2.3, rel=0.02) and np.std(tr) == pytest.approx(0.23, rel=0.1)
    te = [S.sample_sequence("flair", preset="paper", generator=g).params["te"] for _ in range(2000)]
    assert np.median(te) == pytest.approx(0.02, rel=0.05)
    assert np.std(np.log10(te)) == pytest.approx(0.1, rel=0.1)
    flips = [S.sample_sequence("gre", preset="paper", generator=g).params["flip"] for _ in range(500)]
    assert max(flips) < math.radians(50.0) + 1e-9 and min(flips) > math.radians(5.0) - 1e-9  # radians


def test_sampling_is_seeded_and_uniform_over_sequences():
    a = [S.sample_sequence(generator=s).to_dict() for s in range(20)]
    b = [S.sample_sequence(generator=s).to_dict() for s in range(20)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    names = [S.sample_sequence(generator=g).name for _ in range(2000)]
    counts = {n: names.count(n) for n in S.SEQUENCES}
    assert all(400 < c < 600 for c in counts.values()), counts


def test_distinct_sequences():
    for seed in range(50):
        a, b = S.sample_distinct_sequences(2, generator=seed)
        assert a.name != b.name
    with pytest.raises(ValueError, match="distinct"):
        S.sample_distinct_sequences(2, sequences=["fse"])


def test_record_round_trip_and_replay():
    sample = S.sample_sequence("gre", preset="clinical", generator=3)
    record = json.loads(json.dumps(sample.to_dict()))
    again = S.SequenceSample.from_dict(record)
    assert again == sample
    assert torch.equal(S.simulate(sample, PD, R1, R2S, MT), S.simulate(again, PD, R1, R2S, MT))
    assert "GRE(" in str(sample) and "deg" in str(sample)


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="unknown sequence"):
        S.SequenceSample("dwi", {})
    with pytest.raises(ValueError, match="preset"):
        S.sample_sequence("fse", preset="nonsense")
    with pytest.raises(ValueError, match="unknown or empty"):
        S.sample_sequence(sequences=["t1"])


def test_simulate_uses_r2_for_spin_echo_when_given():
    sample = S.sample_sequence("fse", preset="clinical", generator=0)
    with_r2 = S.simulate(sample, PD, R1, R2S, MT, r2=R2)
    without = S.simulate(sample, PD, R1, R2S, MT)
    assert not torch.allclose(with_r2, without)
    assert torch.all(with_r2 > without)  # R2 < R2*: less decay


def _clinical_means(name: str, seed: int) -> torch.Tensor:
    return S.simulate(S.sample_sequence(name, preset="clinical", generator=seed), PD, R1, R2S, MT, r2=R2)


@pytest.mark.parametrize("seed", range(25))
def test_clinical_contrast_order_on_tissue_values(seed):
    mprage = _clinical_means("mprage", seed)
    assert mprage[WM] > mprage[GM] > mprage[CSF]
    flair = _clinical_means("flair", seed)
    assert flair[CSF] < flair[GM] and flair[CSF] < flair[WM]
    g = torch.Generator().manual_seed(seed)
    while True:  # long-TE FSE (T2w)
        fse = S.sample_sequence("fse", preset="clinical", generator=g)
        if fse.params["te"] >= 0.08:
            break
    t2w = S.simulate(fse, PD, R1, R2S, MT, r2=R2)
    assert t2w[CSF] > t2w[GM] > t2w[WM]


@pytest.fixture(scope="module")
def synthetic_subjects(synthetic_dataset):
    """Two synthetic qMRI subjects (4 mm) loaded in SI units, with their tissue labels."""
    import nibabel as nib

    from custom.data.qmri import load_qmri_maps

    root = synthetic_dataset(subjects=4, seed=3, resolution=4.0)  # the probe tests' set; its first two subjects
    subjects = []
    for folder in sorted(p for p in (root / "qmri").iterdir() if p.is_dir())[:2]:
        name = folder.name
        volume = load_qmri_maps({k: folder / f"{name}_{k}.nii.gz" for k in ("PD", "R1", "R2s", "MT", "R2")})
        labels = np.asarray(nib.load(str(folder / f"{name}_labels.nii.gz")).dataobj)
        maps = {k: torch.from_numpy(v) for k, v in volume.maps.items()}
        subjects.append((maps, torch.from_numpy(labels.astype(np.int64))))
    return subjects


def _tissue_means(image: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {name: float(image[labels == value].mean()) for name, value in (("gm", 1), ("wm", 2), ("csf", 3))}


@pytest.mark.parametrize("seed", range(6))
def test_clinical_contrast_order_on_synthetic_subjects(synthetic_subjects, seed):
    """Clinical preset on synthetic brains: MPRAGE WM > GM > CSF; long-TE FSE CSF > GM > WM; FLAIR CSF darkest."""
    g = torch.Generator().manual_seed(seed)
    mprage = S.sample_sequence("mprage", preset="clinical", generator=g)
    flair = S.sample_sequence("flair", preset="clinical", generator=g)
    while (fse := S.sample_sequence("fse", preset="clinical", generator=g)).params["te"] < 0.08:
        pass
    for maps, labels in synthetic_subjects:
        args = (maps["PD"], maps["R1"], maps["R2s"], maps["MT"])
        t1w = _tissue_means(S.simulate(mprage, *args, r2=maps["R2"]), labels)
        assert t1w["wm"] > t1w["gm"] > t1w["csf"], (str(mprage), t1w)
        t2w = _tissue_means(S.simulate(fse, *args, r2=maps["R2"]), labels)
        assert t2w["csf"] > t2w["gm"] > t2w["wm"], (str(fse), t2w)
        fl = _tissue_means(S.simulate(flair, *args, r2=maps["R2"]), labels)
        assert fl["csf"] < min(fl["gm"], fl["wm"]), (str(flair), fl)

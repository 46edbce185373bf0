"""Per-subject metrics (Dice, HD95 in mm, PSNR, SSIM) and grouped result tables: hand-made volumes, exact values."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from custom.metrics import (
    PSNR_CAPTION,
    ResultsTable,
    dice_per_class,
    dice_per_class_flagged,
    hd95_mm,
    psnr,
    psnr_peak,
    segmentation_metrics,
    ssim,
)

# ---------------------------------------------------------------- Dice


def test_dice_known_overlaps() -> None:
    ref = np.zeros((4, 4, 4), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[:2] = 1  # 32 voxels of class 1
    pred[:1] = 1  # 16 voxels, all inside the reference: Dice = 2*16 / (32 + 16) = 2/3
    ref[3, :2] = 2  # 8 voxels of class 2
    pred[3, 1:3] = 2  # 8 voxels, 4 shared: Dice = 2*4 / 16 = 0.5
    scores = dice_per_class(pred, ref, [1, 2])
    assert scores[1] == pytest.approx(2 / 3, abs=1e-12)
    assert scores[2] == pytest.approx(0.5, abs=1e-12)
    # torch inputs (and float labels holding whole numbers) give the same values
    scores_t = dice_per_class(torch.from_numpy(pred).float(), torch.from_numpy(ref), [1, 2])
    assert scores_t == scores


def test_dice_empty_classes() -> None:
    ref = np.zeros((3, 3, 3), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[0, 0, 0] = 1
    scores, both_empty = dice_per_class_flagged(pred, ref, [1, 2])
    assert scores == {1: 0.0, 2: 1.0}  # class 1 missed; class 2 absent from both
    assert both_empty == [2]
    assert dice_per_class(ref, pred, [1]) == {1: 0.0}  # empty reference, non-empty prediction


def test_dice_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        dice_per_class(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), [1])
    with pytest.raises(ValueError, match="integer labels"):
        dice_per_class(np.full((2, 2), 0.5), np.zeros((2, 2)), [1])


# ---------------------------------------------------------------- HD95


def _cubes(shift: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two 10^3 cubes in a 40x30x30 grid, the second shifted by ``shift`` voxels along ``axis``."""
    a = np.zeros((40, 30, 30), dtype=bool)
    a[10:20, 5:15, 5:15] = True
    b = np.roll(a, shift, axis=axis)
    return a, b


def test_hd95_shifted_cubes_in_mm() -> None:
    # Every surface voxel on the leading x-face of cube A (100 of its 10^3 - 8^3 = 488 surface voxels, 20 %) is
    # exactly 3 voxels from B's surface and no voxel is farther, so more than 5 % of each directed set sits at the
    # maximum: the 95th percentile IS that maximum, 3 voxels * 2 mm = 6 mm, with no interpolation. Distances are
    # float32 in MONAI, so the tolerance is float32 round-off.
    a, b = _cubes(3, axis=0)
    assert hd95_mm(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0, abs=1e-5)
    assert hd95_mm(b, a, (2.0, 1.0, 1.0)) == pytest.approx(6.0, abs=1e-5)  # symmetric


def test_hd95_anisotropic_spacing_matters() -> None:
    a, b = _cubes(3, axis=0)
    assert hd95_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-5)
    assert hd95_mm(a, b, (1.0, 2.0, 2.0)) == pytest.approx(3.0, abs=1e-5)  # in-plane spacing: shift is along x
    a, b = _cubes(3, axis=1)
    assert hd95_mm(a, b, (1.0, 2.0, 2.0)) == pytest.approx(6.0, abs=1e-5)
    assert hd95_mm(a, b, (2.0, 0.5, 1.0)) == pytest.approx(1.5, abs=1e-5)


def test_hd95_identical_empty_and_inputs() -> None:
    a, _ = _cubes(0)
    assert hd95_mm(a, a, (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(hd95_mm(a, np.zeros_like(a), (1.0, 1.0, 1.0)))
    assert math.isnan(hd95_mm(np.zeros_like(a), a, (1.0, 1.0, 1.0)))
    assert math.isnan(hd95_mm(np.zeros_like(a), np.zeros_like(a), (1.0, 1.0, 1.0)))
    # torch 0/1 masks with a leading channel
    t = torch.from_numpy(a).float()[None]
    assert hd95_mm(t, torch.roll(t, 2, dims=1), (1.5, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-5)
    with pytest.raises(ValueError, match="binary"):
        hd95_mm(a * 0.5, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(a, a, (1.0, 1.0))


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_hand_computed() -> None:
    ref = np.array([[0.0, 2.0], [4.0, -2.0]])
    pred = ref + np.array([[0.5, 0.0], [0.0, -0.5]])
    # whole image: L = 4 - (-2) = 6, MSE = (0.25 + 0.25) / 4 = 0.125
    assert psnr(pred, ref) == pytest.approx(20 * math.log10(6 / math.sqrt(0.125)), abs=1e-12)
    # mask on the first row: L = 2 - 0 = 2, MSE = 0.25 / 2 = 0.125
    mask = np.array([[True, True], [False, False]])
    assert psnr(pred, ref, mask) == pytest.approx(20 * math.log10(2 / math.sqrt(0.125)), abs=1e-12)
    assert psnr_peak(ref, mask) == 2.0
    assert psnr(torch.from_numpy(pred), torch.from_numpy(ref)) == pytest.approx(psnr(pred, ref), abs=1e-12)


def test_psnr_peak_comes_from_clean_reference() -> None:
    ref = np.array([[0.0, 2.0], [4.0, -2.0]])
    pred = ref + np.array([[0.5, 0.0], [0.0, -0.5]])  # range 6.5: swapping the arguments changes L only
    assert psnr(ref, pred) == pytest.approx(20 * math.log10(6.5 / math.sqrt(0.125)), abs=1e-12)
    assert psnr(ref, pred) != pytest.approx(psnr(pred, ref))


def test_psnr_identical_is_inf() -> None:
    # MSE = 0: PSNR is +inf by definition (documented); tables count it as undefined, not as a huge mean
    ref = np.random.default_rng(0).normal(size=(5, 5, 5))
    assert psnr(ref, ref) == math.inf
    with pytest.raises(ValueError, match="empty"):
        psnr(ref, ref, np.zeros(ref.shape, bool))


def test_ssim_identical_and_noisy() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(16, 16, 16))
    noisy = ref + 0.3 * rng.normal(size=ref.shape)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-6)
    value = ssim(noisy, ref)
    assert 0.0 < value < 0.99
    # without a mask it is MONAI's SSIMMetric with data_range = L
    from monai.metrics import SSIMMetric

    as5d = [torch.from_numpy(x).float()[None, None] for x in (noisy, ref)]
    expected = SSIMMetric(spatial_dims=3, data_range=psnr_peak(ref))(*as5d).item()
    assert value == pytest.approx(expected, abs=1e-6)
    # a mask restricts the average: worse where the noise is
    mask = np.zeros(ref.shape, bool)
    mask[:, :8] = True
    half_noisy = ref.copy()
    half_noisy[:, :8] = noisy[:, :8]
    assert ssim(half_noisy, ref, mask=mask) < ssim(half_noisy, ref)


# ---------------------------------------------------------------- one subject


def test_segmentation_metrics_row() -> None:
    a, b = _cubes(3)
    pred = a.astype(np.int64)
    ref = b.astype(np.int64)
    ref[0, 0, 0] = 2  # class 2 only in the reference: Dice 0, HD95 undefined
    row = segmentation_metrics(pred, ref, (2.0, 1.0, 1.0), [1, 2, 3], ["gm", "wm", "csf"])
    assert row["dice_gm"] == pytest.approx(0.7)  # 700 shared voxels of 1000 + 1000
    assert row["hd95_gm"] == pytest.approx(6.0, abs=1e-5)
    assert row["dice_wm"] == 0.0 and math.isnan(row["hd95_wm"])
    assert row["dice_csf"] == 1.0 and math.isnan(row["hd95_csf"])  # absent from both
    assert row["dice_mean"] == pytest.approx((0.7 + 0.0 + 1.0) / 3)
    assert row["hd95_mean"] == pytest.approx(6.0, abs=1e-5)  # over the defined class only
    assert row["hd95_n_undefined"] == 2
    assert row["dice_n_both_empty"] == 1


# ---------------------------------------------------------------- tables


def _table() -> ResultsTable:
    rows = []
    for site, hd in [("HH", [4.0, 6.0, float("nan")]), ("GST", [1.0, 3.0, 2.0]), ("IOP", [float("nan")] * 3)]:
        for contrast in ("T1w", "T2w"):
            for i, h in enumerate(hd):
                rows.append(
                    {
                        "subject": f"{site}-00{i}",
                        "site": site,
                        "contrast": contrast,
                        "dice_mean": 0.5 + 0.1 * i,
                        "hd95_mean": h,
                        "hd95_n_undefined": int(math.isnan(h)),
                    }
                )
    return ResultsTable(rows)


def test_summary_ignores_and_counts_undefined() -> None:
    summary = {(s["site"], s["contrast"]): s for s in _table().summary()}
    hh = summary[("HH", "T1w")]
    assert hh["n_subjects"] == 3
    assert hh["hd95_mean:mean"] == pytest.approx(5.0)
    assert hh["hd95_mean:std"] == pytest.approx(math.sqrt(2.0))  # sample std of (4, 6)
    assert hh["hd95_mean:n"] == 2 and hh["hd95_mean:n_undefined"] == 1
    assert hh["dice_mean:mean"] == pytest.approx(0.6) and hh["dice_mean:n_undefined"] == 0
    iop = summary[("IOP", "T2w")]
    assert math.isnan(iop["hd95_mean:mean"]) and iop["hd95_mean:n"] == 0 and iop["hd95_mean:n_undefined"] == 3
    assert "hd95_n_undefined:mean" not in hh  # count columns are not auto-detected as metrics
    inf_table = ResultsTable([{"site": "A", "psnr": math.inf}, {"site": "A", "psnr": 20.0}])
    (only,) = inf_table.summary(group_by=("site",), metrics=["psnr"])
    assert only["psnr:mean"] == 20.0 and only["psnr:n_undefined"] == 1


def test_markdown_layout() -> None:
    text = _table().to_markdown(
        metrics=["dice_mean", "hd95_mean"],
        caption="HD95 in mm.",
        row_order=["GST", "HH", "IOP"],
        labels={"dice_mean": "DSC", "hd95_mean": "HD95 (mm)"},
        scale={"dice_mean": 100.0},
        fmt="{:.1f}",
    )
    lines = text.splitlines()
    assert lines[0] == "| site / contrast | DSC | HD95 (mm) |"
    body = [line for line in lines[2:] if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in body] == [
        "GST [T1w]",
        "GST [T2w]",
        "HH [T1w]",
        "HH [T2w]",
        "IOP [T1w]",
        "IOP [T2w]",
    ]
    assert "| GST [T1w] | 60.0 ± 10.0 | 2.0 ± 1.0 |" in lines
    assert "| IOP [T2w] | 60.0 ± 10.0 | n/a |" in lines
    caption = lines[-1]
    assert caption.startswith("HD95 in mm.")
    assert "HD95 (mm): 8 undefined" in caption and "HH [T1w]: 1" in caption and "IOP [T2w]: 3" in caption
    assert "nan" not in text.lower()


def test_markdown_pivot_grid() -> None:
    text = _table().to_markdown_pivot(
        row_key="site", col_key="contrast", metric=["dice_mean", "hd95_mean"], col_order=["T2w", "T1w"]
    )
    lines = text.splitlines()
    assert lines[0] == "| site | dice_mean [T2w] | dice_mean [T1w] | hd95_mean [T2w] | hd95_mean [T1w] |"
    assert lines[2] == "| HH | 0.600 ± 0.100 | 0.600 ± 0.100 | 5.000 ± 1.414 | 5.000 ± 1.414 |"
    assert lines[4].startswith("| IOP |") and lines[4].endswith("| n/a | n/a |")
    psnr_table = ResultsTable([{"site": "GST", "contrast": "T1w", "psnr": 20.0}])
    single = psnr_table.to_markdown_pivot(metric="psnr", caption=PSNR_CAPTION)
    assert "| GST | 20.000 |" in single  # one value: the mean alone
    assert "clean reference" in single.splitlines()[-1]


def test_csv_round_trip_and_atomic_writes(tmp_path) -> None:
    table = _table()
    table.append({"subject": "007", "site": "GST", "contrast": "PDw", "dice_mean": 0.25, "extra": "x"})
    csv_path = table.to_csv(tmp_path / "out" / "results.csv")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(table)
    assert list(rows[0]) == ["subject", "site", "contrast", "dice_mean", "hd95_mean", "hd95_n_undefined", "extra"]
    assert rows[0]["subject"] == "HH-000" and float(rows[0]["dice_mean"]) == 0.5
    assert rows[2]["hd95_mean"] == "nan" and rows[-1]["hd95_mean"] == "" and rows[-1]["extra"] == "x"

    back = ResultsTable.from_csv(csv_path)
    assert back.rows[-1]["subject"] == "007"  # text columns keep their zeros
    _assert_same_summary(back, table)

    md_path = table.write_markdown(tmp_path / "out" / "results.md", metrics=["dice_mean"])
    assert md_path.read_text().startswith("| site / contrast | dice_mean |")
    table.write_markdown(tmp_path / "out" / "results.md", pivot=True, metric="dice_mean")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.md"]  # no temp files


def _assert_same_summary(a: ResultsTable, b: ResultsTable) -> None:
    sa, sb = a.summary(), b.summary()
    assert len(sa) == len(sb) and sa[0].keys() == sb[0].keys()
    for x, y in zip(sa, sb, strict=True):
        for k in x:
            if isinstance(x[k], float) and math.isnan(x[k]):
                assert math.isnan(y[k]), k
            else:
                assert x[k] == pytest.approx(y[k]), k


def test_table_rejects_text_metric_and_missing_key() -> None:
    with pytest.raises(ValueError, match="dice_mean"):
        ResultsTable([{"site": "A", "dice_mean": "high"}]).summary(group_by=("site",), metrics=["dice_mean"])
    with pytest.raises(ValueError, match="contrast"):
        ResultsTable([{"site": "A", "dice_mean": 0.5}]).summary(metrics=["dice_mean"])

"""``seqinv experiment``: grid files and presets, the cell runner (resume, failures), tables and figure.

The end-to-end tests (``slow``) run tiny grids through ``python -m monai.bundle`` for real; the others check the
grid, the runner's bookkeeping (with a stand-in for ``python -m monai.bundle``) and the table layout on hand-made
results, without training anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from bundle_utils import REPO, TINY

from custom.experiment import load_grid, parse_fraction, read_results, render_tables, run_experiment, write_report
from custom.experiment.grid import GridError, resolve_grid
from custom.experiment.report import summarise, write_results

# ------------------------------------------------------------------------------------------------- grid


def test_parse_fraction():
    assert parse_fraction("1subject").subjects == 1
    assert parse_fraction("3 subjects").subjects == 3 and parse_fraction("3subjects").key == "3subjects"
    assert parse_fraction(0.1).fraction == 0.1 and parse_fraction("0.1").key == "0.1"
    assert parse_fraction(1).key == "1.0" and parse_fraction(1.0).label == "100%"
    assert parse_fraction("1subject").label == "1 subject" and parse_fraction(0.01).label == "1%"
    assert parse_fraction("1subject").overrides == {"train_subjects": 1}
    assert parse_fraction(0.1).overrides == {"fraction": 0.1}
    for bad in (0, 1.5, "abc", "0subjects", True):
        with pytest.raises(GridError):
            parse_fraction(bad)


def _grid(tmp_path: Path, **extra) -> dict:
    (tmp_path / "enc.pt").write_bytes(b"")
    return {
        "encoders": {"base": "enc.pt", "random": "random"},
        "tasks": {"tissue_seg": {"contrasts": ["T1", "PD"], "fractions": ["1subject", 0.1, 1.0]}},
        "seeds": [0, 1],
        **extra,
    }


def test_grid_cells_commands_and_paths(tmp_path):
    raw = _grid(tmp_path, data_root="data/x")
    raw["tasks"]["tissue_seg"]["fraction_overrides"] = {"1subject": {"train_repeats": 9}, 0.1: {"train_repeats": 4}}
    grid = resolve_grid(
        _grid(
            tmp_path,
            tasks=raw["tasks"],
            data_root="data/x",
            overrides={"labels_dir": "labs/", "max_epochs": 3},
            train_configs=["cpu_small.yaml"],
            bundles_dir=str(REPO / "bundles"),
        ),
        base=tmp_path,
    )
    assert grid.encoders["base"] == str(tmp_path / "enc.pt") and grid.encoders["random"] == "random"
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 3 * 2  # encoders x contrasts x fractions x seeds
    assert [c.seed for c in cells[:12]] == [0] * 12  # seed outermost: a first pass over everything comes first
    names = [c.name for c in cells]
    assert len(set(names)) == len(names) and "tissue_seg-PD-1subject-base-s1" in names
    cell = next(c for c in cells if c.name == "tissue_seg-T1-1subject-base-s0")
    cmds = cell.commands(tmp_path / "out" / cell.name, python="PY")
    train, evaluate = cmds["training"], cmds["evaluating"]
    assert train[:5] == ["PY", "-m", "monai.bundle", "run", "training"]
    assert json.loads(train[6]) == [
        str(REPO / "bundles" / "ixi_tissue_seg" / "configs" / "train.yaml"),
        str(REPO / "bundles" / "ixi_tissue_seg" / "configs" / "cpu_small.yaml"),
    ]
    args = dict(zip(train[7::2], train[8::2], strict=True))
    assert args["--train_subjects"] == "1" and "--fraction" not in args
    assert args["--dataset_dir"] == str(tmp_path / "data" / "x" / "ixi")
    assert args["--labels_dir"] == str(tmp_path / "labs") and args["--max_epochs"] == "3"
    assert args["--pretrained_encoder"] == str(tmp_path / "enc.pt")
    assert args["--model_path"] == str(tmp_path / "out" / cell.name / "train" / "model.pt")
    eval_args = dict(zip(evaluate[7::2], evaluate[8::2], strict=True))
    assert evaluate[4] == "evaluating" and evaluate[6].endswith("evaluate.yaml")
    assert eval_args["--model_path"] == args["--model_path"]
    assert eval_args["--output_dir"] == str(tmp_path / "out" / cell.name / "eval")
    assert eval_args["--seed"] == "0" and "--pretrained_encoder" not in eval_args
    fraction_cell = next(c for c in cells if c.name == "tissue_seg-T1-0.1-random-s1")
    fargs = fraction_cell.train_args(tmp_path)
    assert fargs["fraction"] == 0.1 and "train_subjects" not in fargs and fargs["seed"] == 1
    assert fargs["train_repeats"] == 4 and args["--train_repeats"] == "9"  # per-fraction training overrides
    assert "train_repeats" not in next(c for c in cells if c.fraction.key == "1.0").train_args(tmp_path)
    # the resolved grid loads again and gives the same cells
    (tmp_path / "resolved.yaml").write_text(grid.to_yaml())
    again = load_grid(tmp_path / "resolved.yaml", base=REPO)
    assert [c.fingerprint() for c in again.cells()] == [c.fingerprint() for c in cells]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": {"segment": {}}}, "unknown task"),
        ({"tasks": {"tissue_seg": {"contrasts": ["T1w"]}}}, "contrasts"),
        ({"overrides": {"seed": 3}}, "set by the grid"),
        ({"overrides": {"--max_epochs": 3}}, "leading --"),
        ({"colour": "red"}, "unknown grid key"),
        ({"encoders": {"mine": None}}, "has no weights"),
        ({"seeds": [0.5]}, "whole numbers"),
        ({"tasks": {"tissue_seg": {"fractions": [1.0], "fraction_overrides": {0.1: {}}}}}, "not one of the task"),
        ({"train_configs": ["nope.yaml"]}, "nope.yaml"),
    ],
)
def test_grid_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(GridError, match=message):
        resolve_grid({**_grid(tmp_path), **change}, base=REPO)


def test_presets_and_overriding_a_preset(tmp_path):
    cpu = load_grid(preset="cpu", base=REPO)
    assert len(cpu.cells()) == 4 * 2 * 2 * 2  # encoders x fractions x (tissue_seg T1, denoise T1) x seeds
    assert set(cpu.tasks) == {"tissue_seg", "denoise"} and cpu.seeds == [0, 1]
    assert all(c.train_configs[-1].endswith("cpu_small.yaml") for c in cpu.cells())
    assert cpu.encoders["seqinv"].endswith("docs/experiments/cpu/encoders/seqinv_s{seed}.pt")
    # the committed encoders exist in a clone, one per pretraining seed
    assert all(Path(c.encoder_path).is_file() for c in cpu.cells() if c.encoder != "random")
    assert cpu.jobs == 2 and cpu.synthetic_data["ixi_image_models"] == {"IOP": "gmm"}
    assert cpu.data_root == str(REPO / "data" / "experiment_cpu")
    one = next(c for c in cpu.cells() if c.name == "denoise-T1-1subject-seqinv-s1")
    assert one.encoder_path.endswith("seqinv_s1.pt") and one.eval_overrides["test_subjects_per_site"] == 4
    args = one.train_args(tmp_path)
    assert args["train_subjects"] == 1 and args["train_repeats"] == 100 and args["max_epochs"] == 10
    paper = load_grid(preset="paper", base=REPO)
    assert len(paper.cells()) == 4 * 3 * 9 * 3  # encoders x fractions x (3 tasks x 3 contrasts) x seeds
    assert paper.tasks["lesion_seg"]["contrasts"] == ["T1w", "T2w", "FLAIR"]
    mine = tmp_path / "grid.yaml"
    mine.write_text("preset: cpu\nencoders: {seqinv: my/seqinv.pt}\ntasks: {denoise: null}\nseeds: [3]\n")
    grid = load_grid(mine, base=tmp_path)
    assert grid.encoders["seqinv"] == str(tmp_path / "my" / "seqinv.pt") and grid.encoders["random"] == "random"
    assert list(grid.tasks) == ["tissue_seg"] and grid.seeds == [3] and grid.preset == "cpu"


def test_dry_run_writes_the_grid_and_runs_nothing(tmp_path, capsys):
    from custom.cli import main

    assert main(["experiment", "--preset", "cpu", "--out", str(tmp_path / "x"), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "32 cells" in printed and "[32/32] denoise-T1-1.0-seqinv-s1" in printed
    assert "monai.bundle run training" in printed and "--train_subjects 1" in printed
    written = yaml.safe_load((tmp_path / "x" / "grid.yaml").read_text())
    assert written["resolved_from_preset"] == "cpu" and written["tasks"]["tissue_seg"]["fractions"] == ["1subject", 1.0]
    assert not (tmp_path / "x" / "cells").exists()


def test_train_subjects_in_the_datalists(synthetic_dataset):
    from custom.data.arc import arc_datalist
    from custom.data.ixi import ixi_datalist
    from custom.errors import InputError

    root = synthetic_dataset(subjects=9, seed=0, resolution=6.0)
    one = ixi_datalist(root / "ixi", contrast="T1", train_subjects=1)
    everything = ixi_datalist(root / "ixi", contrast="T1", fraction=1.0)
    assert len(one["training"]) == 1 and one["train_subjects"] == 1
    assert one["training"][0] in everything["training"] and one["test"] == everything["test"]
    with pytest.raises(InputError, match="train_subjects 50"):
        ixi_datalist(root / "ixi", contrast="T1", train_subjects=50)
    arc = arc_datalist(root / "arc", contrast="FLAIR", train_subjects=1)
    assert len({i["subject"] for i in arc["training"]}) == 1


def test_test_subjects_per_site(synthetic_dataset):
    from custom.data.ixi import IXIDatasetError, ixi_datalist

    root = synthetic_dataset(subjects=9, seed=0, resolution=6.0)
    everything = ixi_datalist(root / "ixi", contrast="T1")
    capped = ixi_datalist(root / "ixi", contrast="T1", test_subjects_per_site=1)
    per_site = {}
    for item in capped["test"]:
        per_site[item["site"]] = per_site.get(item["site"], 0) + 1
    assert per_site == dict.fromkeys({i["site"] for i in everything["test"]}, 1)
    assert all(item in everything["test"] for item in capped["test"])
    assert capped["training"] == everything["training"] and capped["validation"] == everything["validation"]
    with pytest.raises(IXIDatasetError, match="test_subjects_per_site"):
        ixi_datalist(root / "ixi", contrast="T1", test_subjects_per_site=0)


def test_synthetic_data_spec_is_checked(tmp_path):
    base = {"encoders": {"random": "random"}, "tasks": {"tissue_seg": {}}}
    grid = resolve_grid({**base, "data_root": "d", "synthetic_data": {"subjects": 6}}, base=tmp_path)
    assert grid.synthetic_data == {"subjects": 6, "seed": 0, "resolution": 2.0, "ixi_image_models": {}}
    assert load_grid_from_yaml(grid.to_yaml(), tmp_path).synthetic_data == grid.synthetic_data
    from custom.experiment.runner import site_labels

    models = {"IOP": "gmm", "Guys": "template", "HH": "physics"}
    labelled = resolve_grid({**base, "data_root": "d", "synthetic_data": {"ixi_image_models": models}}, base=tmp_path)
    assert site_labels(labelled) == {"IOP": "IOP-gmm", "GST": "GST-template"} and site_labels(grid) == {}
    with pytest.raises(GridError, match="needs data_root"):
        resolve_grid({**base, "synthetic_data": {"subjects": 6}}, base=tmp_path)
    with pytest.raises(GridError, match="unknown model"):
        resolve_grid({**base, "data_root": "d", "synthetic_data": {"ixi_image_models": {"HH": "gan"}}}, base=tmp_path)
    with pytest.raises(GridError, match="unknown key"):
        resolve_grid({**base, "data_root": "d", "synthetic_data": {"subject": 6}}, base=tmp_path)
    with pytest.raises(GridError, match="jobs"):
        resolve_grid({**base, "jobs": 0}, base=tmp_path)


def load_grid_from_yaml(text: str, folder: Path):
    path = folder / "written.yaml"
    path.write_text(text)
    return load_grid(path, base=folder)


def test_synthetic_data_is_made_once_and_never_replaces_other_data(tmp_path, monkeypatch):
    import custom.data.synthetic as synthetic
    from custom.experiment.runner import SYNTHETIC_MARKER, ensure_synthetic_data

    calls = []

    def fake_generate(out_dir, **kwargs):
        calls.append(kwargs)
        (Path(out_dir) / "ixi").mkdir(parents=True)
        return {"seconds": 0.1}

    monkeypatch.setattr(synthetic, "generate_dataset", fake_generate)
    spec = {"subjects": 6, "seed": 1, "resolution": 2.0, "ixi_image_models": {"IOP": "gmm"}}
    root = tmp_path / "data"
    (tmp_path / "data.partial").mkdir()  # left over by an interrupted run: replaced
    (tmp_path / "data.partial" / "junk").write_text("x")
    lines: list[str] = []
    ensure_synthetic_data(root, spec, lines.append)
    assert calls == [
        {"subjects": 6, "seed": 1, "resolution": 2.0, "ixi_image_models": {"IOP": "gmm"}, "progress": True}
    ]
    assert json.loads((root / SYNTHETIC_MARKER).read_text())["spec"] == spec
    assert (root / "ixi").is_dir() and not (root / "junk").exists() and not (tmp_path / "data.partial").exists()
    ensure_synthetic_data(root, spec, lines.append)  # made earlier with the same spec: reused
    assert len(calls) == 1 and "made earlier" in lines[-1]
    with pytest.raises(GridError, match="was made with"):
        ensure_synthetic_data(root, {**spec, "seed": 2}, lines.append)
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(GridError, match="not made by a grid"):
        ensure_synthetic_data(mine, spec, lines.append)
    assert len(calls) == 1


def test_run_child_reports_its_own_cpu_time_and_stops_at_the_timeout(tmp_path):
    import subprocess

    from custom.experiment.runner import _run_child

    busy = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    with open(tmp_path / "log", "w") as fh:
        rc, cpu = _run_child(busy, fh, dict(os.environ), None)
        assert rc == 0 and 0.5 <= cpu < 5.0
        rc, _ = _run_child([sys.executable, "-c", "raise SystemExit(3)"], fh, dict(os.environ), None)
        assert rc == 3
        with pytest.raises(subprocess.TimeoutExpired):
            _run_child([sys.executable, "-c", "import time; time.sleep(30)"], fh, dict(os.environ), 0.5)


# ------------------------------------------------------------------------------------------------- runner

# stands in for `python -m monai.bundle run training|evaluating ...`: writes what the bundles write
FAKE_BUNDLE = """\
import csv, os, sys, time
args = dict(zip(sys.argv[7::2], sys.argv[8::2]))
phase = sys.argv[4]
print("fake", phase, args.get("--contrast"))
with open(os.path.join(os.path.dirname(sys.argv[0]), "threads.txt"), "a") as fh:
    fh.write(os.environ.get("OMP_NUM_THREADS", "-") + "\\n")
if phase == "training":
    encoder = args["--pretrained_encoder"]
    if encoder != "random" and not os.path.exists(encoder):
        print(f"error: --pretrained_encoder {encoder}: no such file", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(args["--model_path"]), exist_ok=True)
    open(args["--model_path"], "w").write("weights")
else:
    os.makedirs(args["--output_dir"], exist_ok=True)
    score = 0.5 + 0.1 * int(args["--seed"]) + (0.2 if "enc" in open(args["--model_path"]).read() else 0.0)
    with open(os.path.join(args["--output_dir"], "metrics.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "site", "contrast", "dice_mean", "hd95_mean", "hd95_n_undefined"])
        for i, site in enumerate(["GST", "HH", "IOP"]):
            w.writerow([f"s{i}", site, args["--contrast"], score, 3.0, 0])
"""


@pytest.fixture
def fake_python(tmp_path) -> str:
    script = tmp_path / "fake_bundle.py"
    script.write_text(FAKE_BUNDLE)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return str(python)


def _fake_grid(tmp_path: Path, encoders: dict) -> object:
    return resolve_grid(
        {
            "encoders": encoders,
            "tasks": {"tissue_seg": {"contrasts": ["T1"], "fractions": ["1subject", 1.0]}},
            "seeds": [0],
        },
        base=tmp_path,
    )


def test_runner_resumes_reports_failures_and_moves_stale_cells(tmp_path, fake_python):
    from custom.experiment.runner import run_grid

    (tmp_path / "enc.pt").write_text("enc")
    grid = _fake_grid(tmp_path, {"broken": "missing.pt", "base": "enc.pt"})
    out = tmp_path / "out"
    lines: list[str] = []
    result = run_grid(grid, out, python=fake_python, log=lines.append)
    text = "\n".join(lines)
    assert [o.cell.name for o in result.failed] == ["tissue_seg-T1-1subject-broken-s0", "tissue_seg-T1-1.0-broken-s0"]
    log = out / "cells" / "tissue_seg-T1-1subject-broken-s0" / "log.txt"
    assert "[1/4] tissue_seg-T1-1subject-broken-s0: FAILED in training (exit code 2)" in text and str(log) in text
    assert "no such file" in log.read_text() and "no such file" in text  # the log's last lines are shown
    assert "[2/4] tissue_seg-T1-1subject-base-s0: done in" in text and "left" in text
    assert "WARNING: encoder weights" in text
    rows = read_results(out / "results.csv")
    assert {r["encoder"] for r in rows} == {"base"} and {r["metric"] for r in rows} == {"dice_mean", "hd95_mean"}
    assert "2 cell(s) failed" in (out / "tables.md").read_text()

    # rerun: finished cells are skipped (nothing rewritten), failed ones are tried again
    done = out / "cells" / "tissue_seg-T1-1.0-base-s0"
    stamps = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    lines.clear()
    result = run_grid(grid, out, python=fake_python, log=lines.append)
    assert "[4/4] tissue_seg-T1-1.0-base-s0: skipped" in "\n".join(lines) and len(result.failed) == 2
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == stamps

    # an evaluation lost after training: only the evaluation runs again
    (done / "done.json").unlink()
    lines.clear()
    run_grid(grid, out, python=fake_python, log=lines.append)
    assert "training finished earlier" in (done / "log.txt").read_text()
    assert (done / "train" / "model.pt").stat().st_mtime_ns == stamps[done / "train" / "model.pt"]

    # other settings under the same name: the old folder is moved aside and the cell runs again
    changed = resolve_grid({**yaml.safe_load(grid.to_yaml()), "overrides": {"max_epochs": 7}}, base=tmp_path)
    lines.clear()
    result = run_grid(changed, out, python=fake_python, log=lines.append)
    assert (out / "cells" / "tissue_seg-T1-1.0-base-s0.stale1" / "done.json").is_file()
    assert "--max_epochs 7" in (done / "cell.json").read_text() and (done / "done.json").is_file()


def test_jobs_run_cells_at_once_with_their_share_of_the_cores(tmp_path, fake_python, monkeypatch):
    from custom.experiment.runner import run_grid

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    (tmp_path / "enc.pt").write_text("enc")
    grid = _fake_grid(tmp_path, {"random": "random", "base": "enc.pt", "broken": "missing.pt"})
    grid.jobs = 2
    lines: list[str] = []
    result = run_grid(grid, tmp_path / "out", python=fake_python, log=lines.append)
    text = "\n".join(lines)
    assert "running 2 cells at once, 2 CPU thread(s) each" in text
    assert [o.cell.name for o in result.outcomes] == [c.name for c in grid.cells()]  # in grid order
    assert [o.cell.encoder for o in result.failed] == ["broken", "broken"]
    assert set((tmp_path / "threads.txt").read_text().split()) == {"2"}
    rows = read_results(tmp_path / "out" / "results.csv")
    assert {r["encoder"] for r in rows} == {"random", "base"}
    for cell in ("tissue_seg-T1-1.0-base-s0", "tissue_seg-T1-1subject-random-s0"):
        done = json.loads((tmp_path / "out" / "cells" / cell / "done.json").read_text())
        assert done["cpu_seconds"] >= 0 and set(done["cpu_seconds_by_phase"]) == {"training", "evaluating"}


# ------------------------------------------------------------------------------------------------- tables


def _rows(values: dict) -> list[dict]:
    """Long rows from {(encoder, site, fraction, seed): [subject values]} for tissue_seg T1 dice_mean."""
    rows = []
    for (encoder, site, fraction, seed), subjects in values.items():
        for i, v in enumerate(subjects):
            rows.append(
                {
                    "encoder": encoder, "task": "tissue_seg", "fraction": fraction, "contrast": "T1", "seed": seed,
                    "site": site, "subject": f"{site}{i}", "metric": "dice_mean", "value": v,
                }
            )  # fmt: skip
    return rows


HAND_MADE = {
    # per-seed means: base GST 1.0 -> 0.70, 0.80 (mean 0.750, std 0.0707); seqinv 0.80, 0.90 (0.850 +- 0.0707)
    ("base", "GST", "1.0", 0): [0.6, 0.8],
    ("base", "GST", "1.0", 1): [0.8, 0.8],
    ("seqinv", "GST", "1.0", 0): [0.8, 0.8],
    ("seqinv", "GST", "1.0", 1): [0.9, 0.9],
    ("random", "GST", "1.0", 0): [0.5, 0.5],
    ("random", "GST", "1.0", 1): [0.5, float("nan")],  # NaN left out of the subject mean
    # HH 1subject: base 0.60 (both seeds), seqinv 0.50, random 0.70 (best); one seed only for random
    ("base", "HH", "1subject", 0): [0.6],
    ("base", "HH", "1subject", 1): [0.6],
    ("seqinv", "HH", "1subject", 0): [0.5],
    ("seqinv", "HH", "1subject", 1): [0.5],
    ("random", "HH", "1subject", 0): [0.7],
}


def _table_lines(markdown: str, title_part: str) -> dict[str, list[str]]:
    block = markdown.split("### ")
    block = next(b for b in block if b.startswith(title_part))
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_summary_is_mean_and_std_over_seeds_of_subject_means():
    stats = summarise(_rows(HAND_MADE))
    s = stats[("tissue_seg", "T1", "dice_mean", "base", "GST", "1.0")]
    assert s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(math.sqrt(0.005)) and s["n"] == 2
    r = stats[("tissue_seg", "T1", "dice_mean", "random", "GST", "1.0")]
    assert r["mean"] == pytest.approx(0.5) and r["std"] == pytest.approx(0.0)


def test_table_layout_bold_best_and_delta_vs_base():
    markdown = render_tables(_rows(HAND_MADE), encoders=["random", "base", "seqinv"])
    table = _table_lines(markdown, "tissue_seg · T1 · dice_mean")
    # columns: site x training-set size (smallest first), then the difference to Base
    assert table["encoder"] == ["GST, 1 subject", "GST, 100%", "HH, 1 subject", "HH, 100%", "Δ vs Base"]
    assert list(table)[1:] == ["Random", "Base", "SeqInv"]  # rows in the given encoder order
    header = table["encoder"]
    col = {name: i for i, name in enumerate(header)}
    assert table["Base"][col["GST, 100%"]] == "0.750 ± 0.071"
    assert table["SeqInv"][col["GST, 100%"]] == "**0.850** ± 0.071"  # best of the column in bold
    assert table["Random"][col["GST, 100%"]] == "0.500 ± 0.000"
    assert table["Random"][col["HH, 1 subject"]] == "**0.700** (n=1)"  # one seed: the mean alone, counted
    assert table["Base"][col["HH, 1 subject"]] == "0.600 ± 0.000"
    assert table["Base"][col["GST, 1 subject"]] == "n/a"
    # delta: mean over the columns where both have a value of (encoder - Base)
    assert table["SeqInv"][col["Δ vs Base"]] == "+0.000"  # (+0.10 - 0.10) / 2
    assert table["Random"][col["Δ vs Base"]] == "-0.075"  # (-0.25 + 0.10) / 2
    assert table["Base"][col["Δ vs Base"]] == "–"
    assert "higher is better" in markdown and "over 2 seed(s)" in markdown


def test_lower_is_better_and_no_delta_without_base():
    rows = [{**r, "metric": "hd95_mean", "value": 10 * r["value"]} for r in _rows(HAND_MADE) if r["encoder"] != "base"]
    markdown = render_tables(rows)
    table = _table_lines(markdown, "tissue_seg · T1 · hd95_mean")
    assert "Δ vs Base" not in table["encoder"] and "lower is better" in markdown
    col = {name: i for i, name in enumerate(table["encoder"])}
    assert table["Random"][col["GST, 100%"]].startswith("**5.00**")  # smallest HD95 in bold
    assert not table["SeqInv"][col["GST, 100%"]].startswith("**")


def test_results_csv_round_trip_and_report_files(tmp_path):
    rows = _rows(HAND_MADE)
    write_results(rows, tmp_path / "results.csv")
    with open(tmp_path / "results.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["encoder", "task", "fraction", "contrast", "seed", "site", "subject", "metric", "value"]
    back = read_results(tmp_path / "results.csv")
    assert len(back) == len(rows) and back[0]["seed"] == 0 and back[0]["fraction"] == "1.0"
    files = write_report(back, tmp_path, failed=[("x-cell", tmp_path / "x" / "log.txt")])
    assert files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = files["tables"].read_text()
    assert "x-cell" in text and "| SeqInv |" in text
    empty = write_report([], tmp_path / "empty")
    assert "figure" not in empty and "No finished cells" in empty["tables"].read_text()


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_setup(synthetic_dataset, tmp_path_factory) -> dict:
    import torch

    from custom.networks import Encoder

    root = synthetic_dataset(subjects=9, seed=0, resolution=6.0)
    folder = tmp_path_factory.mktemp("experiment")
    torch.manual_seed(1)
    torch.save(Encoder(features=TINY["encoder_features"]).state_dict(), folder / "tiny_encoder.pt")
    tiny = {**TINY, "max_epochs": 1}
    grid = {
        "encoders": {"base": str(folder / "tiny_encoder.pt"), "random": "random"},
        "tasks": {"tissue_seg": {"contrasts": ["T1"], "fractions": ["1subject"]}},
        "seeds": [0],
        "data_root": str(root),
        "train_overrides": tiny,
    }
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid))
    return {"folder": folder, "grid": folder / "grid.yaml", "raw": grid}


@pytest.fixture(scope="module")
def tiny_run(tiny_setup) -> dict:
    lines: list[str] = []
    out = tiny_setup["folder"] / "out"
    result = run_experiment(tiny_setup["grid"], out=out, log=lines.append)
    return {"result": result, "lines": lines, "out": out}


@pytest.mark.slow
def test_tiny_grid_end_to_end(tiny_run):
    out, result = tiny_run["out"], tiny_run["result"]
    assert not result.failed, "\n".join(tiny_run["lines"])
    rows = read_results(out / "results.csv")
    assert {r["encoder"] for r in rows} == {"base", "random"}
    assert {r["site"] for r in rows} == {"GST", "HH", "IOP"} and {r["fraction"] for r in rows} == {"1subject"}
    assert {"dice_mean", "hd95_mean", "dice_GM"} <= {r["metric"] for r in rows}
    tables = (out / "tables.md").read_text()
    assert "tissue_seg · T1 · dice_mean" in tables and "| Base |" in tables and "Δ vs Base" in tables
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    grid = yaml.safe_load((out / "grid.yaml").read_text())
    assert grid["encoders"]["base"].endswith("tiny_encoder.pt") and grid["train_overrides"]["max_epochs"] == 1
    for name in ("tissue_seg-T1-1subject-base-s0", "tissue_seg-T1-1subject-random-s0"):
        cell = out / "cells" / name
        assert (cell / "done.json").is_file() and (cell / "train" / "model.pt").is_file()
        assert json.loads((cell / "done.json").read_text())["cpu_seconds"] > 0
        assert "monai.bundle run training" in (cell / "log.txt").read_text()
    progress = "\n".join(tiny_run["lines"])
    assert "[2/2] tissue_seg-T1-1subject-random-s0: done in" in progress and "elapsed" in progress


@pytest.mark.slow
def test_rerun_skips_finished_cells(tiny_run, tiny_setup):
    out = tiny_run["out"]
    files = [p for p in (out / "cells").rglob("*") if p.is_file()]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    lines: list[str] = []
    result = run_experiment(tiny_setup["grid"], out=out, log=lines.append)
    assert [o.status for o in result.outcomes] == ["skipped", "skipped"]
    assert sum("skipped" in line for line in lines) == 2
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing retrained or re-evaluated
    assert {r["encoder"] for r in read_results(out / "results.csv")} == {"base", "random"}


@pytest.mark.slow
def test_failed_cell_is_reported_and_the_others_go_on(tiny_setup, tmp_path, capsys):
    from custom.cli import main

    grid = {**tiny_setup["raw"], "encoders": {"broken": str(tmp_path / "no_such_encoder.pt"), "random": "random"}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--grid", str(tmp_path / "grid.yaml"), "--out", str(out)])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    log = out / "cells" / "tissue_seg-T1-1subject-broken-s0" / "log.txt"
    assert "tissue_seg-T1-1subject-broken-s0: FAILED in training" in printed and str(log) in printed
    assert "no_such_encoder.pt" in log.read_text()
    assert "[2/2] tissue_seg-T1-1subject-random-s0: done in" in printed
    rows = read_results(out / "results.csv")
    assert {r["encoder"] for r in rows} == {"random"}
    assert "tissue_seg-T1-1subject-broken-s0" in (out / "tables.md").read_text()
    assert os.path.getsize(out / "figure.png") > 0


def test_interrupt_with_jobs_starts_no_queued_cell(tmp_path, monkeypatch):
    import signal
    import threading
    import time

    import custom.experiment.runner as runner

    started: list[str] = []
    lock = threading.Lock()

    def fake_run_cell(cell, folder, **kwargs):
        with lock:
            started.append(cell.name)
            first = len(started) == 1
        if first:  # Ctrl-C: the signal reaches the main thread, which waits for the cells
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.3)
        return runner.CellOutcome(cell, "failed", 0.3, folder / "log.txt", "training", "stub")

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    grid = _fake_grid(tmp_path, {"random": "random", "other": "random"})
    grid.jobs = 2
    lines: list[str] = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_grid(grid, tmp_path / "out", log=lines.append)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(started) <= 2 < len(grid.cells())
    assert "interrupted; the same command resumes" in "\n".join(lines)

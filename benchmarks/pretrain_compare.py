"""Random / Base / SeqAug / SeqInv (/ SeqInv + dense) encoders compared by the invariance probe, over seeds.

1. Trains each mode x seed with the seqinv_pretrain bundle itself (``python -m monai.bundle run training`` with
   train.yaml + cpu_small.yaml; the ``seqinv_dense`` row is SeqInv with ``--dense_weight 1.0``), ``--jobs`` at a
   time, each into ``<runs>/<mode>_s<seed>/`` (a finished run is skipped; an interrupted one resumes).
2. For every seed, runs :func:`custom.probe.run_probe` on held-out synthetic subjects with that seed's encoders
   plus the position-only, intensity and random-init baselines (the random encoder seeded by the same seed).
3. Writes ``<out>/table.md`` (mean +- standard deviation over seeds of every metric, and the mean of the
   per-seed bootstrap intervals) and ``<out>/rows.json``.

    python benchmarks/pretrain_compare.py --seeds 0 1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "seqinv_pretrain" / "configs"
MODES = {
    "base": ["--mode", "base"],
    "seqaug": ["--mode", "seqaug"],
    "seqinv": ["--mode", "seqinv"],
    "seqinv_dense": ["--mode", "seqinv", "--dense_weight", "1.0"],
}
METRICS = ("cross_contrast", "same_contrast", "dense_difference_deepest", "dense_difference_mean", "retrieval_top1")


def train_command(mode: str, seed: int, run_dir: Path, dataset_dir: str, extra: list[str]) -> list[str]:
    configs = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'cpu_small.yaml'}']"
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
        *MODES[mode], "--seed", str(seed), "--dataset_dir", dataset_dir,
        "--output_dir", str(run_dir), "--encoder_weights", str(run_dir / "model.pt"), *extra,
    ]  # fmt: skip


def finished(run_dir: Path) -> bool:
    return (run_dir / "finished").is_file() and (run_dir / "model.pt").is_file()


def train_all(args: argparse.Namespace) -> None:
    queue = [(m, s) for s in args.seeds for m in args.modes if not finished(args.runs / f"{m}_s{s}")]
    running: list[tuple[subprocess.Popen, Path, float]] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            mode, seed = queue.pop(0)
            run_dir = args.runs / f"{mode}_s{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = train_command(mode, seed, run_dir, args.dataset_dir, args.train_args)
            log = open(run_dir / "train.log", "a")
            print(f"training {mode} seed {seed} -> {run_dir} (log: {run_dir / 'train.log'})", flush=True)
            running.append(
                (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), run_dir, time.time())
            )
        time.sleep(5)
        for item in list(running):
            proc, run_dir, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode == 0:
                (run_dir / "finished").write_text(f"{time.time() - start:.0f} s\n")
                print(f"done {run_dir.name} in {time.time() - start:.0f} s", flush=True)
            else:
                print(f"FAILED {run_dir.name} (exit {proc.returncode}); see {run_dir / 'train.log'}", flush=True)


def probe_all(args: argparse.Namespace) -> list[dict]:
    from custom.probe import run_probe

    rows = []
    for seed in args.seeds:
        encoders = {m: str(args.runs / f"{m}_s{seed}" / "model.pt") for m in args.modes}
        encoders = {m: p for m, p in encoders.items() if Path(p).is_file()}
        out = args.out / f"probe_s{seed}"
        cached = out / "probe.json"
        if cached.is_file():  # a finished probe of the same encoders is reused (resume after an interruption)
            record = json.loads(cached.read_text())
            if set(record.get("encoders", {})) >= set(encoders) and record.get("normalize") == args.normalize:
                rows += [{**row, "seed": seed} for row in record["rows"]]
                continue
        # default: images normalised as the pretraining views were (view_norm histeq), for every encoder
        for row in run_probe(encoders, args.heldout, seed=seed, output_dir=out, normalize=args.normalize):
            rows.append({**row, "seed": seed})
    return rows


def summarise(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["encoder"] for r in rows))
    lines = [
        "| encoder | seeds | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name in names:
        mine = [r for r in rows if r["encoder"] == name]
        cells = []
        for metric in METRICS:
            values = [float(r[metric]) for r in mine if r.get(metric) is not None]
            if not values:
                cells.append("-")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cell = f"{statistics.mean(values):.3f} +- {sd:.3f}"
            cis = [r.get(f"{metric}_ci") for r in mine if r.get(f"{metric}_ci")]
            if cis:
                lo = statistics.mean(c[0] for c in cis)
                hi = statistics.mean(c[1] for c in cis)
                cell += f" [{lo:.3f}, {hi:.3f}]"
            cells.append(cell)
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--dataset_dir", default=str(REPO / "data" / "synthetic" / "qmri"))
    ap.add_argument("--heldout", default=str(REPO / "data" / "heldout" / "qmri"))
    ap.add_argument("--runs", type=Path, default=REPO / "bundles" / "seqinv_pretrain" / "runs" / "compare")
    ap.add_argument("--out", type=Path, default=REPO / "bundles" / "seqinv_pretrain" / "runs" / "compare")
    ap.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="passed on to every training run")
    ap.add_argument("--skip_training", action="store_true")
    ap.add_argument("--normalize", default="histeq", help="probe image normalisation: histeq (as the views) | zscore")
    args = ap.parse_args()
    if not Path(args.heldout).is_dir():
        from custom.data.synthetic import generate_dataset

        print(f"held-out subjects missing: synthesising 12 at {Path(args.heldout).parent} (seed 1000)")
        generate_dataset(Path(args.heldout).parent, subjects=12, seed=1000, resolution=2.0)
    if not args.skip_training:
        train_all(args)
    rows = probe_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    table = summarise(rows)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

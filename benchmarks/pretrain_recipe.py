"""Does the contrastive term learn? Short seqinv_pretrain runs per recipe x mode x seed, through monai.bundle.

Each run is the bundle's own training workflow (train.yaml + cpu_small.yaml + the recipe's overrides) for a
fixed number of iterations. Printed per run: the iteration where the NT-Xent term (moving average over
``--window`` iterations) first falls ``--margin`` below its chance value ``log(2B - 1)`` (the value when
positives are no closer than negatives), the NT-Xent and reconstruction averages of the last window, the
embedding standard deviation (collapse check: it tends to 0 when every view maps to one point) and the
positive / negative cosines. A JSON line per run goes to ``--out``.

    python benchmarks/pretrain_recipe.py --iterations 150 --modes seqinv base seqaug \\
        --recipe paper '{}' --recipe no_dropout '{"dropout": 0.0}'
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "seqinv_pretrain" / "configs"


def run_one(recipe: dict, mode: str, seed: int, iterations: int, dataset_dir: str, workers: int) -> dict:
    """Train one recipe; return the per-iteration scalars."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "mode": mode,
            "seed": seed,
            "dataset_dir": dataset_dir,
            "output_dir": tmp,
            "encoder_weights": str(Path(tmp) / "model.pt"),
            "max_epochs": 1,
            "iterations_per_epoch": iterations,
            "num_workers": workers,
            "checkpoint_interval": 0,
            "snapshot_interval": 10**6,
            **recipe,
        }
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "cpu_small.yaml")],
            workflow_type="train",
            run_id="training",
            **overrides,
        )
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        trace: list[dict] = []

        @trainer.on(Events.ITERATION_COMPLETED)
        def record(engine) -> None:
            out = engine.state.output
            keys = ("contrastive", "reconstruction", "dense", "embedding_std", "pos_cosine", "neg_cosine")
            trace.append({k: float(out[k]) for k in keys if k in out})

        start = time.perf_counter()
        wf.run()
        seconds = time.perf_counter() - start
        batch = int(wf.parser.get_parsed_content("batch_size"))
    return {"trace": trace, "seconds": seconds, "batch_size": batch}


def summarise(trace: list[dict], batch: int, window: int, margin: float) -> dict:
    chance = math.log(2 * batch - 1)
    values = [t["contrastive"] for t in trace]
    left = None
    for i in range(window, len(values) + 1):
        if sum(values[i - window : i]) / window < chance - margin:
            left = i
            break
    last = trace[-window:]

    def mean(key: str) -> float:
        return sum(t[key] for t in last) / len(last)

    return {
        "chance": round(chance, 4),
        "left_chance_at": left,
        "ntxent_last": round(mean("contrastive"), 4),
        "recon_last": round(mean("reconstruction"), 4),
        "dense_last": round(mean("dense"), 4) if "dense" in last[0] else None,
        "embedding_std_last": round(mean("embedding_std"), 4),
        "pos_cosine_last": round(mean("pos_cosine"), 4),
        "neg_cosine_last": round(mean("neg_cosine"), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    ap.add_argument("--modes", nargs="+", default=["seqinv", "seqaug", "base"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--margin", type=float, default=0.05, help="below chance by this much counts as learning")
    ap.add_argument("--dataset_dir", default=str(REPO / "data" / "synthetic" / "qmri"))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("recipe | mode | seed | left chance at | NT-Xent (chance) | recon | emb std | pos/neg cos | s")
    for name, text in args.recipe:
        recipe = json.loads(text)
        for mode in args.modes:
            for seed in args.seeds:
                res = run_one(recipe, mode, seed, args.iterations, args.dataset_dir, args.workers)
                row = {
                    "recipe": name,
                    "overrides": recipe,
                    "mode": mode,
                    "seed": seed,
                    "iterations": args.iterations,
                    "seconds": round(res["seconds"], 1),
                    **summarise(res["trace"], res["batch_size"], args.window, args.margin),
                }
                print(
                    f"{name} | {mode} | {seed} | {row['left_chance_at']} | {row['ntxent_last']} ({row['chance']}) | "
                    f"{row['recon_last']} | {row['embedding_std_last']} | "
                    f"{row['pos_cosine_last']}/{row['neg_cosine_last']} | {row['seconds']}",
                    flush=True,
                )
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**row, "trace_ntxent": [t["contrastive"] for t in res["trace"]]}) + "\n")


if __name__ == "__main__":
    main()

"""When did the contrastive term leave chance? Read from seqinv_pretrain TensorBoard logs (one folder per run).

    python benchmarks/ntxent_from_logs.py bundles/seqinv_pretrain/runs/compare/*_s*

Prints per run: the first iteration where the NT-Xent moving average (``--window`` iterations) is ``--margin``
below chance log(2B - 1), that iteration as a share of the run, the last-window NT-Xent, embedding standard
deviation and positive / negative cosines.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        out[tag.split("/")[-1]] = [e.value for e in acc.Scalars(tag)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--margin", type=float, default=0.05)
    args = ap.parse_args()
    chance = math.log(2 * args.batch_size - 1)
    print(
        f"| run | left chance at (share of run) | NT-Xent last {args.window} (chance {chance:.3f}) "
        "| embedding std | pos / neg cosine |"
    )
    print("|---|---|---|---|---|")
    for run in args.runs:
        s = scalars(run)
        nt = s.get("contrastive", [])
        if not nt:
            print(f"| {run.name} | no contrastive scalars | | | |")
            continue
        w = args.window
        left = next((i for i in range(w, len(nt) + 1) if sum(nt[i - w : i]) / w < chance - args.margin), None)

        def last(key: str, s: dict = s, w: int = w) -> float:
            v = s.get(key, [float("nan")])[-w:]
            return sum(v) / len(v)

        share = f"{left} ({left / len(nt):.0%})" if left else f"never in {len(nt)}"
        print(
            f"| {run.name} | {share} | {last('contrastive'):.3f} | {last('embedding_std'):.3f} "
            f"| {last('pos_cosine'):.2f} / {last('neg_cosine'):.2f} |"
        )


if __name__ == "__main__":
    main()

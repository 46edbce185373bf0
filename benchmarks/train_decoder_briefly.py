"""Train the paper-size tissue decoder for a few minutes on CPU, for realistic label margins in ``infer.py``.

The inference benchmark's label agreement (fast path vs the current path) is pessimistic with random weights: a
random network's class logits are nearly tied everywhere, so tiny numerical differences flip labels. This script
gives a network whose margins look like a trained one's: the paper-size :class:`~custom.networks.FrozenEncoderUNet`
(encoder 64..768 with random frozen weights, seed 0, as no pretrained encoder ships with the repository; decoder
768..32 trained), 96^3 patches of 1 mm voxels, Dice + CE, AdamW, on the synthetic IXI T1 scans (written by
``seqinv synth`` / the bundles on first run, 2 mm, resampled to 1 mm by the preprocessing). One patch per step,
half of them centred on brain voxels; bfloat16 autocast on CPUs that support it (the decoder's weights stay
float32). It stops after ``--steps`` steps or ``--minutes`` minutes, whichever comes first, and writes
``model.pt`` (state dict) and ``model.json`` (settings, last loss, steps) to ``--out``:

    python benchmarks/train_decoder_briefly.py --out /tmp/brief --minutes 30
    python benchmarks/infer.py --model /tmp/brief/model.pt --variants paper

Not a training recipe (the bundle's ``train.yaml`` is): a brief fit, for benchmarking only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from custom.data.ixi import ixi_datalist
from custom.fast_inference import bf16_supported
from custom.segmentation import DownstreamSettings, build_network, train_transforms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for model.pt and model.json")
    parser.add_argument("--dataset_dir", default="data/synthetic/ixi", help="IXI layout with labels/ (synthetic)")
    parser.add_argument("--steps", type=int, default=200, help="at most this many optimiser steps")
    parser.add_argument("--minutes", type=float, default=30.0, help="stop after this many minutes")
    parser.add_argument("--learning_rate", type=float, default=1.0e-3)
    parser.add_argument("--patch", type=int, default=96, help="cubic patch size (paper: 96)")
    args = parser.parse_args()

    set_determinism(seed=0)
    settings = DownstreamSettings(patch_size=(args.patch,) * 3, dropout=0.0)
    network = build_network(settings).train()
    items = ixi_datalist(args.dataset_dir, contrast="T1")["training"]
    transform = train_transforms(settings, label_key="label", samples_per_image=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=args.learning_rate, weight_decay=1.0e-2)
    bf16 = bf16_supported()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    print(f"{len(items)} training scans; bf16 autocast {bf16}; {torch.get_num_threads()} threads", flush=True)

    start, step, losses = time.perf_counter(), 0, []
    while step < args.steps and time.perf_counter() - start < 60.0 * args.minutes:
        for patch in transform(items[step // 2 % len(items)]):
            image, label = patch["image"].as_tensor()[None], patch["label"].as_tensor()[None]
            with autocast:
                loss = loss_fn(network(image).float(), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(network.trainable_parameters()), 12.0)
            optimizer.step()
            step += 1
            losses.append(float(loss))
            elapsed = time.perf_counter() - start
            print(f"step {step}: loss {losses[-1]:.4f} ({elapsed:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, out / "model.pt")
    record = {**settings.to_dict(), "steps": step, "last_losses": losses[-10:], "encoder": "random, seed 0"}
    (out / "model.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'model.pt'} after {step} steps, mean loss of the last 10: {sum(losses[-10:]) / 10:.4f}")


if __name__ == "__main__":
    main()

"""Pretraining throughput: the bundle's ``PretrainingTrainer`` against a plain PyTorch loop, in the same run.

Both implementations train the same network (``custom.networks.PretrainingModel``, same widths) on the same data
(the bundle's ``train#dataloader``, i.e. the same transforms, batch size and sampler) with the same settings from
``bundles/seqinv_pretrain/configs``:

* ``ours``: the bundle's ``train#trainer`` (ignite/MONAI engine, NT-Xent from ``custom.losses``, the configured
  per-iteration handlers: stats logging and TensorBoard; written to a temporary folder, checkpointing not attached);
* ``baseline``: a plain loop: forward both views (concatenated in one batch, as the trainer does), MONAI
  ``ContrastiveLoss`` on the projected embeddings + L1 reconstruction of each view, AdamW, backward, gradient
  clipping, step (AMP with ``torch.amp.GradScaler`` on CUDA).

Each runs ``--warmup + --iterations`` iterations in a fresh child process (so peak-memory figures are its own);
the last ``--iterations`` are timed. Printed per implementation: iterations/s, seconds per iteration, the share of
the step time spent waiting for the next batch (the data fetch is timed separately: ignite's
``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED`` for the trainer, around ``next(iterator)`` for the loop), peak
memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's max RSS from ``getrusage``, main process
only, DataLoader workers excluded, with its growth during training), and the ours / baseline ratio of it/s.
Absolute figures depend on the machine's load; compare the ratio. With ``--rounds N`` both runs are repeated
with their order alternated (ours, baseline, baseline, ours, ...), and the median round of each is shown.

Config: ``cpu_small`` (train.yaml + cpu_small.yaml: 48^3, batch 4, small widths) by default on CPU, ``paper``
(train.yaml alone: 96^3, batch 8, full widths, AMP) by default on CUDA. The default data set
(``data/synthetic/qmri``) is synthesised on first use.

    python benchmarks/pretrain.py [--iterations 20] [--warmup 3] [--num_workers 2] [--config cpu_small|paper]
                                  [--rounds 1] [--device cuda:0] [--dataset_dir data/synthetic/qmri]
                                  [--view_path per_sample|batched|batched_workers]

With ``--view_path batched`` the views of each batch are made inside the iteration (on the training device); their
time is shown as the "views share" beside the data-wait share (the step waits for data for their sum).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "seqinv_pretrain"
CONFIG_FILES = {
    "paper": [BUNDLE / "configs" / "train.yaml"],
    "cpu_small": [BUNDLE / "configs" / "train.yaml", BUNDLE / "configs" / "cpu_small.yaml"],
}
DEFAULT_DATASET = "data/synthetic/qmri"
IMPLEMENTATIONS = ("ours", "baseline")


# ---------------------------------------------------------------- configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=DEFAULT_DATASET, help="qMRI subject folders (default synthesised)")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before them")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--config", choices=tuple(CONFIG_FILES), default=None, help="default: paper on CUDA")
    parser.add_argument("--device", default=None, help="torch device (default cuda:0 when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="monai.utils.set_determinism seed (not the data split)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both runs, alternating their order")
    parser.add_argument("--impl", choices=("both", *IMPLEMENTATIONS), default="both", help="run only one")
    parser.add_argument(
        "--view_path", default=None, help="per_sample | batched | batched_workers (default: the config's view_path)"
    )
    parser.add_argument("--result_json", default=None, help=argparse.SUPPRESS)  # child -> parent
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.num_workers < 0 or args.rounds < 1:
        parser.error("need --iterations >= 1, --rounds >= 1, --warmup >= 0 and --num_workers >= 0")
    if args.device is None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.config is None:
        args.config = "paper" if torch.device(args.device).type == "cuda" else "cpu_small"
    # Absolute, so the children and the datalist builder see the same folder; the datalist builder synthesises
    # the default location (relative to the repository root) when it is missing.
    base = REPO if args.dataset_dir == DEFAULT_DATASET else Path.cwd()
    args.dataset_dir = str((base / args.dataset_dir).resolve())
    return args


def bundle_config(args: argparse.Namespace, output_dir: str) -> ConfigParser:
    """The bundle's training config (train.yaml [+ cpu_small.yaml]) with the benchmark's overrides."""
    device = torch.device(args.device)
    parser = ConfigParser()
    parser.read_config([str(f) for f in CONFIG_FILES[args.config]])
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": args.dataset_dir,
        "output_dir": output_dir,  # TensorBoard logs, snapshots: thrown away
        "encoder_weights": str(Path(output_dir) / "model.pt"),  # never overwrite the bundle's models/model.pt
        "device": f"$torch.device('{device}')",
        "amp": device.type == "cuda",
        "num_workers": args.num_workers,
        "max_epochs": 1,
        "iterations_per_epoch": args.warmup + args.iterations,
    }
    if args.view_path:
        overrides["view_path"] = args.view_path
    for key, value in overrides.items():
        parser[key] = value
    parser["train#dataset#progress"] = False  # no caching progress bar in the benchmark's output
    return parser


# ---------------------------------------------------------------- timing and memory


@dataclass
class Step:
    fetch_start: float
    fetch_end: float
    end: float
    views: float = 0.0  # seconds making the views on the device (view_path batched)


@dataclass
class StepTimer:
    """Per-iteration timestamps: data fetch start / end and step end (after a CUDA synchronisation)."""

    device: torch.device
    steps: list[Step] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    _fetch_start: float = 0.0
    _fetch_end: float = 0.0
    _views: float = 0.0

    def fetch_started(self, *_: object) -> None:
        self._fetch_start = time.perf_counter()

    def fetch_completed(self, *_: object) -> None:
        self._fetch_end = time.perf_counter()

    def step_completed(self, loss: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.steps.append(Step(self._fetch_start, self._fetch_end, time.perf_counter(), self._views))
        self.losses.append(loss)
        self._views = 0.0

    def timed_views(self, batch_views: Any) -> Any:
        """``batch_views`` wrapped so its time (device synchronised) is recorded for the current step."""

        def call(batch: Any, **kwargs: Any) -> Any:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = batch_views(batch, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._views += time.perf_counter() - start
            return out

        return call


@dataclass
class Result:
    implementation: str
    iterations: int
    seconds: float
    iterations_per_second: float
    seconds_per_iteration: float
    data_wait_share: float
    view_share: float
    peak_memory_bytes: int
    memory_growth_bytes: int
    memory_kind: str
    first_loss: float
    last_loss: float


def _max_rss_bytes() -> int:
    """Max resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _memory_mark(device: torch.device) -> int:
    """Reset the CUDA peak counter and return the current level (CUDA), or the max RSS so far (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return _max_rss_bytes()


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _max_rss_bytes()


def summarise(name: str, timer: StepTimer, warmup: int, device: torch.device, mark: int) -> Result:
    timed = timer.steps[warmup:]
    if not timed:
        raise RuntimeError(f"{name}: only {len(timer.steps)} iterations ran, none after the {warmup} warm-up ones")
    seconds = timed[-1].end - timed[0].fetch_start
    wait = sum(s.fetch_end - s.fetch_start for s in timed)
    views = sum(s.views for s in timed)
    peak = _memory_peak(device)
    return Result(
        implementation=name,
        iterations=len(timed),
        seconds=seconds,
        iterations_per_second=len(timed) / seconds,
        seconds_per_iteration=seconds / len(timed),
        data_wait_share=wait / seconds,
        view_share=views / seconds,
        peak_memory_bytes=peak,
        memory_growth_bytes=max(peak - mark, 0),
        memory_kind="cuda max allocated" if device.type == "cuda" else "process max RSS",
        first_loss=timer.losses[0],
        last_loss=timer.losses[-1],
    )


# ---------------------------------------------------------------- the two implementations


def run_ours(parser: ConfigParser, args: argparse.Namespace) -> Result:
    """The bundle's ``train#trainer`` with timing handlers attached after its own."""
    from ignite.engine import Events

    device = torch.device(args.device)
    trainer = parser.get_parsed_content("train#trainer")
    timer = StepTimer(device)
    if trainer.batch_views is not None:  # view_path batched: the views are made inside the iteration
        trainer.batch_views = timer.timed_views(trainer.batch_views)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, timer.fetch_started)
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, timer.fetch_completed)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: timer.step_completed(float(engine.state.output["loss"]))
    )
    mark = _memory_mark(device)
    trainer.run()
    return summarise("ours", timer, args.warmup, device, mark)


def _plain(x: Any, device: torch.device) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device)


def run_baseline(parser: ConfigParser, args: argparse.Namespace) -> Result:
    """A plain PyTorch loop with MONAI ``ContrastiveLoss`` on the same network, data and optimiser settings."""
    from monai.losses import ContrastiveLoss

    from custom.networks import PretrainingModel

    def value(key: str) -> Any:
        return parser.get_parsed_content(key)

    device = torch.device(args.device)
    amp = device.type == "cuda"
    loader = value("train#dataloader")
    batch_views = value("train#views").batch_views
    model = PretrainingModel(
        in_channels=1,
        features=value("encoder_features"),
        dropout=value("dropout"),
        proj_hidden=value("projection_hidden"),
        proj_dim=value("projection_dim"),
        recon_features=value("recon_features"),
        reconstruction=value("reconstruction"),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=value("learning_rate"), weight_decay=value("weight_decay"))
    contrastive = ContrastiveLoss(temperature=value("temperature"))
    w_con, w_rec, clip = value("contrastive_weight"), value("reconstruction_weight"), value("grad_clip")
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    timer = StepTimer(device)
    mark = _memory_mark(device)
    model.train()
    batches = iter(loader)
    for _ in range(len(loader)):
        timer.fetch_started()
        batch = next(batches)
        timer.fetch_completed()
        if batch_views is not None:
            batch = timer.timed_views(batch_views)(batch, device=device)
        view1, view2, target1, target2 = (
            _plain(batch[k], device) for k in ("image1", "image2", "image1_recon", "image2_recon")
        )
        n = view1.shape[0]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            out = model(torch.cat([view1, view2], dim=0))
            loss = w_con * contrastive(out["z"][:n], out["z"][n:])
            if out["recon"] is not None:
                recon = out["recon"]
                loss = loss + w_rec * (F.l1_loss(recon[:n], target1) + F.l1_loss(recon[n:], target2))
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        timer.step_completed(float(loss.detach()))
    del batches  # stops the DataLoader workers
    return summarise("baseline", timer, args.warmup, device, mark)


def measure(args: argparse.Namespace) -> Result:
    """Run one implementation in this process."""
    set_determinism(seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as out:
        parser = bundle_config(args, out)
        run = run_ours if args.impl == "ours" else run_baseline
        return run(parser, args)


# ---------------------------------------------------------------- driver


def child_command(args: argparse.Namespace, impl: str, result_json: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--impl", impl, "--result_json", result_json]
    for key in ("dataset_dir", "iterations", "warmup", "num_workers", "config", "device", "seed"):
        command += [f"--{key}", str(getattr(args, key))]
    if args.view_path:
        command += ["--view_path", args.view_path]
    return command


def _memory_text(r: Result) -> str:
    gib = 2.0**30
    return f"{r.peak_memory_bytes / gib:.2f} GiB (+{r.memory_growth_bytes / gib:.2f} in run)"


def print_table(results: list[Result]) -> None:
    header = (
        f"{'implementation':<14} {'it/s':>8} {'s/it':>8} {'data-wait share':>16} {'views share':>12} "
        f"{'peak memory':>26} {'loss':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        losses = f"{r.first_loss:.3f}->{r.last_loss:.3f}"
        print(
            f"{r.implementation:<14} {r.iterations_per_second:>8.3f} {r.seconds_per_iteration:>8.3f} "
            f"{r.data_wait_share:>15.1%} {r.view_share:>11.1%} {_memory_text(r):>26} {losses:>16}"
        )
    print(f"peak memory: {results[0].memory_kind} during the run (in brackets: its growth over the level before it)")
    print(
        "data-wait share: time waiting for the loader's next batch; views share: time making the views inside the "
        "step (view_path batched); the step waits for data for their sum"
    )


def main() -> None:
    args = parse_args()
    os.chdir(REPO)  # paths are absolute by now; the datalist builder recognises its default folder relative to here
    if args.impl != "both":  # one implementation, here (also how the driver runs each child)
        result = measure(args)
        if args.result_json:
            Path(args.result_json).write_text(json.dumps(asdict(result)))
        else:
            print_table([result])
        return

    from custom.errors import find_input_error

    parser = bundle_config(args, output_dir=tempfile.gettempdir())
    try:
        datalist = parser.get_parsed_content("datalist")  # synthesises the default data set when missing
    except Exception as err:  # MONAI wraps errors raised in `$` expressions; report a bad --dataset_dir plainly
        found = find_input_error(err)
        if found is None:
            raise
        sys.exit(f"benchmarks/pretrain.py: {found}")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    files = " + ".join(f.name for f in CONFIG_FILES[args.config])
    print(f"device {device} ({name}); torch {torch.__version__}; config {args.config} ({files})")
    print(
        f"view_path {parser.get_parsed_content('view_path')}, "
        f"patch {parser.get_parsed_content('patch_size')}, batch {parser.get_parsed_content('batch_size')}, "
        f"encoder {parser.get_parsed_content('encoder_features')}, amp {parser.get_parsed_content('amp')}, "
        f"{args.num_workers} workers; data {args.dataset_dir} ({len(datalist['training'])} training subjects)"
    )
    print(
        f"{args.warmup} warm-up + {args.iterations} timed iterations per implementation and round, each run in its "
        f"own process; {args.rounds} round(s)"
    )

    runs: dict[str, list[Result]] = {impl: [] for impl in IMPLEMENTATIONS}
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        for round_ in range(args.rounds):
            order = IMPLEMENTATIONS if round_ % 2 == 0 else IMPLEMENTATIONS[::-1]  # ABBA: load drift cancels
            for impl in order:
                result_json = str(Path(tmp) / f"{impl}_{round_}.json")
                print(f"--- round {round_ + 1}/{args.rounds}: {impl}", flush=True)
                done = subprocess.run(child_command(args, impl, result_json), cwd=REPO, check=False)
                if done.returncode != 0:
                    sys.exit(f"benchmarks/pretrain.py: the {impl} run failed (exit status {done.returncode})")
                runs[impl].append(Result(**json.loads(Path(result_json).read_text())))
    print()
    # Per implementation, the round with the median it/s (the lower middle one for an even number of rounds).
    results = [sorted(r, key=lambda x: x.iterations_per_second)[(len(r) - 1) // 2] for r in runs.values()]
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds per implementation")
    print_table(results)
    ours, baseline = results
    ratio = ours.iterations_per_second / baseline.iterations_per_second
    print(f"ours / baseline it/s: {ratio:.2f}x (above 1: the bundle's trainer is faster)")
    if args.rounds > 1:
        per_round = [o.iterations_per_second / b.iterations_per_second for o, b in zip(*runs.values(), strict=True)]
        print("per round: " + ", ".join(f"{r:.2f}x" for r in per_round))


if __name__ == "__main__":
    main()

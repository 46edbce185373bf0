"""View generation throughput: the per-sample worker path against the batched path, in the same run (issue #15).

Both paths make the bundle's contrastive views from one synthetic subject with the settings of
``bundles/seqinv_pretrain/configs`` (``paper``: train.yaml, 96^3 views of a 1 mm subject, batch 8, the paper's
augmentations; ``cpu_small``: train.yaml + cpu_small.yaml, 48^3 views of a 2 mm subject, batch 4, the light
augmentations), starting from what the loader caches (the maps loaded and cropped to the head) and ending with a
collated batch of views:

* ``per_sample``: ``ContrastiveViewsd`` on each subject, then MONAI's collation (a loader worker's work);
* ``per_sample (maps pre-clipped)``: the same with the map clipping done once beforehand (not a bundle path: it
  shows how much of the difference is the clipping, which the batched path caches);
* ``batched``: ``RandViewRegiond`` per subject and the collation (loader workers), then
  ``BatchedContrastiveViews`` on the batch (the training device; here the CPU);
* ``batched_workers``: the same with the batch call as the loader's collate function (regions not copied).

On the CPU everything runs on one thread, so the figures are views per second per core; the ratios compare the
paths in the same run (``--rounds`` alternate their order; the median round is shown). With a CUDA device the
batched path also runs with its batch call on the GPU (the loader part stays on one CPU core: its views per second
per core say how many workers feed the device), and ``--step`` runs ``benchmarks/pretrain.py`` on 1 mm subjects
for the share of the paper step spent waiting for the loader and making views.

    python benchmarks/views.py [--sizes paper cpu_small] [--rounds 3] [--batches 2] [--device cuda:0]
                               [--step [--step_paths batched per_sample] [--step_workers 4 8]]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import CropForegroundd

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "seqinv_pretrain" / "configs"
SIZES = {
    "paper": {"files": ["train.yaml"], "resolution": 1.0},
    "cpu_small": {"files": ["train.yaml", "cpu_small.yaml"], "resolution": 2.0},
}
SETTINGS = ("mode", "preset", "sequences", "patch_size", "shared_region", "augment", "clip_maps", "view_norm")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per path (median shown)")
    ap.add_argument("--batches", type=int, default=2, help="timed batches per path and round")
    ap.add_argument("--device", default=None, help="also run the batched call here (default cuda:0 if available)")
    ap.add_argument("--step", action="store_true", help="CUDA: data-wait share of the paper step (pretrain.py)")
    ap.add_argument("--step_subjects", type=int, default=4, help="1 mm subjects written for --step")
    ap.add_argument("--step_paths", nargs="+", default=["batched", "per_sample"], help="view paths for --step")
    ap.add_argument("--step_workers", nargs="+", type=int, default=[4], help="loader workers for --step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device is None and torch.cuda.is_available():
        args.device = "cuda:0"
    return args


def bundle_settings(size: str) -> dict[str, Any]:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in SIZES[size]["files"]])
    out = {k: parser.get_parsed_content(k) for k in SETTINGS}
    out["zscore"] = parser.get_parsed_content("zscore_views")
    out["batch_size"] = parser.get_parsed_content("batch_size")
    return out


def subject(resolution: float, seed: int) -> dict[str, torch.Tensor]:
    """One synthetic subject (MNI152-based, ``custom.data.synthetic``) as the loader caches it: maps and mask as
    MetaTensors with the grid's affine, cropped to the head (CropForegroundd, margin 2)."""
    from custom.data.synthetic.subject import make_subject
    from custom.data.synthetic.template import load_template

    template = load_template(resolution)
    sub = make_subject(template, np.random.default_rng(seed))
    names = {"PD": "pd", "R1": "r1", "R2s": "r2s", "MT": "mt", "R2": "r2"}
    affine = torch.as_tensor(template.affine, dtype=torch.float64)
    data = {
        names[k]: MetaTensor(torch.from_numpy(np.array(v, dtype=np.float32))[None], affine=affine)
        for k, v in sub.maps.items()
    }
    data["mask"] = MetaTensor(torch.from_numpy(np.array(sub.mask, dtype=np.float32))[None], affine=affine)
    data = CropForegroundd(list(data), source_key="pd", margin=2)(data)
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor) and v.ndim == 4}


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class Paths:
    """The view paths of one size, ready to time on a cached subject."""

    def __init__(self, size: str, seed: int, device: torch.device | None) -> None:
        from monai.data import list_data_collate

        from custom.transforms import ContrastiveViewStage
        from custom.transforms.batched import _clip_maps
        from custom.transforms.simulation import QMRIMaps

        self.settings = bundle_settings(size)
        self.batch = int(self.settings.pop("batch_size"))
        kw = {**self.settings, "mask_key": "mask"}
        t = time.perf_counter()
        self.subject = subject(SIZES[size]["resolution"], seed)
        shape = tuple(self.subject["pd"].shape[1:])
        print(f"{size}: subject {shape} at {SIZES[size]['resolution']:g} mm made in {time.perf_counter() - t:.1f} s")
        self.collate = list_data_collate
        self.per_sample = ContrastiveViewStage("per_sample", **kw).worker_transforms[0]
        self.per_sample.set_random_state(seed)
        self.preclipped = ContrastiveViewStage("per_sample", **{**kw, "clip_maps": None}).worker_transforms[0]
        self.preclipped.set_random_state(seed)
        maps = QMRIMaps.from_data(self.subject)
        clipped = _clip_maps(maps, self.subject["mask"], tuple(self.settings["clip_maps"]))
        self.subject_clipped = {**clipped.as_dict(), "mask": self.subject["mask"]}
        self.batched = ContrastiveViewStage("batched", **kw, seed=seed)
        self.workers = ContrastiveViewStage("batched_workers", **kw, seed=seed)
        prepare = self.batched.worker_transforms[0]
        self.cached = prepare(dict(self.subject))  # what CacheDataset keeps for the batched paths
        for stage in (self.batched, self.workers):
            stage.worker_transforms[1].set_random_state(seed)
        self.device = device

    def run_per_sample(self, clipped: bool = False) -> float:
        t, data = (self.preclipped, self.subject_clipped) if clipped else (self.per_sample, self.subject)
        return timed(lambda: self.collate([t(dict(data)) for _ in range(self.batch)]))

    def run_batched(self, device: torch.device | None = None) -> tuple[float, float]:
        """(loader seconds, batch-call seconds) of one batch."""
        region = self.batched.worker_transforms[1]
        holder: dict[str, Any] = {}

        def loader() -> None:
            holder["batch"] = self.batched.collate_fn([region(dict(self.cached)) for _ in range(self.batch)])

        seconds = timed(loader)
        dev = device or torch.device("cpu")
        if dev.type == "cuda":  # as the DataLoader's pin-memory thread leaves it (in the background, not timed)
            holder["batch"] = {
                k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in holder["batch"].items()
            }
        return seconds, timed(lambda: self.batched.views(holder["batch"], device=dev), dev)

    def run_workers(self) -> float:
        region = self.workers.worker_transforms[1]
        return timed(lambda: self.workers.collate_fn([region(dict(self.cached)) for _ in range(self.batch)]))


def measure(size: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device) if args.device else None
    paths = Paths(size, args.seed, device)
    views_per_batch = 2 * paths.batch
    jobs: dict[str, Callable[[], float]] = {
        "per_sample": paths.run_per_sample,
        "per_sample (maps pre-clipped)": lambda: paths.run_per_sample(clipped=True),
        "batched (CPU)": lambda: sum(paths.run_batched()),
        "batched_workers (CPU)": paths.run_workers,
    }
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    loader_share: list[float] = []
    for r in range(args.rounds):
        order = list(jobs) if r % 2 == 0 else list(jobs)[::-1]
        for name in order:
            for _ in range(args.batches):
                if name == "batched (CPU)":
                    loader, call = paths.run_batched()
                    times[name].append(loader + call)
                    loader_share.append(loader / (loader + call))
                else:
                    times[name].append(jobs[name]())
    rates = {k: views_per_batch / statistics.median(v) for k, v in times.items()}
    base = rates["per_sample"]
    print(
        f"\n{size}: patch {paths.settings['patch_size']}, batch {paths.batch}, mode {paths.settings['mode']}, "
        f"{args.rounds} rounds x {args.batches} batches, {torch.get_num_threads()} CPU thread(s)"
    )
    print("| path | views/s per CPU core | ratio to per_sample |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    print(f"batched (CPU): loader part (region cut + collation) {statistics.median(loader_share):.0%} of its time")
    if device is not None and device.type == "cuda":
        paths.run_batched(device)  # warm-up (kernels, cached FFT plans)
        loader_s, call_s = [], []
        for _ in range(args.rounds * args.batches):
            loader, call = paths.run_batched(device)
            loader_s.append(loader)
            call_s.append(call)
        gpu = views_per_batch / statistics.median(call_s)
        feed = views_per_batch / statistics.median(loader_s)
        name = torch.cuda.get_device_name(device)
        print(
            f"batched on {name}: {gpu:.1f} views/s in the batch call (host-to-device copy included); the loader "
            f"part makes {feed:.1f} views/s per CPU core, so {int(np.ceil(gpu / feed))} worker(s) keep up"
        )
        print(f"GPU batch call / per-sample worker (one core): {gpu / base:.1f}x")
        rates["batched (GPU call)"] = gpu
    for dev in [torch.device("cpu")] + ([device] if device is not None and device.type == "cuda" else []):
        print_stages(paths, dev, repeats=3 if dev.type == "cuda" else 1)
    return rates


def print_stages(paths: Paths, device: torch.device, repeats: int) -> None:
    """Where one batch call spends its time (each stage timed with the device synchronised)."""
    views = paths.batched.views
    views.stage_seconds = {}
    for _ in range(repeats):
        paths.run_batched(device)
    stages, views.stage_seconds = views.stage_seconds, None
    total = sum(stages.values())
    parts = ", ".join(f"{name} {1000 * t / repeats:.1f}" for name, t in stages.items())
    head = f"batch call on {device} by stage, ms per batch of {2 * paths.batch} views"
    print(f"{head} ({1000 * total / repeats:.1f} in all, synchronised per stage): {parts}")


def step_share(args: argparse.Namespace) -> None:
    """Run benchmarks/pretrain.py (the bundle's trainer, paper config) on 1 mm subjects with both view paths."""
    from concurrent.futures import ThreadPoolExecutor

    from custom.data.synthetic.files import PooledWriter
    from custom.data.synthetic.layouts import write_qmri
    from custom.data.synthetic.template import load_template

    with tempfile.TemporaryDirectory(prefix="views_step_") as tmp, ThreadPoolExecutor(4) as pool:
        t = time.perf_counter()
        writer, template = PooledWriter(pool), load_template(1.0)
        for index in range(args.step_subjects):  # the qMRI layout of the synthetic data set, at 1 mm
            write_qmri(Path(tmp), index, template, args.seed, writer)
        writer.wait()
        print(f"\n{args.step_subjects} subjects at 1 mm written in {time.perf_counter() - t:.0f} s")
        for path in args.step_paths:
            for workers in args.step_workers:
                command = [
                    sys.executable, str(REPO / "benchmarks" / "pretrain.py"), "--impl", "ours", "--config", "paper",
                    "--view_path", path, "--dataset_dir", str(Path(tmp) / "qmri"), "--num_workers", str(workers),
                    "--iterations", "10", "--warmup", "3", "--device", str(args.device),
                ]  # fmt: skip
                print(f"--- paper step, view_path {path}, {workers} workers: {' '.join(command[1:])}", flush=True)
                subprocess.run(command, cwd=REPO, check=False)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # per-core figures on the CPU
    print(f"torch {torch.__version__}; device for the batched call: {args.device or 'cpu only'}")
    for size in args.sizes:
        measure(size, args)
    if args.step and args.device and torch.device(args.device).type == "cuda":
        step_share(args)


if __name__ == "__main__":
    main()

"""Inference cost of ``bundles/ixi_tissue_seg``: seconds per 1 mm whole-brain volume and peak memory.

Input: the MNI152 T1 template from nilearn (``load_mni152_template(resolution=1)``, 197 x 233 x 189 voxels of
1 mm), scaled to 0..1000 and written to a temporary ``.nii.gz``. Network: a freshly built
:class:`~custom.networks.FrozenEncoderUNet` (random weights: they do not change the cost) from
:class:`~custom.segmentation.DownstreamSettings` of ``--config``:

* ``cpu_small`` (default on CPU): encoder 8-16-32-64-96, decoder 96-64-32-16-8-8, 48^3 windows, 2 mm voxels;
* ``paper`` (default on CUDA): encoder 64..768, decoder 768..32, 96^3 windows, 1 mm voxels;

or the trained network of ``--model path/to/model.pt`` (with its ``model.json``, via
:func:`~custom.segmentation.load_trained`; ``--config`` is then ignored).

Timed, each after one warm-up call, median of ``--repeats`` calls:

* ``end to end``: :meth:`custom.inference.NiftiPredictor.predict_file` as the bundle's ``inference.yaml`` builds
  it (task segmentation, 4 classes, ``build_inferer``: overlap 0.25, Gaussian blending, ``sw_batch_size`` 4; AMP
  on CUDA): validate + load, RAS + resample + normalise, sliding window, softmax, resample back to the input
  grid, argmax, write the label map;
* ``pre``: the validation + preprocessing part alone (``validate_nifti`` + the bundle's preprocessing);
* ``network (ours)``: the sliding-window network part alone, the same call ``predict_file`` makes, on the
  preprocessed tensor; ``post`` is what is left of the end-to-end time (softmax, resample back, argmax, write);
* ``network (baseline)``: MONAI's generic ``monai.inferers.sliding_window_inference`` with its default settings
  (overlap 0.25, constant blending, ``sw_batch_size`` 1) on the same tensor and network, under the same
  ``no_grad`` / autocast. The ratio ours / baseline of the network seconds is printed: the two differ in
  blending (Gaussian vs constant) and windows per forward pass (4 vs 1), not in the windows visited.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during each stage (peak counters reset before it; weights
and the input tensor included). On CPU, the process's max RSS (``resource.getrusage``, a high-water mark that
never goes down) before the first stage and after each stage: a stage's growth is how far it raised the
process's peak, 0 when it stayed below an earlier stage's peak. Stages run in order of expected footprint (pre,
baseline, ours network, end to end) so each growth is mostly that stage's own. Absolute times depend on the
machine's load (other jobs, thread count); compare the ratio and shares.

    python benchmarks/infer.py [--repeats 3] [--config cpu_small|paper] [--model path/to/model.pt]
                               [--device cpu|cuda:0] [--threads N] [--amp | --no-amp]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from simulate import median_seconds  # same timing rule as the simulation benchmark (run as a script from benchmarks/)

from custom.inference import NiftiPredictor, validate_nifti
from custom.segmentation import DownstreamSettings, build_inferer, build_network, build_preprocessing, load_trained

CONFIGS: dict[str, DownstreamSettings] = {
    "paper": DownstreamSettings(
        encoder_features=(64, 128, 256, 512, 768),
        decoder_features=(768, 512, 256, 128, 64, 32),
        pixdim=(1.0, 1.0, 1.0),
        patch_size=(96, 96, 96),
    ),
    "cpu_small": DownstreamSettings(
        encoder_features=(8, 16, 32, 64, 96),
        decoder_features=(96, 64, 32, 16, 8, 8),
        pixdim=(2.0, 2.0, 2.0),
        patch_size=(48, 48, 48),
    ),
}
OUR_OVERLAP, OUR_SW_BATCH = 0.25, 4  # build_inferer's defaults, as inference.yaml uses it
BASE_OVERLAP, BASE_SW_BATCH = 0.25, 1  # sliding_window_inference's default overlap; SlidingWindowInferer's batch
MIB = 1024.0 * 1024.0


@dataclass
class Stage:
    """One timed stage: median seconds and the memory figures taken around it (MiB)."""

    name: str
    seconds: float
    peak_mib: float  # CUDA: max allocated during the stage; CPU: process max RSS after the stage
    growth_mib: float | None = None  # CPU only: how far the stage raised the process's max RSS


# ---------------------------------------------------------------- input, network


def write_template(folder: Path) -> Path:
    """The 1 mm MNI152 T1 template, scaled to 0..1000 (float32), as ``folder/mni152_t1.nii.gz``."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    low, high = float(data.min()), float(data.max())
    data = (data - low) / max(high - low, 1e-8) * 1000.0
    img = nib.Nifti1Image(data, template.affine)
    img.header.set_zooms(template.header.get_zooms()[:3])
    path = folder / "mni152_t1.nii.gz"
    nib.save(img, str(path))
    return path


def build(config: str, model: str | None, device: torch.device) -> tuple[torch.nn.Module, DownstreamSettings, str]:
    """The network on ``device`` in eval mode, its settings and a description of where they came from."""
    if model is not None:
        network, settings = load_trained(model, device)
        return network, settings, f"trained model {model} (settings from its model.json)"
    torch.manual_seed(0)
    settings = CONFIGS[config]
    network = build_network(settings, pretrained_encoder=None).to(device).eval()
    return network, settings, f"--config {config}, fresh network (random weights)"


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows a MONAI sliding window visits over ``shape`` (same scan interval and padding as MONAI)."""
    padded = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    interval = [int(r) if s == r else max(int(r * (1 - overlap)), 1) for s, r in zip(padded, roi, strict=True)]
    return len(dense_patch_slices(padded, [int(r) for r in roi], interval))


# ---------------------------------------------------------------- timing and memory


def max_rss_mib() -> float:
    """The process's max resident set size so far (``getrusage``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


@contextlib.contextmanager
def autocast_for(device: torch.device, amp: bool) -> Iterator[None]:
    """``no_grad`` plus float16 autocast on CUDA when ``amp``, as ``NiftiPredictor`` runs its network."""
    with torch.no_grad():
        if amp and device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                yield
        else:
            yield


def measure(name: str, fn: Callable[[], object], repeats: int, device: torch.device) -> Stage:
    """Time ``fn`` (see :func:`median_seconds`) and take the memory figures around it."""
    if device.type == "cuda":
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(fn, repeats, sync)
        return Stage(name, seconds, torch.cuda.max_memory_allocated(device) / MIB)
    before = max_rss_mib()
    seconds = median_seconds(fn, repeats, lambda: None)
    after = max_rss_mib()
    return Stage(name, seconds, after, after - before)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per stage, after one warm-up call")
    parser.add_argument("--config", choices=tuple(CONFIGS), default=None, help="default: paper on CUDA, else cpu_small")
    parser.add_argument("--model", default=None, help="a trained model.pt (with model.json) instead of --config")
    parser.add_argument("--device", default=None, help="default: cuda:0 when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="float16 autocast (default: on CUDA)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = args.config or ("paper" if device.type == "cuda" else "cpu_small")
    amp = device.type == "cuda" if args.amp is None else bool(args.amp)

    with tempfile.TemporaryDirectory(prefix="infer_bench_") as tmp:
        folder = Path(tmp)
        path = write_template(folder)
        network, settings, origin = build(config, args.model, device)
        predictor = NiftiPredictor(
            network=network,
            inferer=build_inferer(settings, overlap=OUR_OVERLAP, sw_batch_size=OUR_SW_BATCH),
            preprocessing=build_preprocessing(settings),
            output_dir=folder / "out",
            task="segmentation",
            output_postfix="seg",
            num_classes=int(settings.out_channels),
            device=device,
            amp=amp,
        )
        roi = tuple(int(r) for r in settings.patch_size)
        x = predictor.preprocessing({"image": str(path)})["image"].as_tensor()[None].to(device)
        img = nib.load(str(path))

        def pre() -> object:
            validate_nifti(path)
            return predictor.preprocessing({"image": str(path)})

        def baseline() -> torch.Tensor:
            with autocast_for(device, amp):
                return sliding_window_inference(x, roi, BASE_SW_BATCH, network, overlap=BASE_OVERLAP)

        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        n_params = sum(p.numel() for p in network.parameters())
        print(f"device {device}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; amp {amp}")
        print(f"network: {origin}; {n_params / 1e6:.2f} M parameters")
        print(
            f"  encoder {list(settings.encoder_features)}, decoder {list(settings.decoder_features)}, "
            f"windows {list(roi)}, pixdim {list(settings.pixdim)} mm, {settings.out_channels} classes"
        )
        print(
            f"volume {tuple(img.shape)} at {tuple(float(z) for z in img.header.get_zooms()[:3])} mm "
            f"(MNI152 T1, nilearn) -> preprocessed {tuple(x.shape[2:])}"
        )
        print(
            f"ours: build_inferer, overlap {OUR_OVERLAP}, gaussian blending, sw_batch_size {OUR_SW_BATCH}, "
            f"{window_count(x.shape[2:], roi, OUR_OVERLAP)} windows; baseline: sliding_window_inference defaults, "
            f"overlap {BASE_OVERLAP}, constant blending, sw_batch_size {BASE_SW_BATCH}, "
            f"{window_count(x.shape[2:], roi, BASE_OVERLAP)} windows"
        )
        print(f"median of {args.repeats} call(s) after 1 warm-up per stage")

        rss_start = max_rss_mib() if device.type == "cpu" else None
        stages = [
            measure("pre (validate+preprocess)", pre, args.repeats, device),
            measure("network (baseline)", baseline, args.repeats, device),
            # the same call predict_file makes for its network part (no_grad, autocast, inferer)
            measure("network (ours)", lambda: predictor._infer(x), args.repeats, device),
            measure("end to end (predict_file)", lambda: predictor.predict_file(path), args.repeats, device),
        ]

    by_name = {s.name: s for s in stages}
    total = by_name["end to end (predict_file)"].seconds
    ours_net = by_name["network (ours)"].seconds
    base_net = by_name["network (baseline)"].seconds
    pre_s = by_name["pre (validate+preprocess)"].seconds
    post_s = total - pre_s - ours_net

    if device.type == "cuda":
        mem_head = f"{'peak CUDA alloc MiB':>20}"
    else:
        mem_head = f"{'max RSS after MiB':>18} {'growth MiB':>11}"
    print()
    print(f"{'stage':<27} {'seconds':>9} {'share of e2e':>13} {mem_head}")
    no_mem = f"{'-':>20}" if device.type == "cuda" else f"{'-':>18} {'-':>11}"
    for s in [*stages[:3], Stage("post (remainder)", post_s, float("nan")), stages[3]]:
        share = f"{'-':>12}" if s.name == "network (baseline)" else f"{s.seconds / total:>12.0%}"
        if s.name == "post (remainder)":
            mem = no_mem
        elif device.type == "cuda":
            mem = f"{s.peak_mib:>20.0f}"
        else:
            mem = f"{s.peak_mib:>18.0f} {s.growth_mib or 0.0:>11.0f}"
        print(f"{s.name:<27} {s.seconds:>9.2f} {share:>13} {mem}")
    if rss_start is not None:
        print(
            f"CPU memory: process max RSS (getrusage) {rss_start:.0f} MiB before the first stage (interpreter, "
            "libraries, network, input); 'growth' = how far each stage raised that high-water mark"
        )
    else:
        print("CUDA memory: torch.cuda.max_memory_allocated per stage (weights and input tensor included)")
    print()
    print(f"seconds per 1 mm whole-brain volume (end to end): {total:.2f}")
    print(f"network share of end to end: {ours_net / total:.0%}; pre/post-processing: {(total - ours_net) / total:.0%}")
    print(
        f"network part ours / baseline: {ours_net:.2f} s / {base_net:.2f} s = {ours_net / base_net:.2f}x the time "
        f"(ours: gaussian blending, sw_batch_size {OUR_SW_BATCH}; baseline: constant blending, "
        f"sw_batch_size {BASE_SW_BATCH})"
    )


if __name__ == "__main__":
    main()

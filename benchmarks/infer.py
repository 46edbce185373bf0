"""Inference cost of ``bundles/ixi_tissue_seg``: seconds per 1 mm whole-brain volume, memory, and the fast CPU paths.

(About 800 lines in one script on purpose: the lead runs one command that builds the input and the network once and
times every path against the same references in the same process.)

Input: the MNI152 T1 template from nilearn (``load_mni152_template(resolution=1)``, 197 x 233 x 189 voxels of
1 mm, skull-stripped, shipped with nilearn: no download), scaled to 0..1000 and written to a temporary ``.nii.gz``.
Network: a freshly built :class:`~custom.networks.FrozenEncoderUNet` (seed 0) from
:class:`~custom.segmentation.DownstreamSettings` of ``--config``:

* ``cpu_small`` (default on CPU): encoder 8-16-32-64-96, decoder 96-64-32-16-8-8, 48^3 windows, 2 mm voxels;
* ``paper`` (default on CUDA): encoder 64..768, decoder 768..32, 96^3 windows, 1 mm voxels (105 M parameters;
  27 windows of 96^3 over the template at overlap 0.25);

or the trained network of ``--model path/to/model.pt`` (with its ``model.json``, via
:func:`~custom.segmentation.load_trained`; ``--config`` is then ignored).

Three modes:

1. Stage table (default). Timed, each after one warm-up call, median of ``--repeats`` calls:

   * ``end to end``: :meth:`custom.inference.NiftiPredictor.predict_file` as the bundle's ``inference.yaml`` builds
     it (task segmentation, 4 classes, ``build_inferer``: overlap 0.25, Gaussian blending, ``sw_batch_size`` 4;
     AMP on CUDA): validate + load, RAS + resample + normalise, sliding window, softmax, resample back to the input
     grid, argmax, write the label map;
   * ``pre``: the validation + preprocessing part alone (``validate_nifti`` + the bundle's preprocessing);
   * ``network (ours)``: the sliding-window network part alone, the same call ``predict_file`` makes, on the
     preprocessed tensor; ``post`` is what is left of the end-to-end time (softmax, resample back, argmax, write);
   * ``network (baseline)``: MONAI's generic ``monai.inferers.sliding_window_inference`` with its default settings
     (overlap 0.25, constant blending, ``sw_batch_size`` 1) on the same tensor and network, under the same
     ``no_grad`` / autocast. The ratio ours / baseline of the network seconds is printed.

   Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during each stage; on CPU, the process's max RSS
   (``getrusage``) before the first stage and after each stage (a stage's growth: how far it raised the peak).

2. ``--variants [NAME ...]``: seconds per scan (``predict_file`` end to end) for each way of running the network
   part (:data:`VARIANTS`: ``current``, the configs' default path and the reference of the label agreement;
   ``monai_default``, ``sliding_window_inference`` with its defaults and the reference of the speed-up; and the
   fast options of :mod:`custom.fast_inference`, ``cpu_fast`` being what ``cpu_fast: true`` in an inference config
   builds), the speed-up of each over ``current`` and over ``monai_default`` from the same run, and the share of
   voxels of its written label map equal to ``current``'s (all voxels; voxels either calls non-background). With a
   fresh network the output layer is fitted first (``--head fit``, the default; ``--head random`` keeps it): a
   random network labels the background outside the head with random classes, which the foreground crop (background
   outside the head by construction) cannot reproduce, so agreement on random labels says nothing about a trained
   network. The fit is a logistic regression of the output layer on the network's last features over two windows
   of the default grid, to intensity classes of the template (background outside the brain; three tissue classes by
   a 1-D k-means inside): labels like a segmentation's, from a network that is otherwise random, *not* a trained
   network. ``--monai_windows K`` times MONAI's default on K of its windows only (one forward each, as
   ``sw_batch_size`` 1 runs them) and extrapolates to all its windows, plus ``current``'s measured pre/post; that
   row says EXTRAPOLATED and has no agreement. Peak memory: the process's RSS sampled during each call, above its
   level before the call.

3. ``--windows [SETUP ...]``: seconds for one window (the centre of the volume) per precision / layout
   (:data:`WINDOW_SETUPS`), the argmax agreement with the first setup, and that times the window count.

Absolute times depend on the machine's load (other jobs, thread count; the load average is printed); compare the
ratios of one run.

    python benchmarks/infer.py [--repeats 3] [--config cpu_small|paper] [--model path/to/model.pt]
                               [--device cpu|cuda:0] [--threads N] [--amp | --no-amp]
                               [--variants [NAME ...] | all] [--monai_windows K] [--head fit|random] [--warmup N]
                               [--windows [SETUP ...]]

Paper-size CPU comparison in one command (from ``benchmarks/``)::

    python infer.py --config paper --variants current monai_default cpu_fast bf16_cl_crop bf16_cl_crop_ov0 \\
        bf16_cl_crop_whole --threads 2

(``--variants`` with no names runs the same list; on a CPU with native bfloat16 ``cpu_fast`` is ``bf16_cl``.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from simulate import median_seconds  # same timing rule as the simulation benchmark (run as a script from benchmarks/)

from custom.fast_inference import bf16_supported, inference_copy, window_count
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


# ---------------------------------------------------------------- variants (--variants)


@dataclass(frozen=True)
class Variant:
    """One way to run the network part of ``predict_file``: a description and the keywords of ``build_inferer``
    (``None``: MONAI's ``sliding_window_inference`` with its defaults); ``autocast``: bfloat16 ``torch.autocast``."""

    description: str
    inferer: dict[str, object] | None
    autocast: bool = False


FAST = {"precision": "bf16", "channels_last": True}
CROP = {**FAST, "crop_foreground": True}
VARIANTS: dict[str, Variant] = {
    "current": Variant(
        "build_inferer defaults, as every config without cpu_fast: fp32, overlap 0.25, gaussian, "
        "sw_batch_size 4 (the reference of the agreement)",
        {},
    ),
    "monai_default": Variant(
        "monai.inferers.sliding_window_inference defaults: fp32, overlap 0.25, constant "
        "blending, sw_batch_size 1 (the reference of the speed-up)",
        None,
    ),
    "fp32_cl": Variant("fp32, channels-last copy (instance norm as group norm)", {"channels_last": True}),
    "bf16_autocast": Variant("current under torch.autocast('cpu', bfloat16)", {}, autocast=True),
    "bf16": Variant("bfloat16 copy of the network", {"precision": "bf16"}),
    "bf16_cl": Variant("bfloat16 channels-last copy, the same windows as current", dict(FAST)),
    "cpu_fast": Variant(
        "what the inference configs' cpu_fast: true builds (custom.fast_inference.CPU_FAST)", {"cpu_fast": True}
    ),
    "fp32_crop": Variant("fp32, foreground crop (margin 4): the crop's own effect", {"crop_foreground": True}),
    "bf16_cl_crop": Variant("bf16_cl + foreground crop (margin 4)", dict(CROP)),
    "bf16_cl_crop_m16": Variant("bf16_cl + foreground crop, margin 16", {**CROP, "crop_margin": 16}),
    "bf16_cl_crop_ov0": Variant("bf16_cl + crop + overlap 0 (fewest windows)", {**CROP, "overlap": 0.0}),
    "bf16_cl_crop_m16_ov0": Variant(
        "bf16_cl + crop margin 16 + overlap 0", {**CROP, "crop_margin": 16, "overlap": 0.0}
    ),
    "bf16_cl_crop_whole": Variant("bf16_cl + crop + one whole-volume pass", {**CROP, "whole_volume": True}),
    "fp32_crop_whole": Variant("fp32 + crop + one whole-volume pass", {"crop_foreground": True, "whole_volume": True}),
}
#: ``--variants`` with no names: the two references and the fast candidates.
DEFAULT_VARIANTS: tuple[str, ...] = (
    "current",
    "monai_default",
    "cpu_fast",
    "bf16_cl_crop",
    "bf16_cl_crop_ov0",
    "bf16_cl_crop_whole",
)


class TimedInferer:
    """Calls ``inferer(x, network)`` (under bfloat16 autocast when asked) and records the seconds of each call."""

    def __init__(self, inferer: Callable[..., torch.Tensor], autocast: bool = False) -> None:
        self.inferer, self.autocast, self.seconds = inferer, autocast, []  # type: list[float]

    def __call__(self, x: torch.Tensor, network: Callable[..., torch.Tensor]) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            out = self.inferer(x, network)
        self.seconds.append(time.perf_counter() - start)
        return out.float() if isinstance(out, torch.Tensor) else out


def current_rss_mib() -> float:
    """The process's resident set size now (Linux ``/proc/self/statm``; elsewhere the max RSS so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / MIB
    except OSError:
        return max_rss_mib()


@contextlib.contextmanager
def peak_rss(result: list[float], interval: float = 0.05) -> Iterator[None]:
    """Samples the RSS every ``interval`` seconds in a thread; appends ``peak - before`` (MiB) to ``result``."""
    before, peak, done = current_rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mib())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result.append(max(peak[0], current_rss_mib()) - before)


def label_agreement(labels: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Share of voxels with the same label: over every voxel, and over the voxels either map calls foreground."""
    same = labels == reference
    foreground = (labels != 0) | (reference != 0)
    fg = float(same[foreground].mean()) if foreground.any() else 1.0
    return float(same.mean()), fg


def grid_windows(x: torch.Tensor, roi: tuple[int, ...], overlap: float) -> list[torch.Tensor]:
    """The windows MONAI's sliding window cuts from ``x`` ``(1, C, *S)``: same padding (constant 0, split as MONAI
    splits it) and scan order (``dense_patch_slices``)."""
    spatial = [int(s) for s in x.shape[2:]]
    pad: list[int] = []
    for s, r in zip(reversed(spatial), reversed(roi), strict=True):
        extra = max(r - s, 0)
        pad += [extra // 2, extra - extra // 2]
    padded = torch.nn.functional.pad(x, pad) if any(pad) else x
    shape = [int(s) for s in padded.shape[2:]]
    interval = [r if s == r else max(int(r * (1 - overlap)), 1) for s, r in zip(shape, roi, strict=True)]
    return [padded[(slice(None), slice(None), *w)] for w in dense_patch_slices(shape, list(roi), interval)]


def monai_extrapolated(
    network: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], timed: int, device: torch.device, amp: bool
) -> tuple[float, int]:
    """MONAI's default network part estimated from ``timed`` of its windows: (seconds, windows in all).

    Each of the first ``timed`` windows of its scan runs alone, as ``sliding_window_inference`` with
    ``sw_batch_size`` 1 runs it (fp32, ``no_grad``; AMP on CUDA when ``amp``); the median seconds per window times
    the number of windows is the estimate (its blending, a few voxel-wise additions, is left out).
    """
    windows = grid_windows(x, roi, BASE_OVERLAP)
    seconds = []
    with autocast_for(device, amp):
        for window in windows[: max(timed, 1)]:
            start = time.perf_counter()
            network(window.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * len(windows), len(windows)


def pseudo_labels(x: torch.Tensor) -> torch.Tensor:
    """Intensity classes of the preprocessed template ``(1, 1, *S)``: 0 outside the brain (the template's zero
    background), and inside it 3 / 1 / 2 (CSF, GM, WM: the bundle's class order) for the dark / middle / bright
    cluster of a 1-D k-means of the brain's intensities. A stand-in for tissue labels, not a segmentation."""
    image = x[0, 0].float()
    brain = image > image.min() + 0.02
    values = image[brain]
    centres = torch.quantile(values[:: max(values.numel() // 200_000, 1)], torch.tensor([0.1, 0.5, 0.9]))
    for _ in range(20):
        nearest = (values[:, None] - centres[None]).abs().argmin(1)
        centres = torch.stack([values[nearest == k].mean() if (nearest == k).any() else centres[k] for k in range(3)])
    order = centres.argsort()  # dark, middle, bright
    cluster = (image[..., None] - centres).abs().argmin(-1)
    labels = torch.zeros_like(image, dtype=torch.long)
    for tissue, k in zip((3, 1, 2), order.tolist(), strict=True):
        labels[brain & (cluster == k)] = tissue
    return labels


def fit_head(network: torch.nn.Module, x: torch.Tensor, roi: tuple[int, ...], device: torch.device) -> str:
    """Fit the network's 1x1x1 output layer (``network.head``, 4 classes) to :func:`pseudo_labels` of ``x``.

    The features are the head's inputs on two windows of the default grid (its first, at a corner, and its middle
    one), computed in float32; a multinomial logistic regression (L-BFGS, L2 1e-3) on up to 50,000 voxels per class
    gives the head's weights. The rest of the network keeps its random weights. Returns a description.
    """
    head = network.head  # type: ignore[union-attr]
    if head.out_channels != 4:
        raise SystemExit("--head fit needs a 4-class network (tissue segmentation)")
    labels = pseudo_labels(x)
    windows = grid_windows(torch.cat([x, labels[None, None].to(x.dtype)], 1), roi, OUR_OVERLAP)
    picked = [windows[0], windows[len(windows) // 2]]
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, i, o: features.append(i[0].detach()))
    try:
        with torch.no_grad():
            for window in picked:
                network(window[:, :1].to(device))
    finally:
        hook.remove()
    f = torch.cat([t.flatten(2)[0].T.float().cpu() for t in features])  # (voxels, channels)
    y = torch.cat([w[0, 1].flatten().long() for w in picked])
    gen = torch.Generator().manual_seed(0)
    keep = torch.cat(
        [(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:50_000]] for c in range(4)]
    )
    f, y = f[keep], y[keep]
    weight = torch.zeros(4, f.shape[1], requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(f @ weight.T + bias, y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = float(((f @ weight.T + bias).argmax(1) == y).float().mean())
        head.weight.copy_(weight.reshape(head.weight.shape).to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    counts = torch.bincount(y, minlength=4).tolist()
    return (
        f"output layer FITTED (logistic regression on {len(y)} voxels of 2 default-grid windows, per class "
        f"{counts}, training accuracy {accuracy:.3f}) to intensity pseudo-labels of the template (outside the brain: "
        "background; inside: GM / WM / CSF by 1-D k-means); the rest random: a stand-in for trained labels"
    )


def run_variants(args: argparse.Namespace, device: torch.device, config: str, amp: bool) -> None:
    """End-to-end seconds (``predict_file``) and label agreement with ``current`` for each variant."""
    names = list(args.variants) or list(DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "current" not in names:
        names.insert(0, "current")  # the reference of the agreement (and of pre/post for an extrapolated MONAI row)
    names = ["current", *dict.fromkeys(n for n in names if n != "current")]
    with tempfile.TemporaryDirectory(prefix="infer_bench_") as tmp:
        folder = Path(tmp)
        path = write_template(folder)
        network, settings, origin = build(config, args.model, device)
        roi = tuple(int(r) for r in settings.patch_size)
        preprocessing = build_preprocessing(settings)
        x = preprocessing({"image": str(path)})["image"].as_tensor()[None]
        if args.head == "fit":
            start = time.perf_counter()
            origin += f"; {fit_head(network, x, roi, device)} ({time.perf_counter() - start:.0f} s)"
        n_params = sum(p.numel() for p in network.parameters())
        print(
            f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; amp {amp}; "
            f"native bfloat16 (oneDNN) {bf16_supported()}"
        )
        print(f"load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"network: {origin}; {n_params / 1e6:.2f} M parameters")
        print(
            f"  encoder {list(settings.encoder_features)}, decoder {list(settings.decoder_features)}, "
            f"windows {list(roi)}, pixdim {list(settings.pixdim)} mm, {settings.out_channels} classes"
        )
        print(f"volume {tuple(nib.load(str(path)).shape)} (MNI152 T1, nilearn) -> preprocessed {tuple(x.shape[2:])}")
        print(
            f"each variant: {args.warmup} untimed call(s), then median of {args.repeats} timed predict_file call(s)"
            + (" (the first call includes making the bfloat16 / channels-last copy)" if args.warmup == 0 else "")
        )
        rows: list[dict[str, object]] = []
        reference: np.ndarray | None = None
        for name in names:
            variant = VARIANTS[name]
            if variant.inferer is None and args.monai_windows:
                row = extrapolated_row(name, rows, network, x, roi, args.monai_windows, device, amp)
                rows.append(row)
                print_row(row, [])
                continue
            if variant.inferer is None:
                inferer: Callable[..., torch.Tensor] = lambda x, net: sliding_window_inference(  # noqa: E731
                    x, roi, BASE_SW_BATCH, net, overlap=BASE_OVERLAP
                )
            else:
                inferer = build_inferer(settings, **variant.inferer)  # type: ignore[arg-type]
            timed = TimedInferer(inferer, autocast=variant.autocast)
            predictor = NiftiPredictor(
                network=network,
                inferer=timed,
                preprocessing=preprocessing,
                output_dir=folder / name,
                task="segmentation",
                output_postfix="seg",
                num_classes=int(settings.out_channels),
                device=device,
                amp=amp,
            )
            for _ in range(args.warmup):
                predictor.predict_file(path)
            timed.seconds.clear()
            seconds, memory = [], []  # type: list[float], list[float]
            for _ in range(args.repeats):
                with peak_rss(memory):
                    start = time.perf_counter()
                    result = predictor.predict_file(path)
                    seconds.append(time.perf_counter() - start)
            labels = np.asarray(nib.load(str(result["output"])).dataobj)
            if name == "current":
                reference = labels
                shares = np.bincount(labels.astype(np.int64).ravel(), minlength=int(settings.out_channels))
                shares = shares / max(labels.size, 1)
                print(
                    f"reference labels (current): share of voxels per class {', '.join(f'{v:.3f}' for v in shares)}"
                    + (
                        "; random weights: labels of an untrained network"
                        if args.model is None and args.head == "random"
                        else ""
                    )
                )
            agree = label_agreement(labels, reference) if reference is not None else (float("nan"),) * 2
            last = getattr(inferer, "last_run", {})
            row = dict(
                name=name,
                windows=last.get("windows", window_count(x.shape[2:], roi, BASE_OVERLAP)),
                region=last.get("region", tuple(x.shape[2:])),
                dtype=str(last.get("dtype", torch.float32)).replace("torch.", ""),
                seconds=statistics.median(seconds),
                network=statistics.median(timed.seconds),
                agree=agree[0],
                agree_fg=agree[1],
                rss=max(memory),
                how="measured",
            )
            rows.append(row)
            print_row(row, seconds)
            del predictor, timed, inferer
    print_variant_table(rows)


def extrapolated_row(
    name: str,
    rows: list[dict[str, object]],
    network: torch.nn.Module,
    x: torch.Tensor,
    roi: tuple[int, ...],
    timed: int,
    device: torch.device,
    amp: bool,
) -> dict[str, object]:
    """The ``monai_default`` row from ``timed`` windows (``--monai_windows``): its network seconds extrapolated to
    every window, plus current's measured pre/post (the same predict_file around it); no labels, no agreement."""
    current = rows[0]
    network_s, windows = monai_extrapolated(network, x, roi, timed, device, amp)
    pre_post = float(current["seconds"]) - float(current["network"])  # type: ignore[arg-type]
    return dict(
        name=name,
        windows=windows,
        region=tuple(x.shape[2:]),
        dtype="float32",
        seconds=network_s + pre_post,
        network=network_s,
        agree=float("nan"),
        agree_fg=float("nan"),
        rss=float("nan"),
        how=f"EXTRAPOLATED from {min(max(timed, 1), windows)} of {windows} windows",
    )


def print_row(row: dict[str, object], seconds: list[float]) -> None:
    calls = f" ({', '.join(f'{t:.1f}' for t in seconds)})" if len(seconds) > 1 else ""
    print(
        f"  {row['name']}: {float(row['seconds']):.1f} s end to end{calls}, network "  # type: ignore[arg-type]
        f"{float(row['network']):.1f} s, {row['windows']} window(s) over {row['region']}, {row['dtype']}, "  # type: ignore[arg-type]
        f"agreement {float(row['agree']):.4f} (foreground {float(row['agree_fg']):.4f}); {row['how']}",  # type: ignore[arg-type]
        flush=True,
    )


def print_variant_table(rows: list[dict[str, object]]) -> None:
    """The variants table: seconds, speed-ups against ``current`` and ``monai_default``, agreement, memory."""
    by_name = {str(r["name"]): r for r in rows}
    current = by_name.get("current", {}).get("seconds")
    monai = by_name.get("monai_default", {}).get("seconds")

    def ratio(base: object, seconds: float) -> str:
        return f"{float(base) / seconds:>8.2f}x" if base else f"{'-':>9}"  # type: ignore[arg-type]

    print()
    print(
        f"{'variant':<22} {'windows':>7} {'e2e s':>8} {'net s':>8} {'vs curr':>9} {'vs MONAI':>9} "
        f"{'agree':>7} {'agree fg':>8} {'peak RSS +MiB':>13}  how"
    )
    for r in rows:
        seconds = float(r["seconds"])  # type: ignore[arg-type]
        agree = f"{float(r['agree']):>7.4f} {float(r['agree_fg']):>8.4f}"  # type: ignore[arg-type]
        print(
            f"{str(r['name']):<22} {int(r['windows']):>7} {seconds:>8.1f} {float(r['network']):>8.1f} "  # type: ignore[arg-type]
            f"{ratio(current, seconds)} {ratio(monai, seconds)} {agree} {float(r['rss']):>13.0f}  {r['how']}"  # type: ignore[arg-type]
        )
    print()
    for r in rows:
        print(f"  {str(r['name']):<22} {VARIANTS[str(r['name'])].description}")
    print(
        "e2e: seconds per scan, predict_file (validate, preprocess, network, softmax, resample back, argmax, write); "
        "net: the inferer call alone; vs curr / vs MONAI: speed-up (their e2e seconds / this e2e, same run); agree: "
        "share of voxels of the written label map equal to current's, over all voxels and over the voxels either "
        "calls non-background (nan: no labels); peak RSS: highest resident memory during a call above the "
        "process's before it"
    )


# ---------------------------------------------------------------- one window (--windows)


WINDOW_SETUPS: dict[str, tuple[torch.dtype, bool, bool]] = {  # dtype, channels-last copy, bfloat16 autocast
    "fp32": (torch.float32, False, False),
    "fp32_cl": (torch.float32, True, False),
    "bf16_autocast": (torch.float32, False, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16_cl": (torch.bfloat16, True, False),
}


def run_windows(args: argparse.Namespace, device: torch.device, config: str, amp: bool) -> None:
    """Seconds per roi-sized window (the centre of the preprocessed volume) for each precision / layout setup,
    and what that gives for the full window grid of the volume (seconds per window x windows, network only)."""
    del amp
    names = list(args.windows) or list(WINDOW_SETUPS)
    unknown = [n for n in names if n not in WINDOW_SETUPS]
    if unknown:
        raise SystemExit(f"unknown window setup(s) {unknown}; choose from {list(WINDOW_SETUPS)}")
    with tempfile.TemporaryDirectory(prefix="infer_bench_") as tmp:
        path = write_template(Path(tmp))
        network, settings, origin = build(config, args.model, device)
        x_full = build_preprocessing(settings)({"image": str(path)})["image"].as_tensor()[None]
    roi = tuple(int(r) for r in settings.patch_size)
    n_grid = window_count(x_full.shape[2:], roi, OUR_OVERLAP)
    start = [max((s - r) // 2, 0) for s, r in zip(x_full.shape[2:], roi, strict=True)]
    x = x_full[(slice(None), slice(None), *(slice(b, b + r) for b, r in zip(start, roi, strict=True)))].to(device)
    print(
        f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; native bfloat16 "
        f"(oneDNN) {bf16_supported()}"
    )
    print(f"load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"network: {origin}; one window {tuple(x.shape)} from the centre of the MNI152 volume; "
        f"{args.warmup} untimed call(s), median of {args.repeats} timed call(s) per setup"
    )
    reference: torch.Tensor | None = None
    print(f"{'setup':<14} {'s/window':>9} {'vs first':>9} {'argmax agree':>13} {f'x {n_grid} windows':>14}")
    base = None
    for name in names:
        dtype, channels_last, autocast = WINDOW_SETUPS[name]
        net = inference_copy(network, dtype, channels_last) if (dtype != torch.float32 or channels_last) else network
        inp = x.to(dtype)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last_3d)

        def call(net: torch.nn.Module = net, inp: torch.Tensor = inp, autocast: bool = autocast) -> torch.Tensor:
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with torch.inference_mode(), context:
                return net(inp).float()

        out = None
        for _ in range(args.warmup):
            out = call()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        labels = out.argmax(1)  # type: ignore[union-attr]
        if reference is None:
            reference, base = labels, seconds
            shares = torch.bincount(labels.flatten(), minlength=int(settings.out_channels)) / labels.numel()
            print(f"  ({name} labels: share per class {', '.join(f'{float(v):.3f}' for v in shares)})")
        agree = float((labels == reference).float().mean())
        print(
            f"{name:<14} {seconds:>9.2f} {base / seconds:>8.2f}x {agree:>13.4f} {seconds * n_grid:>13.0f}s", flush=True
        )
        del net, out


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per stage / variant (default 3; --variants paper: 1)"
    )
    parser.add_argument("--config", choices=tuple(CONFIGS), default=None, help="default: paper on CUDA, else cpu_small")
    parser.add_argument("--model", default=None, help="a trained model.pt (with model.json) instead of --config")
    parser.add_argument("--device", default=None, help="default: cuda:0 when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="float16 autocast (default: on CUDA)"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        metavar="NAME",
        help=f"variants table instead of the stage table; no names: {' '.join(DEFAULT_VARIANTS)}; all: "
        f"{' '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--windows",
        nargs="*",
        default=None,
        metavar="SETUP",
        help=f"seconds per window instead; no names: all of {' '.join(WINDOW_SETUPS)}",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default: 1, paper: 0)")
    parser.add_argument(
        "--monai_windows",
        type=int,
        default=0,
        metavar="K",
        help="time MONAI's default on its first K windows only and extrapolate to all (printed as EXTRAPOLATED); "
        "0 (default): run it in full",
    )
    parser.add_argument(
        "--head",
        choices=("fit", "random"),
        default=None,
        help="--variants without --model: fit the random network's output layer to intensity pseudo-labels of the "
        "template (default), so labels are background outside the brain and tissue-like inside; or keep it random",
    )
    args = parser.parse_args()
    if args.head is None:
        args.head = "fit" if args.variants is not None and args.model is None else "random"
    if args.head == "fit" and args.model is not None:
        parser.error("--head fit is for fresh networks (--config); a --model keeps its trained output layer")
    if args.variants is not None and args.variants == ["all"]:
        args.variants = list(VARIANTS)
    slow = args.config == "paper" or (args.config is None and torch.cuda.is_available()) or args.model is not None
    if args.warmup is None:
        args.warmup = 0 if slow else 1
    if args.repeats is None:
        args.repeats = 1 if slow and args.variants is not None else 3
    if args.repeats < 1 or args.warmup < 0 or args.monai_windows < 0:
        parser.error("--repeats must be at least 1, --warmup and --monai_windows at least 0")
    return args


def run_stages(args: argparse.Namespace, device: torch.device, config: str, amp: bool) -> None:
    """The stage table: pre, network (ours and MONAI's default), post, end to end, memory."""
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


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = args.config or ("paper" if device.type == "cuda" else "cpu_small")
    amp = device.type == "cuda" if args.amp is None else bool(args.amp)
    if args.variants is not None:
        run_variants(args, device, config, amp)
    elif args.windows is not None:
        run_windows(args, device, config, amp)
    else:
        run_stages(args, device, config, amp)


if __name__ == "__main__":
    main()

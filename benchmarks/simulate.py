"""Simulation throughput: ``custom.physics`` (torch) against a plain NumPy version of the same equations.

Builds a 1 mm whole-brain qMRI volume (MNI152 2009a template from nilearn, GM/WM/CSF partial-volume mixing with
the docs/paper-notes.md tissue values, 197 x 233 x 189 voxels), then for each sequence (FSE, GRE, FLAIR, MPRAGE, plus
Rician noise) times both implementations in the same run on the same data and prints voxels per second and
the torch / NumPy speed ratio. On a machine with CUDA the GPU figure is printed too.

    python benchmarks/simulate.py [--repeats 5] [--resolution 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from custom import physics

# Tissue values (fractions, 1/s) from the docs/paper-notes.md table, mid-range.
TISSUES = {
    "gm": {"pd": 0.80, "r1": 0.64, "r2s": 17.0, "r2": 12.0, "mt": 0.008},
    "wm": {"pd": 0.70, "r1": 1.02, "r2s": 21.0, "r2": 13.0, "mt": 0.016},
    "csf": {"pd": 0.98, "r1": 0.27, "r2s": 5.0, "r2": 0.6, "mt": 0.001},
}
PROTOCOLS = {
    "fse": {"tr": 4.0, "te": 0.09},
    "gre": {"tr": 0.02, "te": 0.005, "flip": np.radians(20.0)},
    "flair": {"tr": 9.0, "te": 0.11, "ti": 2.4},
    "mprage": {"tr": 2.3, "tx": 0.006, "td": 0.65, "flip": np.radians(8.0), "n": 150},
}


def brain_maps(resolution: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """qMRI maps of the MNI152 template by partial-volume mixing of the tissue values."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata()
    mask = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata()
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    probs = {"gm": gm, "wm": wm, "csf": csf}
    return {k: sum(probs[t] * TISSUES[t][k] for t in probs).astype(dtype) for k in ("pd", "r1", "r2s", "r2", "mt")}


# ---------------------------------------------------------------- NumPy baseline (same equations, eqs. 1-5)


def np_fse(m, tr, te):
    return m["pd"] * -np.expm1(-m["r1"] * tr) * np.exp(-m["r2"] * te)


def np_gre(m, tr, te, flip):
    e1 = np.exp(-m["r1"] * tr)
    one_minus_mt = 1.0 - m["mt"]
    den = 1.0 - np.cos(flip) * one_minus_mt * e1
    return m["pd"] * np.sin(flip) * one_minus_mt * -np.expm1(-m["r1"] * tr) / den * np.exp(-m["r2s"] * te)


def np_flair(m, tr, te, ti):
    return m["pd"] * np.exp(-m["r2"] * te) * (1.0 - 2.0 * np.exp(-m["r1"] * ti) + np.exp(-m["r1"] * tr))


def np_mprage(m, tr, tx, td, flip, n):
    r1 = m["r1"]
    e1 = np.exp(-r1 * tr)
    steady = -np.expm1(-r1 * tr) / (1.0 - np.cos(flip) * e1)
    train = 1.0 - (np.cos(flip) * np.exp(-tx * r1)) ** n
    ed = np.exp(-td * r1)
    return m["pd"] * np.abs(np.sin(flip) * steady * train * ed - np.expm1(-td * r1))


def np_rician(signal, sigma, rng):
    real = rng.standard_normal(signal.shape, dtype=signal.dtype)
    imag = rng.standard_normal(signal.shape, dtype=signal.dtype)
    return np.hypot(signal + sigma * real, sigma * imag)


# ---------------------------------------------------------------- torch path


def torch_calls(t: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, Callable[[], torch.Tensor]]:
    p = PROTOCOLS
    return {
        "fse": lambda: physics.fse(t["pd"], t["r1"], t["r2"], **p["fse"]),
        "gre": lambda: physics.gre(t["pd"], t["r1"], t["r2s"], t["mt"], **p["gre"]),
        "flair": lambda: physics.flair(t["pd"], t["r1"], t["r2"], **p["flair"]),
        "mprage": lambda: physics.mprage(t["pd"], t["r1"], **p["mprage"]),
        "rician": lambda: physics.rician_noise(t["pd"], 0.02, generator=gen),
    }


def numpy_calls(m: dict[str, np.ndarray]) -> dict[str, Callable[[], np.ndarray]]:
    p = PROTOCOLS
    rng = np.random.default_rng(0)
    return {
        "fse": lambda: np_fse(m, **p["fse"]),
        "gre": lambda: np_gre(m, **p["gre"]),
        "flair": lambda: np_flair(m, **p["flair"]),
        "mprage": lambda: np_mprage(m, **p["mprage"]),
        "rician": lambda: np_rician(m["pd"], 0.02, rng),
    }


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up (allocations, kernels)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=1, choices=(1, 2), help="template voxel size, mm")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args()

    maps = brain_maps(args.resolution, np.dtype(args.dtype))
    nvox = maps["pd"].size
    print(f"volume {maps['pd'].shape} = {nvox / 1e6:.2f} M voxels, {args.dtype}, median of {args.repeats} runs")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; numpy {np.__version__}")

    tmaps = {k: torch.from_numpy(v) for k, v in maps.items()}
    np_fns = numpy_calls(maps)
    t_fns = torch_calls(tmaps, torch.Generator().manual_seed(0))
    gpu_fns = None
    if torch.cuda.is_available():
        gmaps = {k: v.cuda() for k, v in tmaps.items()}
        gpu_fns = torch_calls(gmaps, torch.Generator(device="cuda").manual_seed(0))

    header = f"{'sequence':<8} {'numpy Mvox/s':>13} {'torch-cpu Mvox/s':>17} {'cpu ratio':>10}"
    if gpu_fns:
        header += f" {'torch-gpu Mvox/s':>17} {'gpu ratio':>10}"
    print(header)
    ratios = []
    for name in np_fns:
        # same equations, same data: check agreement before timing
        ref = np_fns[name]()
        if name != "rician":
            got = t_fns[name]().numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
        t_np = median_seconds(np_fns[name], args.repeats)
        t_cpu = median_seconds(t_fns[name], args.repeats)
        ratios.append(t_np / t_cpu)
        line = f"{name:<8} {nvox / t_np / 1e6:>13.1f} {nvox / t_cpu / 1e6:>17.1f} {t_np / t_cpu:>9.2f}x"
        if gpu_fns:
            t_gpu = median_seconds(gpu_fns[name], args.repeats, torch.cuda.synchronize)
            line += f" {nvox / t_gpu / 1e6:>17.1f} {t_np / t_gpu:>9.1f}x"
        print(line)
    geo = float(np.exp(np.mean(np.log(ratios))))
    print(f"geometric-mean speed-up of torch-cpu over numpy: {geo:.2f}x")


if __name__ == "__main__":
    main()

"""Entry point of the probe: :func:`run_probe` builds the encoders and baselines, evaluates them and writes
``probe.json``, ``probe.md`` and ``probe.png``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from custom.data.qmri_datalist import find_qmri_subjects
from custom.io import atomic_write_text
from custom.networks import PAPER_ENCODER_FEATURES, Encoder, encoder_features_of, load_encoder_weights
from custom.probe.data import ProbeInputError, probe_contrasts, split_subjects
from custom.probe.evaluate import evaluate_probe
from custom.probe.features import EncoderFeatures, FeatureFunction, IntensityFeatures, PositionFeatures
from custom.probe.report import format_probe_table, json_safe, probe_rows, write_heatmap

__all__ = ["BASELINES", "EncoderSpec", "run_probe"]

logger = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("position", "intensity", "random")
"""Baselines :func:`run_probe` adds to the encoders it is given."""

EncoderSpec = str | Path | nn.Module | FeatureFunction | None


def _build_encoder(name: str, spec: str | Path | None, features: Sequence[int], seed: int) -> tuple[nn.Module, dict]:
    if spec is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            encoder = Encoder(features=tuple(int(f) for f in features))
        return encoder, {"weights": None, "features": list(encoder.features), "init": f"random (seed {seed})"}
    from custom.weights import read_weights  # the bundle-aware reader (file, bundle folder or zip)

    try:
        state = read_weights(spec)
        widths = encoder_features_of(state)
        encoder = Encoder(features=widths)
        copied = load_encoder_weights(encoder, spec)
    except (FileNotFoundError, ValueError) as err:
        raise ProbeInputError(f"encoder {name!r}: cannot use weights {spec}: {err}") from err
    return encoder, {"weights": str(spec), "features": list(widths), "copied_tensors": copied}


def run_probe(
    encoders: Mapping[str, EncoderSpec] | None,
    dataset_dir: str | Path,
    fit_subjects: int | Sequence[str] = 6,
    test_subjects: int | Sequence[str] = 6,
    seed: int = 0,
    features: Sequence[int] = PAPER_ENCODER_FEATURES,
    output_dir: str | Path | None = None,
    baselines: Sequence[str] = BASELINES,
    remove_position: bool = True,
    max_shift: int = 12,
    normalize: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "zscore",
    noise: float = 0.01,
    preset: str = "clinical",
    ixi_site: str = "Guys",
    fit_voxels_per_class: int = 1500,
    test_voxels: int | None = None,
    dense_voxels: int = 4000,
    voxel_standardize: bool = False,
    l2: float = 1.0e-3,
    bootstrap: int = 200,
    device: str | torch.device | None = None,
    progress: bool = True,
    print_table: bool = True,
) -> list[dict[str, Any]]:
    """Cross-contrast linear probe, dense consistency and retrieval of encoders against baselines (:mod:`custom.probe`).

    Args:
        encoders: name -> weights (a ``model.pt``, a checkpoint, a bundle folder or zip; widths are read from
            the weights), ``None`` (a random-init encoder of ``features``), an image encoder module (returning
            its list of level maps) or a feature function ``ProbeVolume -> [maps]``. ``None`` or ``{}``:
            baselines only.
        dataset_dir: qMRI subject folders with ``*_labels`` tissue maps (``seqinv synth`` writes them).
        fit_subjects, test_subjects: counts (the first ``fit_subjects`` subject folders in sorted order fit the
            probe, the next ``test_subjects`` test it; with fewer subjects the pool is split in the same ratio,
            at least 1 + 2) or lists of subject names.
        seed: seeds the panel, noise, flips/shifts, voxel samples, random encoder and bootstrap.
        features: widths of the ``random`` baseline when no encoder weights are given (else the first weights').
        output_dir: where ``probe.json``, ``probe.md`` and ``probe.png`` are written (atomically); ``None``:
            nothing written.
        baselines: any of ``position``, ``intensity``, ``random`` (added after the encoders).
        remove_position, max_shift, normalize, noise, fit_voxels_per_class, test_voxels, dense_voxels,
            voxel_standardize, l2, bootstrap: see :func:`evaluate_probe`.
        preset, ixi_site: the contrast panel (:func:`probe_contrasts`).
        device: where encoders run (default: CUDA when available).
        progress: tqdm bar. print_table: print the markdown table.

    Returns:
        One row per encoder (encoders first, then baselines): ``encoder``, ``cross_contrast`` (+ ``_ci``),
        ``same_contrast`` (+ ``_ci``), ``dense_{same,different,difference}_{deepest,mean}``, ``retrieval_top1``,
        ``retrieval_chance``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {list(BASELINES)}")
    encoders = dict(encoders or {})
    clash = [name for name in encoders if name in baselines]
    if clash:
        raise ValueError(f"encoder name(s) {clash} clash with the baselines {list(baselines)}; rename them")

    root = Path(dataset_dir)
    if not root.is_dir():
        raise ProbeInputError(f"probe dataset folder {root} does not exist")
    pool = find_qmri_subjects(root)
    fit_items, test_items = split_subjects(pool, fit_subjects, test_subjects, str(root))

    extractors: dict[str, FeatureFunction] = {}
    info: dict[str, dict[str, Any]] = {}
    random_widths: Sequence[int] = features
    for name, spec in encoders.items():
        if isinstance(spec, nn.Module):
            extractors[name] = EncoderFeatures(spec, device)
            info[name] = {"module": type(spec).__name__}
        elif callable(spec):
            extractors[name] = spec
            info[name] = {"feature_function": getattr(spec, "__name__", type(spec).__name__)}
        else:
            encoder, info[name] = _build_encoder(name, spec, features, seed)
            if spec is not None and random_widths is features:
                random_widths = info[name]["features"]
            extractors[name] = EncoderFeatures(encoder, device)
    for name in baselines:
        if name == "position":
            extractors[name] = PositionFeatures()
            info[name] = {"baseline": "canvas coordinates, squares and products"}
        elif name == "intensity":
            extractors[name] = IntensityFeatures()
            info[name] = {"baseline": "normalised intensity and 3x3x3 mean"}
        else:
            encoder, info[name] = _build_encoder(name, None, random_widths, seed)
            extractors[name] = EncoderFeatures(encoder, device)
    if not extractors:
        raise ValueError("nothing to evaluate: no encoder and no baseline")

    contrasts = probe_contrasts(seed, preset=preset, ixi_site=ixi_site)
    logger.info(
        "linear probe on %s: %d fit / %d test subjects, %d contrasts, %s",
        root, len(fit_items), len(test_items), len(contrasts), ", ".join(extractors),
    )  # fmt: skip
    start = time.perf_counter()
    report = evaluate_probe(
        extractors, fit_items, test_items, contrasts, seed=seed, remove_position=remove_position, max_shift=max_shift,
        normalize=normalize, noise=noise, fit_voxels_per_class=fit_voxels_per_class, test_voxels=test_voxels,
        dense_voxels=dense_voxels, voxel_standardize=voxel_standardize, l2=l2, bootstrap=bootstrap, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    rows = probe_rows(report["results"])
    table = format_probe_table(rows)
    position = f"random flips and shifts up to {max_shift} voxels" if remove_position else "aligned (no flips/shifts)"
    header = (
        f"Cross-contrast linear probe (GM/WM/CSF, balanced accuracy, chance 0.333) on {root}: fit on "
        f"{len(fit_items)} subjects, tested on {len(test_items)} held-out subjects; contrasts "
        f"{', '.join(contrasts)}; {position}; normalisation {normalize if isinstance(normalize, str) else 'custom'}."
    )
    if print_table:
        print(header)
        print(table)
    record = {
        "dataset_dir": str(root),
        "seed": int(seed),
        "remove_position": bool(remove_position),
        "max_shift": int(max_shift),
        "normalize": normalize if isinstance(normalize, str) else "custom",
        "noise": float(noise),
        "preset": preset,
        "ixi_site": ixi_site,
        "fit_voxels_per_class": int(fit_voxels_per_class),
        "test_voxels": test_voxels,
        "voxel_standardize": bool(voxel_standardize),
        "l2": float(l2),
        "bootstrap": int(bootstrap),
        "device": str(device),
        "seconds": round(seconds, 2),
        "encoders": info,
        **report,
        "rows": rows,
        "table": table,
    }
    if output_dir is not None:
        out = Path(output_dir)
        atomic_write_text(json.dumps(json_safe(record), indent=2) + "\n", out / "probe.json")
        atomic_write_text(f"{header}\n\n{table}\n", out / "probe.md")
        write_heatmap(out / "probe.png", report["results"], list(contrasts))
        logger.info("wrote %s, %s and %s", out / "probe.json", out / "probe.md", out / "probe.png")
        if print_table:
            print(f"wrote {out / 'probe.json'}, {out / 'probe.md'}, {out / 'probe.png'}")
    return rows

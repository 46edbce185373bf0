"""One probe evaluation: every feature function on the same volumes and voxels -> train x test balanced
accuracies with bootstrap intervals, dense consistency per level, and cross-sequence retrieval."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from custom.data.qmri import LoadQMRId
from custom.fields import region_percentile as robust_max
from custom.invariance import cross_sequence_retrieval
from custom.physics import rician_noise
from custom.probe.consistency import dense_consistency
from custom.probe.data import (
    NOISE_PERCENTILE,
    TISSUES,
    ProbeInputError,
    balanced_points,
    load_subject_labels,
    normalize_image,
    plain_volume,
    plan_canvas,
    probe_contrasts,
    sample_points,
    seeded_generator,
    to_canvas,
)
from custom.probe.features import CHUNK, FeatureFunction, ProbeVolume, probe_input, sample_voxel_features
from custom.probe.linear import LogisticProbe, balanced_accuracy_batch, confusion_matrix
from custom.sequences import SequenceSample, simulate

__all__ = ["evaluate_probe"]

logger = logging.getLogger(__name__)


def _summaries(confusions: torch.Tensor, draws: int, seed: int) -> dict[str, Any]:
    """Matrix, cross/same means and their bootstrap intervals from per-test-subject confusions ``(K, K, S, C, C)``."""
    k, _, n_subjects = confusions.shape[:3]
    matrix = balanced_accuracy_batch(confusions.sum(dim=2))  # (K, K)
    off = ~torch.eye(k, dtype=torch.bool)
    diag = torch.eye(k, dtype=torch.bool)

    def cross_same(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cross = m[..., off].nanmean(dim=-1) if k > 1 else torch.full(m.shape[:-2], math.nan, dtype=m.dtype)
        return cross, m[..., diag].nanmean(dim=-1)

    cross, same = cross_same(matrix)
    record: dict[str, Any] = {"matrix": matrix.tolist(), "cross_contrast": float(cross), "same_contrast": float(same)}
    if draws > 0:
        g = seeded_generator(seed, 4242)
        picks = torch.randint(n_subjects, (int(draws), n_subjects), generator=g)
        counts = torch.zeros(int(draws), n_subjects, dtype=torch.float64)
        counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
        boot = balanced_accuracy_batch(torch.einsum("bs,ijsxy->bijxy", counts, confusions.double()))
        b_cross, b_same = cross_same(boot)

        def interval(values: torch.Tensor) -> list[float]:
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                return [math.nan, math.nan]
            q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
            return [float(q[0]), float(q[1])]

        record["cross_contrast_ci"] = interval(b_cross)
        record["same_contrast_ci"] = interval(b_same)
        cells = torch.quantile(boot.reshape(int(draws), -1), torch.tensor([0.025, 0.975], dtype=boot.dtype), dim=0)
        record["matrix_ci"] = cells.reshape(2, k, k).permute(1, 2, 0).tolist()
    else:
        record["cross_contrast_ci"] = [math.nan, math.nan]
        record["same_contrast_ci"] = [math.nan, math.nan]
    return record


def evaluate_probe(
    extractors: Mapping[str, FeatureFunction],
    fit_items: Sequence[Mapping[str, Any]],
    test_items: Sequence[Mapping[str, Any]],
    contrasts: Mapping[str, SequenceSample] | None = None,
    seed: int = 0,
    remove_position: bool = True,
    max_shift: int = 12,
    canvas_multiple: int = 16,
    normalize: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "zscore",
    noise: float = 0.01,
    fit_voxels_per_class: int = 1500,
    test_voxels: int | None = None,
    dense_voxels: int = 4000,
    voxel_standardize: bool = False,
    l2: float = 1.0e-3,
    max_iter: int = 200,
    bootstrap: int = 200,
    retrieval: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe, dense consistency and retrieval of every feature function on the same volumes and voxels.

    Args:
        extractors: name -> feature function (:class:`EncoderFeatures`, :class:`PositionFeatures`, ... or any
            ``ProbeVolume -> [maps]`` callable).
        fit_items, test_items: qMRI datalist items (``pd``, ``r1``, ``r2s``, ``mt``, optional ``r2``, ``mask``;
            see :func:`~custom.data.qmri_datalist.find_qmri_subjects`) whose folders hold ``*_labels`` maps.
        contrasts: name -> protocol (default :func:`probe_contrasts` of ``seed``); at least 2.
        seed: seeds the noise, the flips/shifts, the voxel samples and the bootstrap.
        remove_position, max_shift: random flips and translations (see :mod:`custom.probe`).
        canvas_multiple: the canvas is a multiple of this per axis (16 suits the 5-level encoder).
        normalize: see :func:`normalize_image`. noise: Rician sigma relative to the image's 99.5th brain
            percentile (before normalisation).
        fit_voxels_per_class: GM / WM / CSF voxels sampled per fit subject (all when fewer).
        test_voxels: scored voxels per test subject (``None``: every labelled brain voxel; lesions excluded).
        dense_voxels: canvas locations (inside the union of the test brains) for dense consistency.
        voxel_standardize: standardise each level's feature vector per voxel before concatenation.
        l2, max_iter: :class:`LogisticProbe` settings. bootstrap: subject-bootstrap draws (0: none).
        retrieval: also compute cross-sequence retrieval of the test subjects' pooled deepest maps. With
            ``remove_position`` it runs on the untransformed brains (an extra pass of the test subjects on an
            aligned canvas): one subject's contrasts share its flips and shift, which would identify it.
        progress: tqdm bar over subjects.

    Returns:
        ``{"contrasts", "fit_subjects", "test_subjects", "canvas", "placements", "results": {name: {...}}}``.
    """
    if len(extractors) == 0:
        raise ValueError("evaluate_probe needs at least one feature function")
    contrasts = dict(contrasts) if contrasts is not None else probe_contrasts(seed)
    if len(contrasts) < 2:
        raise ValueError(f"the probe needs at least 2 contrasts (train x test), got {list(contrasts)}")
    if len(test_items) < 2 or len(fit_items) < 1:
        raise ProbeInputError(f"need >= 1 fit and >= 2 test subjects, got {len(fit_items)} and {len(test_items)}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    names = list(contrasts)
    k = len(names)
    n_classes = len(TISSUES)

    subjects = [load_subject_labels(item) for item in [*fit_items, *test_items]]
    n_fit = len(fit_items)
    seen: set[str] = set()
    for s in subjects:
        if s.name in seen:
            raise ProbeInputError(f"subject {s.name} is listed twice (fit and test subjects must differ)")
        seen.add(s.name)
    canvas, placements = plan_canvas(subjects, remove_position, max_shift, int(canvas_multiple), seed)
    logger.info("probe canvas %s (%s)", canvas, "random flips and shifts" if remove_position else "aligned")

    def canvas_of(array: np.ndarray, index: int) -> torch.Tensor:
        return to_canvas(torch.from_numpy(np.ascontiguousarray(array)), placements[index], canvas)

    # fixed voxel sets, shared by every feature function
    test_masks = [canvas_of(s.mask, n_fit + i) for i, s in enumerate(subjects[n_fit:])]
    union = torch.zeros(canvas, dtype=torch.bool)
    for m in test_masks:
        union |= m
    dense_points = sample_points(union, int(dense_voxels), seeded_generator(seed, 999))
    dense_inside = torch.stack([m[tuple(dense_points.T)] for m in test_masks])  # (S_test, P)
    if retrieval and remove_position:
        aligned_canvas, aligned_placements = plan_canvas(subjects, False, 0, int(canvas_multiple), seed)

    def features_at(levels: Sequence[torch.Tensor], where: torch.Tensor) -> torch.Tensor:
        return probe_input(sample_voxel_features(levels, where, canvas), voxel_standardize)

    fit_x: dict[str, dict[str, list[torch.Tensor]]] = {e: {c: [] for c in names} for e in extractors}
    fit_y: list[torch.Tensor] = []
    probes: dict[str, dict[str, LogisticProbe]] = {}
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_test = len(test_items)
    confusions = {e: torch.zeros(k, k, n_test, n_classes, n_classes, dtype=torch.long) for e in extractors}
    dense: dict[str, list[torch.Tensor]] = {}
    pooled: dict[str, torch.Tensor] = {}
    level_counts: dict[str, int] = {}
    loader = LoadQMRId()
    start = time.perf_counter()
    bar = tqdm(subjects, desc="probe", unit="subject", disable=not progress, leave=False)
    for index, subject in enumerate(bar):
        is_fit = index < n_fit
        bar.set_postfix_str(f"{subject.name} ({'fit' if is_fit else 'test'})")
        if not is_fit and not probes:  # all fit subjects seen: fit one probe per feature function and contrast
            y = torch.cat(fit_y)
            for e in extractors:
                probes[e] = {}
                for c in names:
                    probes[e][c] = LogisticProbe(l2=l2, max_iter=max_iter).fit(torch.cat(fit_x[e][c]), y, n_classes)
                fit_x[e] = {}  # free the memory
                # every train contrast's probe in one matrix: scores (N, K * classes) = features @ W + b
                pairs = [probes[e][c].folded() for c in names]
                folded[e] = (torch.cat([w for w, _ in pairs], dim=1), torch.cat([b for _, b in pairs]))
            logger.info("fitted %d probes on %d voxels of %d subjects", len(extractors) * k, y.numel(), n_fit)
        data = loader(subject.item)
        maps = {key: plain_volume(data[key]) for key in ("pd", "r1", "r2s", "mt") if data.get(key) is not None}
        r2 = plain_volume(data["r2"]) if data.get("r2") is not None else None
        mask_grid = torch.from_numpy(subject.mask)
        labels_c = canvas_of(subject.labels, index)
        mask_c = canvas_of(subject.mask, index)
        score_c = canvas_of(subject.score, index)
        g_points = seeded_generator(seed, 100 + index)
        if is_fit:
            points = balanced_points(labels_c, score_c, int(fit_voxels_per_class), g_points)
            fit_y.append(labels_c[tuple(points.T)].long() - 1)
        else:
            points = sample_points(score_c, test_voxels, g_points)
            truth = labels_c[tuple(points.T)].long() - 1
        for j, (cname, sample) in enumerate(contrasts.items()):
            image = simulate(sample, maps["pd"], maps["r1"], maps["r2s"], maps.get("mt"), r2=r2)
            scale = float(robust_max(image, mask_grid, NOISE_PERCENTILE))
            if not math.isfinite(scale) or scale <= 0:
                raise ProbeInputError(f"subject {subject.name}: {cname} {sample} gives no signal in the brain")
            image = image / scale
            if noise > 0:
                image = rician_noise(image, float(noise), generator=seeded_generator(seed, index, j))
            image = normalize_image(image, mask_grid, normalize).float()
            volume = ProbeVolume(subject.name, cname, canvas_of(image.numpy(), index), mask_c, labels_c)
            aligned = None
            if not is_fit and retrieval and remove_position:  # retrieval sees the untransformed brain
                place = aligned_placements[index]
                aligned = ProbeVolume(
                    subject.name,
                    cname,
                    to_canvas(image, place, aligned_canvas),
                    to_canvas(mask_grid, place, aligned_canvas),
                    to_canvas(torch.from_numpy(subject.labels), place, aligned_canvas),
                )
            for e, extract in extractors.items():
                levels = [m.detach() for m in extract(volume)]
                if not levels:
                    raise ValueError(f"feature function {e!r} returned no feature map")
                level_counts[e] = len(levels)
                if is_fit:
                    fit_x[e][cname].append(features_at(levels, points))
                    continue
                s = index - n_fit
                weight, bias = folded[e]
                for lo in range(0, points.shape[0], CHUNK):
                    scores = features_at(levels, points[lo : lo + CHUNK]).to(weight.device) @ weight + bias
                    predicted = scores.reshape(scores.shape[0], k, n_classes).argmax(dim=2).cpu()
                    y_true = truth[lo : lo + CHUNK]
                    for i in range(k):
                        confusions[e][i, j, s] += confusion_matrix(y_true, predicted[:, i], n_classes)
                per_level = sample_voxel_features(levels, dense_points, canvas)
                if e not in dense:
                    dense[e] = [torch.zeros(n_test, k, dense_points.shape[0], f.shape[1]) for f in per_level]
                for level, f in enumerate(per_level):
                    dense[e][level][s, j] = f
                if retrieval:
                    deepest = (extract(aligned)[-1] if aligned is not None else levels[-1]).detach().float()
                    if e not in pooled:
                        pooled[e] = torch.zeros(n_test, k, deepest.shape[0])
                    pooled[e][s, j] = deepest.flatten(1).mean(dim=1).cpu()
    seconds = time.perf_counter() - start

    results: dict[str, Any] = {}
    for e in extractors:
        record = _summaries(confusions[e], int(bootstrap), seed)
        per_level = [dense_consistency(f, dense_inside) for f in dense[e]]
        record["dense"] = per_level
        record["dense_deepest"] = per_level[-1]
        record["dense_mean"] = {key: float(np.mean([d[key] for d in per_level])) for key in per_level[-1]}
        if retrieval:
            record["retrieval"] = cross_sequence_retrieval(pooled[e], names).to_dict()
        else:
            record["retrieval"] = {"top1": math.nan, "chance_top1": 1.0 / n_test}
        record["levels"] = level_counts[e]
        record["scored_voxels"] = int(confusions[e][0, 0].sum())
        results[e] = record
    return {
        "contrasts": {c: s.to_dict() for c, s in contrasts.items()},
        "fit_subjects": [s.name for s in subjects[:n_fit]],
        "test_subjects": [s.name for s in subjects[n_fit:]],
        "canvas": list(canvas),
        "placements": {
            s.name: {"flips": list(p.flips), "offset": list(p.offset), "box": [[b.start, b.stop] for b in p.box]}
            for s, p in zip(subjects, placements, strict=True)
        },
        "fit_voxels": int(sum(y.numel() for y in fit_y)),
        "dense_voxels": int(dense_points.shape[0]),
        "seconds": round(seconds, 2),
        "results": results,
    }

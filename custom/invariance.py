"""Sequence-invariance of an encoder, measured without labels (the paper's central claim).

(About 520 lines, kept in one module on purpose: the protocol panel, the crops, the retrieval metric and its
runner are one measurement whose pieces are only used together; :mod:`custom.probe` imports the metric.)

Every subject of a qMRI data set is imaged with the *same* panel of ``K`` simulated protocols
(:func:`sequence_panel`: FSE, GRE, FLAIR, MPRAGE, FSE, ... with parameters fixed by a seed). Each image is
embedded by the encoder (global-average-pooled deepest feature map, :func:`embed_volume`). An encoder whose
representation is invariant to the MRI sequence keeps one subject's images together across protocols:

* **cross-sequence top-1 retrieval**: for every query (subject ``s``, protocol ``k``), the nearest embedding by
  cosine similarity among those of every *other* protocol ``k' != k`` of *all* subjects; top-1 is the share of
  queries whose nearest neighbour is the same subject. Each query has ``S (K - 1)`` candidates of which ``K - 1``
  are its own subject, so random embeddings score ``1 / S`` (``chance_top1``). A tie between several nearest
  candidates counts the share of them that are the same subject (the expected score of a random tie-break), so
  an encoder that gives every subject the same embedding for a protocol scores chance exactly.
* **distance ratio**: mean cosine distance (``1 - cos``) between one subject's images under different protocols,
  divided by the mean cosine distance between different subjects' images (every protocol pair). Below 1 subject
  identity dominates the embedding; above 1 the sequence does.

:func:`run_invariance` evaluates pretrained weights on a data set folder and, in the same run, a randomly
initialised encoder of the same widths as the baseline, prints a markdown table and can write a JSON record.

On the synthetic data (every subject a warp of one template) pooled-embedding retrieval cannot rank encoders;
:mod:`custom.probe` (a cross-contrast linear tissue probe on voxel features, dense feature consistency, and
this retrieval) is the evaluation that can. It calls :func:`cross_sequence_retrieval` for its retrieval column.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from custom.data.qmri import LoadQMRId
from custom.data.qmri_datalist import find_qmri_subjects, qmri_datalist
from custom.fields import polynomial_log_field
from custom.fields import region_percentile as robust_max
from custom.io import atomic_write_text
from custom.networks import PAPER_ENCODER_FEATURES, Encoder, load_encoder_weights
from custom.physics import rician_noise
from custom.sequences import SEQUENCES, SequenceSample, as_generator, sample_sequence, simulate

__all__ = [
    "InvarianceResult",
    "embed_volume",
    "sequence_panel",
    "cross_sequence_retrieval",
    "evaluate_invariance",
    "run_invariance",
    "format_table",
]

logger = logging.getLogger(__name__)

#: Smallest padded spatial size: the paper's 5-level encoder keeps two voxels per axis at its deepest level.
MIN_SIZE = 32
#: Percentile (inside the brain) that each simulated image is scaled to 1 at.
NORM_PERCENTILE = 99.5
#: Cosine similarities this close to the best one count as a tie.
TIE_TOLERANCE = 1e-7


# --------------------------------------------------------------------------------------------------- embedding
def _bounding_box(region: torch.Tensor) -> tuple[slice, ...]:
    """Slices of the bounding box of the nonzero voxels of ``region`` (spatial axes only, any number of axes)."""
    nonzero = torch.nonzero(region)
    if nonzero.numel() == 0:
        raise ValueError("cannot crop to an empty foreground (the mask has no nonzero voxel)")
    low = nonzero.min(dim=0).values.tolist()
    high = nonzero.max(dim=0).values.tolist()
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(low, high, strict=True))


def _voxel_spacing(image: Any) -> list[float]:
    """Voxel edge lengths (mm) from a MetaTensor's affine (1 mm when there is none)."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return [1.0, 1.0, 1.0]
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return [float(v) for v in torch.linalg.norm(affine[:3, :3], dim=0)]


def _central_box(region: torch.Tensor, size: Sequence[int], shift: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...]:
    """Slices of a box of ``size`` voxels centred on the centre of mass of ``region`` (moved by ``shift``
    voxels), shifted to fit inside the volume."""
    mass_centre = torch.nonzero(region).float().mean(dim=0).round().long().tolist()
    centre = [int(c) + int(d) for c, d in zip(mass_centre, shift, strict=True)]
    box = []
    for c, n, full in zip(centre, size, region.shape, strict=True):
        n = min(int(n), int(full))
        start = min(max(int(c) - n // 2, 0), int(full) - n)
        box.append(slice(start, start + n))
    return tuple(box)


def _pad_to(image: torch.Tensor, divisor: int, min_size: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(C, *S)`` symmetrically to multiples of ``divisor`` of at least ``min_size``."""
    pads: list[int] = []
    for size in reversed(image.shape[1:]):  # F.pad lists the last axis first
        target = max(size, min_size)
        target = int(math.ceil(target / divisor)) * divisor
        extra = target - size
        pads += [extra // 2, extra - extra // 2]
    return F.pad(image, pads) if any(pads) else image


def embed_volume(
    encoder: nn.Module,
    image: torch.Tensor,
    device: str | torch.device = "cpu",
    crop: torch.Tensor | None = None,
    min_size: int = MIN_SIZE,
) -> torch.Tensor:
    """Embedding of one whole volume: the global-average-pooled deepest feature map of ``encoder``.

    Args:
        encoder: an :class:`~custom.networks.Encoder` (or any module returning a list of feature maps, deepest
            last, or one map); its ``size_divisor`` attribute (1 when absent) sets the padding. It is moved to
            ``device`` and run in eval mode (its train/eval mode is restored afterwards), without gradients, under
            autocast on CUDA.
        image: ``(C, *S)`` (``(1, X, Y, Z)`` for one MRI contrast).
        device: where to run the encoder.
        crop: optional mask broadcastable to ``image``'s spatial shape; the image is first cropped to the bounding
            box of its nonzero voxels.
        min_size: every spatial axis is zero-padded to at least this size (then up to a multiple of
            ``size_divisor``); the padding is split evenly on both sides.

    Returns:
        A float32 CPU vector ``(D,)``, ``D`` the channels of the deepest map (768 for the paper's encoder).
    """
    if image.ndim < 2:
        raise ValueError(f"embed_volume expects a (C, *spatial) image, got shape {tuple(image.shape)}")
    x = torch.as_tensor(image).float()
    if crop is not None:
        region = torch.as_tensor(crop) != 0
        if region.ndim == x.ndim:  # channel-first mask: foreground in any channel
            region = region.any(dim=0)
        if tuple(region.shape) != tuple(x.shape[1:]):
            raise ValueError(f"crop mask shape {tuple(crop.shape)} does not match the image {tuple(x.shape)}")
        x = x[(slice(None), *_bounding_box(region))]
    divisor = int(getattr(encoder, "size_divisor", 1))
    x = _pad_to(x, max(divisor, 1), min_size)
    device = torch.device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    try:
        amp = torch.autocast("cuda") if device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), amp:
            out = encoder(x.unsqueeze(0).to(device))
    finally:
        encoder.train(was_training)
    deepest = out[-1] if isinstance(out, list | tuple) else out
    return deepest.float().flatten(2).mean(dim=2)[0].cpu()


# ------------------------------------------------------------------------------------------------- the panel
def sequence_panel(k: int, preset: str = "clinical", seed: int = 0) -> list[SequenceSample]:
    """``k`` protocols that every subject is imaged with: sequence types round-robin, parameters fixed by ``seed``.

    Protocol ``i`` is of type ``SEQUENCES[i % 4]`` (FSE, GRE, FLAIR, MPRAGE, FSE, ...), so ``k >= 4`` covers every
    type; its parameters are drawn from ``preset`` with one generator seeded by ``seed`` (the same panel for the
    same arguments, and the first protocols of a longer panel are those of a shorter one).
    """
    if k < 1:
        raise ValueError(f"sequence_panel needs k >= 1 protocols, got {k}")
    g = as_generator(int(seed))
    return [sample_sequence(SEQUENCES[i % len(SEQUENCES)], preset=preset, generator=g) for i in range(int(k))]


# --------------------------------------------------------------------------------------------------- metrics
@dataclass
class InvarianceResult:
    """Cross-sequence retrieval of one encoder over ``n_subjects`` subjects imaged with ``k`` protocols.

    Attributes:
        top1: share of queries whose nearest other-protocol embedding is the same subject, in [0, 1].
        distance_ratio: mean same-subject cross-protocol cosine distance / mean different-subject cosine
            distance (< 1: subject identity dominates over the sequence). ``inf`` when different subjects are
            indistinguishable but protocols are not; 1 when every embedding is the same.
        chance_top1: top-1 of random embeddings, ``1 / n_subjects``.
        n_subjects, k: subjects and protocols.
        per_sequence_top1: top-1 of the queries of each sequence type (``"fse"``, ``"gre"``, ...).
        same_subject_distance, different_subject_distance: the two means of ``distance_ratio``.
        protocols: the panel, as :meth:`SequenceSample.to_dict` records.
    """

    top1: float
    distance_ratio: float
    chance_top1: float
    n_subjects: int
    k: int
    per_sequence_top1: dict[str, float]
    same_subject_distance: float = float("nan")
    different_subject_distance: float = float("nan")
    protocols: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (a non-finite number is written as ``None``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))

    def __str__(self) -> str:
        per_seq = ", ".join(f"{name} {value:.3f}" for name, value in self.per_sequence_top1.items())
        return (
            f"cross-sequence top-1 {self.top1:.3f} (chance {self.chance_top1:.3f}), distance ratio "
            f"{self.distance_ratio:.3f}, {self.n_subjects} subjects x {self.k} protocols [{per_seq}]"
        )


def cross_sequence_retrieval(embeddings: torch.Tensor, sequence_names: Sequence[str] | None = None) -> InvarianceResult:
    """Retrieval metrics of embeddings ``(S, K, D)`` (subject, protocol, feature); see the module docstring.

    Args:
        embeddings: one vector per subject and protocol; ``S >= 2`` and ``K >= 2``.
        sequence_names: the sequence type of each protocol (for ``per_sequence_top1``); ``None`` names them
            ``"protocol0"``, ``"protocol1"``, ...
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (subjects, protocols, features), got shape {tuple(embeddings.shape)}")
    n_subjects, k, _ = embeddings.shape
    if n_subjects < 2:
        raise ValueError(f"cross-sequence retrieval needs at least 2 subjects, got {n_subjects}")
    if k < 2:
        raise ValueError(f"cross-sequence retrieval needs at least 2 protocols, got k={k}")
    names = list(sequence_names) if sequence_names is not None else [f"protocol{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} sequence names for {k} protocols")

    flat = embeddings.reshape(n_subjects * k, -1).double()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = unit @ unit.T
    subject = torch.arange(n_subjects).repeat_interleave(k)
    protocol = torch.arange(k).repeat(n_subjects)
    same_subject = subject[:, None] == subject[None, :]
    other_protocol = protocol[:, None] != protocol[None, :]

    # nearest candidate of each query among the other protocols (ties share the credit)
    masked = sim.masked_fill(~other_protocol, -math.inf)
    best = masked.max(dim=1, keepdim=True).values
    tied = (masked >= best - TIE_TOLERANCE) & other_protocol
    hits = (tied & same_subject).sum(dim=1).double() / tied.sum(dim=1).double()
    top1 = float(hits.mean())

    per_sequence: dict[str, float] = {}
    for name in dict.fromkeys(names):  # first-appearance order
        chosen = torch.tensor([names[int(p)] == name for p in protocol])
        per_sequence[name] = float(hits[chosen].mean())

    distance = 1.0 - sim
    same = float(distance[same_subject & other_protocol].mean())
    different = float(distance[~same_subject].mean())
    if different > 1e-12:
        ratio = same / different
    else:
        ratio = 1.0 if same <= 1e-12 else math.inf
    return InvarianceResult(
        top1=top1,
        distance_ratio=ratio,
        chance_top1=1.0 / n_subjects,
        n_subjects=int(n_subjects),
        k=int(k),
        per_sequence_top1=per_sequence,
        same_subject_distance=same,
        different_subject_distance=different,
    )


# ------------------------------------------------------------------------------------------------ evaluation
def _plain(x: Any) -> torch.Tensor:
    """A plain float32 tensor (drops MONAI ``MetaTensor`` metadata)."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.float()


def _subject_name(item: Mapping[str, Any], index: int) -> str:
    if item.get("subject"):
        return str(item["subject"])
    return Path(str(item["pd"])).parent.name if item.get("pd") else f"subject{index}"


def _noise_generator(seed: int, subject: int, protocol: int) -> torch.Generator:
    """One CPU generator per (seed, subject, protocol): noise independent of evaluation order and device."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + subject * 10_007 + protocol) % (2**63 - 1))


def evaluate_invariance(
    encoder: nn.Module,
    subjects: Sequence[Mapping[str, Any]],
    k: int = 8,
    preset: str = "clinical",
    seed: int = 0,
    noise: float = 0.01,
    device: str | torch.device = "cpu",
    progress: bool = True,
    roi_mm: float | None = 128.0,
    jitter_mm: float = 0.0,
    b1_field: float = 0.2,
) -> InvarianceResult:
    """Cross-sequence retrieval of ``encoder`` on qMRI subjects, each imaged with the same ``k`` protocols.

    For every subject the maps are loaded (:class:`~custom.data.qmri.LoadQMRId`) and cropped to the bounding box
    of the brain mask (of PD > 0 without a mask); each protocol of :func:`sequence_panel` is simulated
    (:func:`custom.sequences.simulate`, with the R2 map for FSE/FLAIR when there is one), scaled so that its
    99.5th percentile inside the brain is 1, given Rician noise of standard deviation ``noise`` (seeded per
    subject and protocol) and embedded with :func:`embed_volume`. Simulation runs on the CPU; the encoder on
    ``device``.

    Args:
        encoder: the encoder to evaluate (see :func:`embed_volume`).
        subjects: datalist items with file paths under ``pd``, ``r1``, ``r2s``, ``mt`` and optionally ``r2``,
            ``mask`` (e.g. :func:`custom.data.qmri_datalist.find_qmri_subjects`); at least 2.
        k: protocols per subject, at least 2.
        preset: sequence parameter preset of :func:`sequence_panel`.
        seed: seeds the panel and the noise.
        noise: Rician noise sigma relative to the normalised image (0: noise-free).
        device: where the encoder runs.
        progress: show a tqdm bar over subjects.
        roi_mm: embed a cube of this edge (mm) centred on the brain's centre of mass instead of the whole
            brain bounding box. A fixed box removes the cue that whole-volume embeddings otherwise get from
            each subject's brain outline and box size (which lets even a random encoder retrieve subjects),
            so retrieval has to rest on the anatomy inside the brain. ``None``: the bounding box.
        jitter_mm: each protocol's cube is moved by up to this many mm per axis (head position), seeded per
            subject and protocol. 0 (default): the same cube for every protocol. On synthetic subjects (warps of
            one template) a jitter of a few mm is as large as the anatomical differences retrieval relies on.
        b1_field: and gets its own smooth receive field ``exp(degree-2 Legendre polynomial)`` with coefficients
            in ``[-b1_field, b1_field]`` (0: none).
    """
    if len(subjects) < 2:
        raise ValueError(
            f"evaluate_invariance needs at least 2 subjects for cross-subject retrieval, got {len(subjects)}"
        )
    if k < 2:
        raise ValueError(f"evaluate_invariance needs k >= 2 protocols per subject (retrieval across them), got {k}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    panel = sequence_panel(k, preset=preset, seed=seed)
    loader = LoadQMRId()
    embeddings: list[torch.Tensor] = []
    bar = tqdm(subjects, desc="invariance", unit="subject", disable=not progress, leave=False)
    for s, item in enumerate(bar):
        name = _subject_name(item, s)
        bar.set_postfix_str(name)
        data = loader(item)
        pd, r1, r2s, mt = (_plain(data[key])[0] for key in ("pd", "r1", "r2s", "mt"))
        r2 = _plain(data["r2"])[0] if data.get("r2") is not None else None
        region = _plain(data["mask"])[0] > 0 if data.get("mask") is not None else pd > 0
        if not bool(region.any()):
            raise ValueError(f"subject {name}: empty brain region (no mask voxel / no PD > 0 voxel)")
        full = {"pd": pd, "r1": r1, "r2s": r2s, "mt": mt, "r2": r2, "region": region}
        spacing = _voxel_spacing(data["pd"])
        rows = []
        for j, sample in enumerate(panel):
            # each protocol is a separate acquisition: its own head position and receive field
            gen = _noise_generator(seed, s, j)
            if roi_mm is None:
                box = _bounding_box(region)
            else:
                shift = [
                    int(round(float(torch.empty(()).uniform_(-jitter_mm, jitter_mm, generator=gen)) / sp))
                    for sp in spacing
                ]
                box = _central_box(region, [max(int(round(roi_mm / sp)), 1) for sp in spacing], shift)
            crop = {key: (t[box] if t is not None else None) for key, t in full.items()}
            image = simulate(sample, crop["pd"], crop["r1"], crop["r2s"], crop["mt"], r2=crop["r2"])
            if b1_field > 0:
                coeffs = (torch.rand(9, generator=gen, dtype=torch.float64) * 2 - 1) * b1_field
                image = image * torch.exp(polynomial_log_field(coeffs.tolist(), image.shape, degree=2))
            scale = float(robust_max(image, crop["region"], NORM_PERCENTILE))
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"subject {name}: {sample} gives no signal in the brain (99.5th percentile {scale})")
            image = image / scale
            if noise > 0:
                image = rician_noise(image, noise, generator=gen)
            rows.append(embed_volume(encoder, image[None], device))
        embeddings.append(torch.stack(rows))
    result = cross_sequence_retrieval(torch.stack(embeddings), [p.name for p in panel])
    result.protocols = [p.to_dict() for p in panel]
    return result


# ----------------------------------------------------------------------------------------------- entry point
def format_table(rows: Mapping[str, InvarianceResult]) -> str:
    """Markdown table: encoder | top-1 | chance | distance ratio."""
    lines = ["| encoder | top-1 | chance | distance ratio |", "|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r.top1:.3f} | {r.chance_top1:.3f} | {r.distance_ratio:.3f} |")
    return "\n".join(lines)


def run_invariance(
    weights: str | None,
    dataset_dir: str,
    features: Sequence[int] = PAPER_ENCODER_FEATURES,
    k: int = 8,
    preset: str = "clinical",
    seed: int = 0,
    device: str | None = None,
    output_json: str | None = None,
    split: str = "validation",
    compare_random: bool = True,
    subjects_limit: int | None = None,
    noise: float = 0.01,
    val_fraction: float = 0.1,
    progress: bool = True,
    roi_mm: float | None = 128.0,
    jitter_mm: float = 0.0,
) -> dict[str, Any]:
    """Evaluate the sequence invariance of pretrained encoder weights on a qMRI folder (and of a random baseline).

    Args:
        weights: encoder weights for :func:`~custom.networks.load_encoder_weights` (a ``model.pt``, a checkpoint or
            a bundle folder); ``None`` evaluates a randomly initialised encoder (``torch.manual_seed(seed)``).
        dataset_dir: folder of qMRI subject folders.
        features: encoder widths (those the weights were trained with).
        k, preset, seed, noise: the protocol panel and noise of :func:`evaluate_invariance`.
        device: ``"cuda"`` when available, else ``"cpu"``, by default.
        output_json: also write the returned record there (atomically).
        split: ``"all"`` (every subject found by :func:`~custom.data.qmri_datalist.find_qmri_subjects`), or
            ``"validation"`` / ``"training"`` of :func:`~custom.data.qmri_datalist.qmri_datalist` with
            ``val_fraction`` and ``seed`` (the pretraining bundle's split for the same values).
        compare_random: also evaluate a randomly initialised encoder of the same widths, in the same run, as the
            baseline (skipped when ``weights`` is None: that is the encoder evaluated already).
        subjects_limit: evaluate only the first this many subjects.
        val_fraction: held-out share of the ``validation`` / ``training`` split.
        progress: show progress bars.
        roi_mm: edge of the embedded cube (mm) of :func:`evaluate_invariance` (``None``: brain bounding box).
        jitter_mm: per-protocol position jitter of the cube (mm) of :func:`evaluate_invariance`.

    Returns:
        ``{"dataset_dir", "split", "subjects", "n_subjects", "k", "preset", "seed", "noise", "device",
        "features", "weights", "results": {label: InvarianceResult.to_dict()}, "table"}``; the labels are
        ``"pretrained"`` and ``"random init"``.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if split == "all":
        subjects = find_qmri_subjects(dataset_dir)
    else:
        datalist = qmri_datalist(dataset_dir, val_fraction=val_fraction, seed=seed)
        if split not in datalist:
            raise ValueError(f"unknown split {split!r}; expected 'all' or one of {sorted(datalist)}")
        subjects = datalist[split]
    if subjects_limit is not None:
        subjects = subjects[: int(subjects_limit)]
    if len(subjects) < 2:
        raise ValueError(
            f"the {split!r} split of {dataset_dir} holds {len(subjects)} subject(s); cross-subject retrieval needs at "
            "least 2: use split='all' or a larger val_fraction"
        )
    features = tuple(int(f) for f in features)

    def random_encoder() -> Encoder:
        torch.manual_seed(seed)
        return Encoder(features=features)

    encoders: dict[str, nn.Module] = {}
    if weights is None:
        logger.info("no weights given: evaluating a randomly initialised encoder")
        encoders["random init"] = random_encoder()
    else:
        encoder = Encoder(features=features)
        copied = load_encoder_weights(encoder, weights)
        logger.info("loaded encoder weights from %s: copied %d tensors", weights, copied)
        encoders["pretrained"] = encoder
        if compare_random:
            encoders["random init"] = random_encoder()

    logger.info(
        "sequence invariance on %d %s subject(s) of %s, %d protocols (%s), device %s",
        len(subjects), split, dataset_dir, k, preset, device,
    )  # fmt: skip
    results: dict[str, InvarianceResult] = {}
    for label, encoder in encoders.items():
        results[label] = evaluate_invariance(
            encoder,
            subjects,
            k=k,
            preset=preset,
            seed=seed,
            noise=noise,
            device=device,
            progress=progress,
            roi_mm=roi_mm,
            jitter_mm=jitter_mm,
        )
        logger.info("%s: %s", label, results[label])
    table = format_table(results)
    print(table)  # the result table itself goes to stdout; diagnostics go to logging
    record: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "split": split,
        "subjects": [_subject_name(item, i) for i, item in enumerate(subjects)],
        "n_subjects": len(subjects),
        "k": int(k),
        "preset": preset,
        "seed": int(seed),
        "noise": float(noise),
        "roi_mm": None if roi_mm is None else float(roi_mm),
        "jitter_mm": float(jitter_mm),
        "device": str(device),
        "features": list(features),
        "weights": None if weights is None else str(weights),
        "results": {label: r.to_dict() for label, r in results.items()},
        "table": table,
    }
    if output_json is not None:
        atomic_write_text(json.dumps(record, indent=2) + "\n", output_json)
        logger.info("wrote %s", output_json)
    return record

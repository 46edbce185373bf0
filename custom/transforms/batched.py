"""Batched contrastive views: loader workers cut regions, one call per batch makes every view on the device.

The per-sample path (:class:`~custom.transforms.views.ContrastiveViewsd`) makes a subject's two views inside a
DataLoader worker, one voxel-wise step after another on the CPU. Here the work is split:

* **Loader workers** (MONAI transforms, per subject): :class:`PrepareViewSourced` (deterministic, so
  ``CacheDataset`` keeps its output: the maps clamped to their ``clip_maps`` percentiles, stacked into one
  ``(5, X, Y, Z)`` tensor, plus a fixed-size sample of brain voxels for the empty-image guard and the
  ``robust_max`` scale) and :class:`RandViewRegiond` (random: cut the shared region, ``shared_region`` x the view
  crop, zero-padded to a fixed size so a batch collates).
* **One call per batch** (:class:`BatchedContrastiveViews`, on the training device): protocols for every view
  (vectorised sampling, :mod:`custom.transforms.batched_protocols`), the receive field B1, simulation grouped by
  sequence type, the view normalisation, rotation / shear / flips as one ``grid_sample``, bias field, Gibbs
  ringing, Rician noise, cuboid dropout and z-scoring (:mod:`custom.transforms.batched_augment`). It returns the
  keys of the per-sample path: ``image1``, ``image2``, ``image1_recon``, ``image2_recon``, ``image1_affine``,
  ``image2_affine`` and the ``image1_sequence`` / ``image2_sequence`` records (collated form).

:class:`ContrastiveViewStage` builds either path from one set of settings (the bundle's ``view_path`` key):
``per_sample`` (:class:`ContrastiveViewsd` in the workers), ``batched`` (the batch call runs in the trainer, on the
training device: :class:`custom.engines.PretrainingTrainer` ``batch_views``), ``batched_workers`` (the batch
call runs in the loader workers on the CPU, as the DataLoader's ``collate_fn``).

Same distributions as the per-sample path, with these documented differences (a different random stream, so
no output is bit-identical to the per-sample one):

* protocol parameters are drawn vectorised (same laws); the empty-image guard and the ``robust_max`` scale use a
  fixed-size regular sample (``sample_voxels``, default 2**15) of the brain voxels of a ~64^3 strided grid of the
  volume instead of all of them, and the guard looks inside the brain only (where a mask is given; the two are
  the same without one);
* the histogram of ``histeq`` is binned by arithmetic instead of ``torch.histc`` (equal up to float rounding at
  bin edges); Gibbs ringing uses a real FFT (the same result as MONAI's complex one, see
  :func:`~custom.transforms.batched_augment.gibbs_ringing`);
* a volume smaller than the view crop: the view's statistics use the voxels of its crop only, as per-sample, but
  the region is padded to a fixed size (the view then sees zeros there, as the per-sample path's padding);
* a batch must not mix subjects with and without a real MPRAGE (``base`` mode with ``mprage_key``).
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep

from custom.errors import InputError
from custom.fields import poly_terms, subsample_stride
from custom.intensity import VIEW_NORMS, clip_to_percentiles
from custom.sequences import SEQUENCES, _check_names, _check_preset
from custom.transforms._common import brain_region, plain
from custom.transforms.augmentations import crop_margins
from custom.transforms.batched_augment import (
    augment_settings,
    bias_field_,
    cuboid_dropout_,
    gibbs_ringing_,
    legendre_at_points,
    legendre_fields,
    normalise_views,
    rician_,
    sample_artefacts,
    sample_spatial,
    to_device,
    view_to_window,
    warp,
    zscore_views_,
)
from custom.transforms.batched_protocols import MAP_CHANNELS, SEQUENCE_CHANNELS, ProtocolBatch, simulate_family
from custom.transforms.simulation import MAP_KEYS, QMRIMaps
from custom.transforms.views import ContrastiveViewsd

__all__ = [
    "VIEW_PATHS",
    "PrepareViewSourced",
    "RandViewRegiond",
    "BatchedContrastiveViews",
    "BatchedViewsCollate",
    "ContrastiveViewStage",
    "collate_regions",
]

VIEW_PATHS: tuple[str, ...] = ("per_sample", "batched", "batched_workers")
"""Where the views are made: ``per_sample`` (:class:`ContrastiveViewsd` per subject in the loader workers),
``batched`` (:class:`BatchedContrastiveViews` on the training device, called by the trainer), ``batched_workers``
(the same batch call in the loader workers, on the CPU, as the DataLoader's collate function)."""

_MODES = ("base", "seqaug", "seqinv")
SOURCE = "view_source"  # (C, X, Y, Z): stacked clipped maps (C = 5) or the real MPRAGE (C = 1), cached
SAMPLE = "view_sample"  # (C, K) values of the brain sample
POINTS = "view_points"  # (K, 3) their voxel coordinates in the volume
PD_MAX = "view_pd_max"  # () max of the clipped PD map (the empty-image threshold's scale)
REAL = "view_real"  # () bool: the source is a real image
VOLUME = "view_volume_shape"  # (3,) the volume's spatial shape (the receive field spans it)
REGION = "view_region"  # (V, C, *R) the region(s) the views are cut from, zero-padded to R
REGION_SIZE = "view_region_size"  # (V, 3) extent of the region's content (the rest is padding)
REGION_OFFSET = "view_region_offset"  # (V, 3) volume voxel index of the region's voxel 0
REGION_AFFINE = "view_region_affine"  # (V, 4, 4) region voxel -> the volume's world (or voxel) coordinates
BATCH_KEYS = (REGION, REGION_SIZE, REGION_OFFSET, REGION_AFFINE, SAMPLE, POINTS, PD_MAX, REAL, VOLUME)


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _region_edges(
    patch_size: Sequence[int] | int, augment: Mapping[str, Any] | None, shared_region: float | None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """``(patch, crop, region, count)``: the view size, its crop (patch + margins, as the per-sample path), the
    region edge (``ceil(shared_region * crop)``, or the crop when every view is cut on its own) and the number of
    regions per subject (1 shared, or 2)."""
    patch = tuple(int(p) for p in ensure_tuple_rep(patch_size, 3))
    if any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    margins = crop_margins(patch, (augment or {}).get("margin"))
    crop = tuple(p + 2 * m for p, m in zip(patch, margins, strict=True))
    if shared_region is None:
        return patch, crop, crop, 2
    if not float(shared_region) >= 1.0:
        raise ValueError(f"shared_region must be >= 1 (a multiple of the view crop) or None, got {shared_region}")
    region = tuple(int(math.ceil(float(shared_region) * c)) for c in crop)
    return patch, crop, region, 1


def _clip_maps(maps: QMRIMaps, mask: torch.Tensor | None, clip: tuple[float, float] | None) -> QMRIMaps:
    """The maps clamped to their ``clip`` percentiles inside the brain region, background kept (as
    :class:`ContrastiveViewsd` does on every call; here once per subject, before the cache)."""
    if clip is None:
        return maps
    region = brain_region(maps.pd, mask)
    low, high = clip

    def one(m: torch.Tensor) -> torch.Tensor:
        values = plain(m)
        inside = region.expand_as(values)
        return torch.where(inside, clip_to_percentiles(values, low, high, inside), values)

    return maps.map(one)


class PrepareViewSourced(MapTransform):
    """Deterministic per-subject preparation for the batched path (``CacheDataset`` caches its output).

    Reads the qMRI maps (or, in ``base`` mode with ``mprage_key`` present, the real MPRAGE), clamps each map to
    its ``clip_maps`` percentiles inside the brain (as :class:`ContrastiveViewsd`), stacks them into one
    ``(5, X, Y, Z)`` tensor at ``view_source`` (PD, R1, R2*, MT, R2; R2 is R2* where there is no R2 map), and
    takes the brain sample: ``sample_voxels`` voxels spread evenly over the brain voxels (``mask > 0``, else
    PD > 0) of the volume's ~64^3 strided grid (the per-sample path's subsample), with their coordinates. The
    input volumes are removed.

    Args:
        mode, map_keys, qmri_key, r2_key, mprage_key, mask_key, clip_maps: as in :class:`ContrastiveViewsd`.
        sample_voxels: size of the brain sample.
    """

    def __init__(
        self,
        mode: str = "seqinv",
        map_keys: Sequence[Hashable] = MAP_KEYS,
        qmri_key: Hashable | None = None,
        r2_key: Hashable | None = "r2",
        mprage_key: Hashable | None = None,
        mask_key: Hashable | None = None,
        clip_maps: Sequence[float] | None = (0.5, 99.5),
        sample_voxels: int = 2**15,
    ) -> None:
        keys = [qmri_key] if qmri_key is not None else list(map_keys)
        super().__init__(keys, allow_missing_keys=True)
        self.mode = _check_mode(mode)
        if clip_maps is not None:
            low, high = (float(v) for v in clip_maps)
            if not 0.0 <= low < high <= 100.0:
                raise InputError(f"clip_maps must be two percentiles 0 <= low < high <= 100, got {list(clip_maps)}")
            clip_maps = (low, high)
        self.clip_maps = clip_maps
        self.map_keys = tuple(map_keys)
        self.qmri_key = qmri_key
        self.r2_key = r2_key
        self.mprage_key = mprage_key
        self.mask_key = mask_key
        self.sample_voxels = max(int(sample_voxels), 1)

    def _sample(self, source: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, K)`` values and ``(K, 3)`` voxel coordinates of the brain sample."""
        full = tuple(source.shape[1:])
        s = subsample_stride(full)
        grid = region[0, ::s, ::s, ::s]
        coords = torch.nonzero(grid)
        if coords.shape[0] == 0:  # no brain voxel: every voxel of the grid (as region_percentile's fallback)
            coords = torch.nonzero(torch.ones_like(grid))
        pick = torch.linspace(0, coords.shape[0] - 1, self.sample_voxels, dtype=torch.float64).round().long()
        coords = coords[pick] * s
        values = source[:, coords[:, 0], coords[:, 1], coords[:, 2]]
        return values.float(), coords.float()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        if self.mode == "base" and self.mprage_key is not None and self.mprage_key in d:
            real = d[self.mprage_key]
            real = real if isinstance(real, torch.Tensor) else torch.as_tensor(np.asarray(real))
            if real.ndim != 4 or real.shape[0] != 1:
                raise ValueError(f"{self.mprage_key!r} must be (1, X, Y, Z), got {tuple(real.shape)}")
            source = real.float()
            region = plain(mask) > 0 if mask is not None else plain(real) > 0
            pd_max, is_real = torch.tensor(1.0), torch.tensor(True)
        else:
            loaded = QMRIMaps.from_data(d, self.map_keys, self.qmri_key, self.r2_key)
            maps = _clip_maps(loaded, mask, self.clip_maps)
            pd_max = plain(maps.pd).amax().float()
            if not float(pd_max) > 0:
                raise ValueError("PrepareViewSourced: the PD map has no positive value")
            channels = [
                plain(getattr(maps, n)) if getattr(maps, n) is not None else plain(maps.r2s) for n in MAP_CHANNELS
            ]
            stacked = torch.cat([c.float() for c in channels], dim=0)
            affine = loaded.pd.affine if isinstance(loaded.pd, MetaTensor) else None
            source = stacked if affine is None else MetaTensor(stacked, affine=torch.as_tensor(affine).clone())
            region = brain_region(maps.pd, mask)
            is_real = torch.tensor(False)
        d[SAMPLE], d[POINTS] = self._sample(plain(source), region)
        d[SOURCE] = source
        d[PD_MAX] = pd_max
        d[REAL] = is_real
        d[VOLUME] = torch.tensor(source.shape[1:], dtype=torch.long)
        for key in (*self.keys, self.r2_key, self.mprage_key, self.mask_key):
            if key is not None:
                d.pop(key, None)
        return d


class RandViewRegiond(MapTransform, RandomizableTransform):
    """Cut the region(s) the two views come from, for the batched path (random; per subject, in the workers).

    With ``shared_region`` (default 1.2): one region of ``ceil(shared_region * crop)`` voxels per axis at a random
    place in the volume (cut to the volume where it is smaller, as :class:`ContrastiveViewsd`), where ``crop`` is
    the view's crop (patch plus the augmentation margins). ``None``: two regions, one per view, each of the crop
    size. A region smaller than the patch is zero-padded symmetrically to it (the per-sample crop's padding); then
    every region is zero-padded at its end to the full region size so a batch collates. Outputs ``view_region``
    ``(V, C, *R)`` and its content size, offset in the volume and voxel-to-world affine.

    By default (``copy=False``) a region that needs no padding is a view of the cached volume, not a copy: the
    DataLoader collates a batch in the worker that made its items, so the collation's stack is the only copy and
    only the collated batch crosses to the main process. ``copy=True`` makes each region a compact tensor of its
    own, for pipelines that send single items across processes (a view would share the whole volume's storage).
    """

    def __init__(
        self,
        patch_size: Sequence[int] | int = (96, 96, 96),
        augment: Mapping[str, Any] | None = None,
        shared_region: float | None = 1.2,
        copy: bool = False,
    ) -> None:
        MapTransform.__init__(self, [SOURCE])
        RandomizableTransform.__init__(self, prob=1.0)
        self.patch, self.crop, self.region, self.count = _region_edges(patch_size, augment, shared_region)
        self.copy = bool(copy)
        self._starts: list[list[int]] = []

    def randomize(self, data: Sequence[int] | None = None) -> None:
        super().randomize(None)
        shape = tuple(int(s) for s in (data or ()))
        self._starts = [
            [int(self.R.randint(0, n - r + 1)) if n > r else 0 for n, r in zip(shape, self.region, strict=True)]
            for _ in range(self.count)
        ]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = d.pop(SOURCE)
        shape = tuple(int(s) for s in source.shape[1:])
        self.randomize(shape)
        values = plain(source)
        base = (
            torch.as_tensor(source.affine, dtype=torch.float64)
            if isinstance(source, MetaTensor)
            else torch.eye(4, dtype=torch.float64)
        )
        regions, sizes, offsets, affines = [], [], [], []
        for start in self._starts:
            cut, size, offset = [], [], []
            for n, r, p, st in zip(shape, self.region, self.patch, start, strict=True):
                extent = min(r, n)
                before = max(p - extent, 0) // 2  # SpatialPadd's symmetric padding to the patch
                cut.append((st, st + extent, before))
                size.append(max(extent, p))
                offset.append(st - before)
            src = values[(slice(None), *(slice(a, b) for a, b, _ in cut))]
            if tuple(src.shape[1:]) == self.region:  # the whole region lies in the volume: no padding
                out = src.clone(memory_format=torch.contiguous_format) if self.copy else src
            else:
                out = values.new_zeros((values.shape[0], *self.region))
                out[(slice(None), *(slice(pad, pad + b - a) for a, b, pad in cut))] = src
            shift = torch.eye(4, dtype=torch.float64)
            shift[:3, 3] = torch.tensor(offset, dtype=torch.float64)
            regions.append(out)
            sizes.append(size)
            offsets.append(offset)
            affines.append(base @ shift)
        d[REGION] = torch.stack(regions) if self.copy or len(regions) > 1 else regions[0][None]
        d[REGION_SIZE] = torch.tensor(sizes, dtype=torch.long)
        d[REGION_OFFSET] = torch.tensor(offsets, dtype=torch.long)
        d[REGION_AFFINE] = torch.stack(affines)
        return d


def _put_rows(dst: torch.Tensor, rows: list[int], src: torch.Tensor) -> None:
    """``dst[rows] = src`` (a slice for consecutive rows; the index moved without blocking on a GPU)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        dst[rows[0] : rows[0] + len(rows)] = src
    else:
        dst.index_copy_(0, to_device(torch.tensor(rows), dst.device), src.to(dst.dtype))


def _distinct_pairs(count: int, n_names: int, g: torch.Generator) -> torch.Tensor:
    """``(count, 2)`` indices of two different names, uniform over ordered pairs (a random permutation's first two)."""
    return torch.rand((count, n_names), generator=g).argsort(dim=1)[:, :2]


class BatchedContrastiveViews:
    """Two views of every subject of a batch, made with batched torch operations on the batch's device.

    Input: a collated batch of :class:`PrepareViewSourced` + :class:`RandViewRegiond` outputs. Output: the batch
    without those keys, plus the per-sample path's outputs: ``view_keys`` / ``recon_keys`` ``(B, 1, *patch)``
    float32 on ``device``, ``f"{view_key}_affine"`` ``(B, 4, 4)`` float64 (CPU; view voxel -> the volume's world
    or voxel coordinates) and ``f"{view_key}_sequence"`` records in collated form. Runs under ``torch.no_grad``.

    Args: as :class:`ContrastiveViewsd` (``mode``, ``sequences``, ``preset``, ``b1_field``, ``b1_degree``,
    ``patch_size``, ``augment``, ``percentile``, ``max_tries``, ``empty_threshold``, ``shared_region``,
    ``view_norm``, ``zscore``, ``view_keys``, ``recon_keys``), and

        seed: seed of the generator of every random choice (``None``: drawn from torch's global generator on first
            use, plus the process's distributed rank; in a DataLoader worker from the worker's torch seed).
            Parameters come from a CPU generator (the same for a seed on any device); the noise fields from a
            generator on the device seeded from it.
        chunk_views: views processed together (memory bound); ``None``: all at once on a GPU, one by one on the CPU
            (where batching saves nothing and one view's crop is read without a copy).
    """

    def __init__(
        self,
        mode: str = "seqinv",
        sequences: Sequence[str] = SEQUENCES,
        preset: str = "paper",
        b1_field: float = 0.1,
        b1_degree: int = 2,
        patch_size: Sequence[int] | int = (96, 96, 96),
        augment: Mapping[str, Any] | None = None,
        percentile: float = 99.5,
        max_tries: int = 10,
        empty_threshold: float = 1e-6,
        shared_region: float | None = 1.2,
        view_norm: str = "histeq",
        zscore: bool = True,
        view_keys: Sequence[Hashable] = ("image1", "image2"),
        recon_keys: Sequence[Hashable] = ("image1_recon", "image2_recon"),
        seed: int | None = None,
        chunk_views: int | None = None,
    ) -> None:
        self.mode = _check_mode(mode)
        if view_norm not in VIEW_NORMS:
            raise InputError(f"view_norm must be one of {VIEW_NORMS}, got {view_norm!r}")
        self.sequences = tuple(dict.fromkeys(_check_names(sequences))) if mode == "seqinv" else _check_names(sequences)
        if mode == "seqinv" and len(self.sequences) < 2:
            raise ValueError(f"seqinv needs at least two sequence types, got {list(sequences)}")
        _check_preset(preset)
        self.preset = preset
        self.b1_field = float(b1_field)
        self.b1_degree = int(b1_degree)
        self.settings = augment_settings(augment)
        self.patch, self.crop, self.region, self.region_count = _region_edges(patch_size, augment, shared_region)
        self.percentile = float(percentile)
        self.max_tries = max(int(max_tries), 1)
        self.empty_threshold = float(empty_threshold)
        self.view_norm = view_norm
        self.zscore = bool(zscore)
        if len(view_keys) != 2 or len(recon_keys) != 2:
            raise ValueError("view_keys and recon_keys must each name two outputs")
        self.view_keys = tuple(view_keys)
        self.recon_keys = tuple(recon_keys)
        self.chunk_views = None if chunk_views is None else max(int(chunk_views), 1)
        self._seed = seed
        self._generator: torch.Generator | None = None
        self._owner: int | None = None
        self.stage_seconds: dict[str, float] | None = None  # a dict: per-stage seconds, synchronised (profiling)
        self._lap_start = 0.0

    # -- randomness ------------------------------------------------------------------------------------------
    def set_random_state(self, seed: int | None = None) -> BatchedContrastiveViews:
        """Reseed (``None``: draw the seed again on the next call)."""
        self._seed = seed
        self._generator = None
        return self

    def __getstate__(self) -> dict[str, Any]:  # torch.Generator does not pickle (spawned loader workers)
        state = dict(self.__dict__)
        state["_generator"], state["_owner"] = None, None
        return state

    def generator(self) -> torch.Generator:
        """The CPU generator of this process (reseeded in each new DataLoader worker process)."""
        pid = os.getpid()
        if self._generator is None or self._owner != pid:
            info = torch.utils.data.get_worker_info()
            if info is not None:  # a loader worker: its own stream, new every epoch (the worker's torch seed)
                seed = (torch.initial_seed() + (self._seed or 0)) % 2**63
            elif self._seed is not None:
                seed = int(self._seed)
            else:
                seed = int(torch.randint(0, 2**62, (1,)).item())
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    seed += 1_000_003 * torch.distributed.get_rank()
            self._generator = torch.Generator().manual_seed(seed)
            self._owner = pid
        return self._generator

    # -- protocols -------------------------------------------------------------------------------------------
    def _first_names(self, slots: int, subjects: int, g: torch.Generator) -> list[str]:
        if self.mode == "base":
            return ["mprage"] * slots
        if self.mode == "seqaug":
            return [self.sequences[int(i)] for i in torch.randint(len(self.sequences), (slots,), generator=g)]
        pairs = _distinct_pairs(subjects, len(self.sequences), g)  # slot v * B + b: view v of subject b
        return [self.sequences[int(pairs[s % subjects, s // subjects])] for s in range(slots)]

    def _simulate_sample(
        self,
        protocols: ProtocolBatch,
        entries: list[int],
        rows: list[int],
        sample: torch.Tensor,
        b1: torch.Tensor | None,
    ) -> torch.Tensor:
        """Images ``(len(entries), K)`` of the protocols ``entries`` on the brain samples ``sample[rows]``."""
        out = sample.new_empty((len(entries), sample.shape[-1]))
        for name in dict.fromkeys(protocols.names[e] for e in entries):
            at = [i for i, e in enumerate(entries) if protocols.names[e] == name]
            index = to_device(torch.tensor([rows[i] for i in at]), sample.device)
            maps = {c: sample[index, MAP_CHANNELS.index(c)].unsqueeze(1) for c in SEQUENCE_CHANNELS[name]}
            params = protocols.family_params([entries[i] for i in at], sample.device, sample.dtype)
            field = 1.0 if b1 is None else b1[index].unsqueeze(1)
            _put_rows(out, at, simulate_family(name, params, maps, field).squeeze(1))
        return out

    def _protocols(
        self,
        count: int,
        subjects: int,
        sample: torch.Tensor,
        b1: torch.Tensor | None,
        pd_max: torch.Tensor,
        g: torch.Generator,
    ) -> tuple[ProtocolBatch, torch.Tensor]:
        """A protocol for every slot whose image is not empty, and each slot's image of its brain sample.

        ``max_tries`` candidate protocols of the slot's sequence type are drawn per slot up front and the first
        non-empty one is kept: the law of the per-sample path's redraws. On a GPU every candidate is simulated in
        one pass (one synchronisation); on the CPU only as many as needed, in turn. Both consume the generator
        alike, so a seed gives the same protocols on either. Slots whose candidates are all empty fall back to
        the clinical preset (with a warning), as in the per-sample path.
        """
        tries = self.max_tries
        candidates = ProtocolBatch.empty(count * tries, self.preset)  # candidate t of slot s: entry t * count + s
        candidates.draw(range(count * tries), self._first_names(count, subjects, g) * tries, self.preset, g)
        limit = self.empty_threshold * pd_max.double()
        chosen: list[int | None] = [None] * count
        images = sample.new_empty((count, sample.shape[-1]))
        pending = list(range(count))
        rounds = [list(range(tries))] if sample.device.type == "cuda" else [[t] for t in range(tries)]
        for round_ in rounds:
            entries = [t * count + s for t in round_ for s in pending]
            rows = [e % count for e in entries]
            simulated = self._simulate_sample(candidates, entries, rows, sample, b1)
            peaks = simulated.amax(dim=1).double().cpu()
            for i, e in enumerate(entries):
                s = e % count
                peak = float(peaks[i])
                if chosen[s] is None and math.isfinite(peak) and peak > float(limit[s]):
                    chosen[s] = e
                    images[s] = simulated[i]
            pending = [s for s in pending if chosen[s] is None]
            if not pending:
                break
        protocols = candidates.subset([c if c is not None else (tries - 1) * count + s for s, c in enumerate(chosen)])
        if pending:
            fallback = self.preset != "clinical"
            names = sorted({protocols.names[s] for s in pending})
            warnings.warn(
                f"{self.max_tries} {self.preset!r} {'/'.join(names)} protocols gave empty images"
                + ("; using the clinical preset" if fallback else " (check the qMRI maps and their units)"),
                RuntimeWarning,
                stacklevel=3,
            )
            if fallback:
                protocols.draw(pending, [protocols.names[s] for s in pending], "clinical", g)
            _put_rows(images, pending, self._simulate_sample(protocols, pending, pending, sample, b1))
        return protocols, images

    # -- one batch -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, batch: Mapping[Hashable, Any], device: torch.device | str | None = None) -> dict[Hashable, Any]:
        d = dict(batch)
        missing = [k for k in BATCH_KEYS if k not in d]
        if missing:
            raise KeyError(
                f"batched views: the batch has no {missing}; the loader must run PrepareViewSourced and RandViewRegiond"
            )
        region = d.pop(REGION)  # (B, V, C, *R), or a list of B (V, C, *R) tensors
        regions = [plain(r) for r in region] if isinstance(region, (list, tuple)) else plain(region)
        device = torch.device(device) if device is not None else regions[0].device
        copy_stream = None
        if isinstance(regions, list):
            regions = [r.to(device=device, dtype=torch.float32, non_blocking=True) for r in regions]
        else:  # one transfer for the batch (on a side stream, while the protocols are drawn), then views of it
            if device.type == "cuda" and regions.device.type == "cpu":
                copy_stream = torch.cuda.Stream(device)
                copy_stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(copy_stream):
                    moved = regions.to(device=device, dtype=torch.float32, non_blocking=True)
            else:
                moved = regions.to(device=device, dtype=torch.float32, non_blocking=True)
            regions = list(moved.unbind(0))
        sizes = plain(d.pop(REGION_SIZE)).long().cpu()
        offsets = plain(d.pop(REGION_OFFSET)).long().cpu()
        region_affine = plain(d.pop(REGION_AFFINE)).to(torch.float64).cpu()
        sample = plain(d.pop(SAMPLE)).to(device=device, dtype=torch.float32, non_blocking=True)
        points = plain(d.pop(POINTS)).to(device=device, dtype=torch.float32, non_blocking=True)
        pd_max = plain(d.pop(PD_MAX)).float().reshape(-1)
        real = plain(d.pop(REAL)).bool().reshape(-1)
        volume = plain(d.pop(VOLUME)).long().cpu()
        subjects, regions_per_subject = len(regions), regions[0].shape[0]
        if bool(real.any()) and not bool(real.all()):
            raise InputError("a batch mixes subjects with and without a real MPRAGE; give every subject one or none")
        is_real = bool(real.all())
        if tuple(regions[0].shape[2:]) != self.region or regions_per_subject != self.region_count:
            raise ValueError(
                f"batched views: regions {tuple(regions[0].shape)} do not match the settings (expected "
                f"{self.region_count} region(s) of {self.region}); the loader and the generator must share settings"
            )
        g = self.generator()
        if self.stage_seconds is not None:
            self._lap_start = time.perf_counter()
        n_views = 2 * subjects
        n_slots = n_views if self.mode == "seqinv" else subjects
        slot_of_view = [n if self.mode == "seqinv" else n % subjects for n in range(n_views)]
        subject_of_slot = [s % subjects for s in range(n_slots)]

        # protocols, receive fields and intensity scales (one per slot)
        n_terms = len(poly_terms(self.b1_degree))
        b1_coeffs = None
        if not is_real and self.b1_field > 0:
            b1_coeffs = -self.b1_field + 2 * self.b1_field * torch.rand(
                (n_slots, n_terms), generator=g, dtype=torch.float64
            )
        slot_index = to_device(torch.tensor(subject_of_slot), device)
        slot_sample = sample[slot_index]
        if is_real:
            protocols = ProtocolBatch.empty(n_slots, "real")
            sample_images = slot_sample[:, 0]
        else:
            b1_sample = None
            if b1_coeffs is not None:
                log_field = legendre_at_points(b1_coeffs, self.b1_degree, points[slot_index], volume[subject_of_slot])
                b1_sample = torch.exp(log_field)
            protocols, sample_images = self._protocols(
                n_slots, subjects, slot_sample, b1_sample, pd_max[subject_of_slot], g
            )
        scale = None
        if self.view_norm == "robust_max":
            k = min(max(int(math.ceil(self.percentile / 100.0 * sample_images.shape[1])), 1), sample_images.shape[1])
            floor = 1e-12 if is_real else torch.finfo(torch.float32).tiny
            scale = torch.clamp(torch.kthvalue(sample_images.float(), k, dim=1).values, min=floor)

        # each view's window (its crop) in its region
        crop = torch.tensor(self.crop, dtype=torch.long)
        region_of_view = [n // subjects if regions_per_subject == 2 else 0 for n in range(n_views)]
        subject_of_view = [n % subjects for n in range(n_views)]
        content = sizes[subject_of_view, region_of_view]  # (N, 3)
        room = torch.clamp(content - crop, min=0)
        starts = torch.floor(torch.rand((n_views, 3), generator=g, dtype=torch.float64) * (room + 1).double()).long()
        starts = torch.minimum(starts, room)
        valid_len = torch.minimum(content, crop)
        centre_in = (valid_len.double() - 1.0) / 2.0
        window_offset = offsets[subject_of_view, region_of_view] + starts  # volume voxel of window voxel 0
        spatial = sample_spatial(n_views, self.settings, g)
        artefacts = sample_artefacts(n_views, self.settings, self.patch, g)
        noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))

        if copy_stream is not None:  # the regions are needed from here on
            torch.cuda.current_stream(device).wait_stream(copy_stream)
            moved.record_stream(torch.cuda.current_stream(device))
        self._lap("protocols, parameters, region copy", device)
        views = torch.empty((n_views, 1, *self.patch), device=device, dtype=torch.float32)
        targets = torch.empty_like(views)
        chunk = self.chunk_views or (n_views if device.type == "cuda" else 1)
        for first in range(0, n_views, chunk):
            idx = list(range(first, min(first + chunk, n_views)))
            self._lap(None, device)
            image = self._windows(
                idx, regions, starts, subject_of_view, region_of_view, slot_of_view, protocols, b1_coeffs,
                window_offset, volume, is_real,
            )  # fmt: skip
            self._lap("crops and simulation (with B1)", device)
            valid = None
            if bool((valid_len[idx] < crop).any()):
                valid = self._valid_mask(valid_len[idx], device)
            slots = [slot_of_view[n] for n in idx]
            chunk_scale = None if scale is None else scale[to_device(torch.tensor(slots), device)]
            normed = normalise_views(image, self.view_norm, chunk_scale, valid)
            del image
            self._lap("view normalisation", device)
            target = warp(normed, spatial.matrix[idx], centre_in[idx], self.patch)
            del normed
            self._lap("rotation, shear, flips", device)
            # the target is taken after the spatial and before the intensity augmentations (authors' code)
            a = artefacts.select(torch.tensor(idx))
            view = target.clone()
            bias_field_(view, a.bias_coeffs, int(self.settings["bias_degree"]), a.bias_applied)
            self._lap("bias field", device)
            gibbs_ringing_(view, a.gibbs_alpha, a.gibbs_applied)
            self._lap("Gibbs ringing", device)
            rician_(view, a.noise_sigma, a.noise_applied, noise_gen)
            self._lap("Rician noise", device)
            cuboid_dropout_(view, a.boxes_start, a.boxes_end)
            self._lap("cuboid dropout", device)
            if self.zscore:
                zscore_views_(view)
                zscore_views_(target)
            self._lap("z-scoring", device)
            views[idx[0] : idx[-1] + 1] = view
            targets[idx[0] : idx[-1] + 1] = target

        self._lap(None, device)
        to_window = view_to_window(spatial.matrix, centre_in, self.patch)
        shift = torch.eye(4, dtype=torch.float64).repeat(n_views, 1, 1)
        shift[:, :3, 3] = starts.double()
        affines = region_affine[subject_of_view, region_of_view] @ shift @ to_window
        for v, (vkey, rkey) in enumerate(zip(self.view_keys, self.recon_keys, strict=True)):
            part = slice(v * subjects, (v + 1) * subjects)
            d[vkey], d[rkey] = views[part], targets[part]
            d[f"{vkey}_affine"] = affines[part]
            d[f"{vkey}_sequence"] = protocols.record(slot_of_view[part])
        self._lap("affines, records", device)
        return d

    def _lap(self, stage: str | None, device: torch.device) -> None:
        """With ``stage_seconds`` set (a dict; profiling only), add the time since the last lap to ``stage``
        (the device synchronised first); ``None`` restarts the clock."""
        if self.stage_seconds is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if stage is not None:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - self._lap_start
        self._lap_start = now

    def _valid_mask(self, valid_len: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``(n, 1, *crop)`` bool: the voxels of each window inside its crop (the first ``valid_len`` per axis)."""
        axes = [torch.arange(c, device=device) for c in self.crop]
        lengths = to_device(valid_len, device)
        return (
            (axes[0][None, :, None, None] < lengths[:, 0, None, None, None])
            & (axes[1][None, None, :, None] < lengths[:, 1, None, None, None])
            & (axes[2][None, None, None, :] < lengths[:, 2, None, None, None])
        ).unsqueeze(1)

    def _windows(
        self,
        idx: list[int],
        regions: list[torch.Tensor],
        starts: torch.Tensor,
        subject_of_view: list[int],
        region_of_view: list[int],
        slot_of_view: list[int],
        protocols: ProtocolBatch,
        b1_coeffs: torch.Tensor | None,
        window_offset: torch.Tensor,
        volume: torch.Tensor,
        is_real: bool,
    ) -> torch.Tensor:
        """The simulated crops ``(len(idx), 1, *crop)`` of views ``idx`` (the real image's crops when real)."""

        def cut(n: int, channel: int) -> torch.Tensor:
            s = [int(v) for v in starts[n]]
            box = tuple(slice(a, a + c) for a, c in zip(s, self.crop, strict=True))
            return regions[subject_of_view[n]][(region_of_view[n], channel, *box)]

        if is_real:
            return torch.stack([cut(n, 0) for n in idx]).unsqueeze(1)
        device = regions[0].device
        image = regions[0].new_empty((len(idx), 1, *self.crop))
        for name in dict.fromkeys(protocols.names[slot_of_view[n]] for n in idx):
            rows = [i for i, n in enumerate(idx) if protocols.names[slot_of_view[n]] == name]
            views = [idx[i] for i in rows]
            maps = {  # one view: its crop is read in place; several: stacked into one batch
                c: (
                    cut(views[0], MAP_CHANNELS.index(c))[None, None]
                    if len(views) == 1
                    else torch.stack([cut(n, MAP_CHANNELS.index(c)) for n in views]).unsqueeze(1)
                )
                for c in SEQUENCE_CHANNELS[name]
            }
            field: torch.Tensor | float = 1.0
            if b1_coeffs is not None:
                coeffs = b1_coeffs[[slot_of_view[n] for n in views]]
                log_field = legendre_fields(
                    coeffs,
                    self.b1_degree,
                    self.crop,
                    offsets=window_offset[views],
                    full_shapes=volume[[subject_of_view[n] for n in views]],
                    device=device,
                )
                field = torch.exp_(log_field).unsqueeze(1)
            params = protocols.family_params([slot_of_view[n] for n in views], device, torch.float32)
            _put_rows(image, rows, simulate_family(name, params, maps, field))
        return image


def collate_regions(items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
    """MONAI's ``list_data_collate`` of :class:`RandViewRegiond` outputs, after checking that the subjects agree on
    the source (all qMRI maps or all real MPRAGE images), which the stacking of their regions needs."""
    kinds = {bool(item[REAL]) for item in items if REAL in item}
    if len(kinds) > 1:
        raise InputError("a batch mixes subjects with and without a real MPRAGE; give every subject one or none")
    return list_data_collate(items)


class BatchedViewsCollate:
    """DataLoader ``collate_fn`` of the ``batched_workers`` path: MONAI's collation, then the batched views on the
    CPU (in the loader worker that made the batch)."""

    def __init__(self, views: BatchedContrastiveViews) -> None:
        self.views = views

    def __call__(self, items: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
        regions = [item[REGION] for item in items]  # left a list: the views read their crops from each region
        batch = collate_regions([{k: v for k, v in item.items() if k != REGION} for item in items])
        batch[REGION] = regions
        return self.views(batch, device=torch.device("cpu"))


#: ContrastiveViewsd's settings (name -> default) that ContrastiveViewStage accepts (all but ``keep_inputs``).
_VIEW_SETTINGS: dict[str, Any] = {
    name: param.default
    for name, param in inspect.signature(ContrastiveViewsd.__init__).parameters.items()
    if name not in ("self", "keep_inputs")
}
#: The settings the batch call (:class:`BatchedContrastiveViews`) takes; the rest go to the loader transforms.
_BATCHED_SETTINGS = (
    "mode", "sequences", "preset", "b1_field", "b1_degree", "patch_size", "augment", "percentile", "max_tries",
    "empty_threshold", "shared_region", "view_norm", "zscore", "view_keys", "recon_keys",
)  # fmt: skip


class ContrastiveViewStage:
    """The view settings of the bundle, and the loader transforms and batch call of the chosen ``path``.

    Attributes:
        worker_transforms: transforms to append to the loading transforms (per subject, in the loader workers).
        collate_fn: the DataLoader's collate function.
        batch_views: the trainer's per-batch call (``batched``), else ``None``.
        views: the :class:`BatchedContrastiveViews` of the batched paths (``None`` for ``per_sample``).

    Args:
        path: one of :data:`VIEW_PATHS`.
        sample_voxels: brain-sample size of the batched paths (:class:`PrepareViewSourced`).
        chunk_views, seed: of :class:`BatchedContrastiveViews`.
        everything else: :class:`ContrastiveViewsd`'s arguments (both paths read the same settings).
    """

    def __init__(
        self,
        path: str = "per_sample",
        *,
        sample_voxels: int = 2**15,
        chunk_views: int | None = None,
        seed: int | None = None,
        **settings: Any,
    ) -> None:
        # The view settings are ContrastiveViewsd's own keyword arguments, taken by name (with its defaults) rather
        # than repeated here, so the two paths cannot drift apart in names or defaults.
        if path not in VIEW_PATHS:
            raise InputError(f"view_path must be one of {VIEW_PATHS}, got {path!r}")
        unknown = sorted(set(settings) - set(_VIEW_SETTINGS))
        if unknown:
            raise InputError(f"unknown view setting(s) {unknown}; known: {', '.join(_VIEW_SETTINGS)}")
        given = {**_VIEW_SETTINGS, **settings}
        self.path = path
        common = {key: given[key] for key in _BATCHED_SETTINGS}
        inputs = {key: given[key] for key in ("map_keys", "qmri_key", "r2_key", "mprage_key")}
        mode, mask_key, clip_maps = given["mode"], given["mask_key"], given["clip_maps"]
        patch_size, augment, shared_region = given["patch_size"], given["augment"], given["shared_region"]
        self.views: BatchedContrastiveViews | None = None
        self.batch_views: BatchedContrastiveViews | None = None
        self.collate_fn: Any = list_data_collate
        if path == "per_sample":
            self.worker_transforms: list[Any] = [
                ContrastiveViewsd(**common, **inputs, mask_key=mask_key, clip_maps=clip_maps)
            ]
            return
        self.views = BatchedContrastiveViews(**common, seed=seed, chunk_views=chunk_views)
        self.worker_transforms = [
            PrepareViewSourced(
                mode=mode, **inputs, mask_key=mask_key, clip_maps=clip_maps, sample_voxels=sample_voxels
            ),
            RandViewRegiond(patch_size=patch_size, augment=augment, shared_region=shared_region),
        ]
        if path == "batched":
            self.batch_views = self.views
            self.collate_fn = collate_regions
        else:
            self.collate_fn = BatchedViewsCollate(self.views)

"""Contrastive views: two augmented views of one subject and their clean reconstruction targets.

:class:`ContrastiveViewsd` makes them for the three pretraining strategies of the paper (Sec. 3.1 and 4.1):
``base`` (MPRAGE), ``seqaug`` (one sequence, two augmentations) and ``seqinv`` (two different sequence types),
simulating each view's crop from the qMRI maps (:mod:`custom.transforms.simulation`) and augmenting it with
:func:`custom.transforms.augmentations.mri_augmentations`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, RandSpatialCropd
from monai.utils import MAX_SEED, ensure_tuple_rep

from custom.errors import InputError
from custom.fields import poly_terms, polynomial_log_field, region_percentile, subsample_stride
from custom.intensity import VIEW_NORMS, clip_to_percentiles, normalise_view, zscore
from custom.sequences import SEQUENCES, SequenceSample, sample_distinct_sequences, sample_sequence
from custom.transforms._common import (
    SEED_HIGH,
    as_meta,
    brain_region,
    like,
    plain,
    torch_generator,
    view_affine,
    voxel_offset,
)
from custom.transforms.augmentations import crop_margins, mri_augmentations
from custom.transforms.records import _draw_protocol, sequence_record
from custom.transforms.simulation import MAP_KEYS, QMRIMaps

__all__ = ["ContrastiveViewsd"]

_IMAGE = "image"  # internal key of the image in the augmentation stages
_MODES = ("base", "seqaug", "seqinv")


@dataclass
class _Source:
    """What one view is made from: a protocol (simulated) or None (a real image), its B1 coefficients and the
    intensity scale (the full volume's 99.5th percentile inside the brain)."""

    sample: SequenceSample | None
    b1_coeffs: list[float] | None
    scale: torch.Tensor


class ContrastiveViewsd(MapTransform, RandomizableTransform):
    """Two augmented views and their clean reconstruction targets for contrastive pretraining (Sec. 3.1, 4.1).

    Modes:
        * ``"base"``: both views from MPRAGE: the real image at ``mprage_key`` when that key is given and in
          the data, else an MPRAGE simulated from the maps with a sampled protocol (one protocol for both
          views).
        * ``"seqaug"``: both views from one sampled sequence and protocol (the same simulated image; the views
          differ by their augmentations).
        * ``"seqinv"``: the views from two different sequence types
          (:func:`custom.sequences.sample_distinct_sequences`), one per view.

    Per view: the random crop (patch + margin) is applied to the qMRI maps, the crop is simulated (voxel-wise,
    with a receive field B1 defined over the whole volume, so a crop of one simulated image equals the
    simulation of the crop), divided by the full volume's 99.5th percentile inside the brain (estimated on a
    regular subsample of ~64^3 voxels), rotated/sheared/flipped to the patch size: that is the clean target
    ``{view}_recon``; the view itself is the target plus bias field, Gibbs ringing, Rician noise and cuboid
    dropout. Both views are cropped inside one random region of ``shared_region`` times the crop size per axis
    (the authors' pipeline crops 1.2x the patch before simulating both views), so the two views overlap and
    show largely the same anatomy; inside it each view gets its own crop and augmentations. Protocols whose
    image would be empty are redrawn (same sequence type; see :func:`_draw_protocol`).

    Outputs: ``view_keys`` (default ``image1``, ``image2``), ``recon_keys`` (default ``image1_recon``,
    ``image2_recon``), each ``(1, *patch_size)`` float32 on the input's device, ``f"{view_key}_affine"``
    (``(4, 4)`` float64: the view's voxel coordinates to the subject volume's voxel coordinates, for
    :mod:`custom.dense`), and ``f"{view_key}_sequence"`` records (:func:`sequence_record`; also in each view's
    ``meta["sequence"]``).

    Args:
        mode: ``"base"``, ``"seqaug"`` or ``"seqinv"``.
        map_keys, qmri_key, r2_key: the qMRI maps, as in :class:`RandSimulateSequenced`.
        mprage_key: optional key of a real MPRAGE image ``(1, X, Y, Z)`` (used in ``base`` mode when present).
        mask_key: optional brain mask (``> 0``) for the intensity scale; default the PD > 0 (or image > 0)
            voxels.
        view_keys, recon_keys: output keys.
        sequences: sequence types for ``seqaug`` / ``seqinv`` (``seqinv`` needs at least two).
        preset: ``"paper"`` or ``"clinical"`` protocol distributions.
        b1_field, b1_degree: receive field of the simulation (as in :class:`RandSimulateSequenced`);
            ``seqinv`` draws one field per view (two acquisitions), the other modes one field for both views.
        patch_size: spatial size of the views (paper: 96^3).
        augment: keyword arguments of :func:`mri_augmentations` (ranges, probabilities, margin), e.g.
            ``{"rotate_deg": 10.0, "gibbs_prob": 0.5}``.
        keep_inputs: keep the input volumes (maps, MPRAGE, mask) in the output dict; by default they are
            removed so a DataLoader does not collate full volumes that the training step does not use.
        percentile, max_tries, empty_threshold: as in :class:`RandSimulateSequenced`.
        shared_region: edge of the region both views are cropped from, as a multiple (>= 1) of the view crop
            (patch plus margins); ``None`` crops each view anywhere in the volume (then two views of one subject
            need not overlap at all, and NT-Xent finds little to match on).
        clip_maps: ``(low, high)`` percentiles; each qMRI map is clamped to them inside the brain region before
            simulation (authors' code: 0.5 / 99.5), so outlier voxels do not set a view's intensity range;
            ``None`` leaves the maps as they are.
        view_norm: ``"histeq"`` (authors' pipeline, :func:`custom.intensity.normalise_view`): each view's
            simulated crop is rescaled by its own 0.5th / 95th percentiles to [0, 1] and histogram-equalised,
            before the spatial augmentations; ``"robust_max"``: divided by the whole volume's 99.5th percentile
            inside the brain (this project's earlier pipeline).
        zscore: z-score each view AND its reconstruction target after the augmentations (authors' code), so the
            network input and the L1 target have zero mean and unit variance per view.
    """

    def __init__(
        self,
        mode: str = "seqinv",
        map_keys: Sequence[Hashable] = MAP_KEYS,
        qmri_key: Hashable | None = None,
        r2_key: Hashable | None = "r2",
        mprage_key: Hashable | None = None,
        mask_key: Hashable | None = None,
        view_keys: Sequence[Hashable] = ("image1", "image2"),
        recon_keys: Sequence[Hashable] = ("image1_recon", "image2_recon"),
        sequences: Sequence[str] = SEQUENCES,
        preset: str = "paper",
        b1_field: float = 0.1,
        b1_degree: int = 2,
        patch_size: Sequence[int] | int = (96, 96, 96),
        augment: Mapping[str, Any] | None = None,
        keep_inputs: bool = False,
        percentile: float = 99.5,
        max_tries: int = 10,
        empty_threshold: float = 1e-6,
        shared_region: float | None = 1.2,
        clip_maps: Sequence[float] | None = (0.5, 99.5),
        view_norm: str = "histeq",
        zscore: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
        if view_norm not in VIEW_NORMS:
            raise InputError(f"view_norm must be one of {VIEW_NORMS}, got {view_norm!r}")
        if clip_maps is not None:
            low, high = (float(v) for v in clip_maps)
            if not 0.0 <= low < high <= 100.0:
                raise InputError(f"clip_maps must be two percentiles 0 <= low < high <= 100, got {list(clip_maps)}")
            clip_maps = (low, high)
        self.clip_maps = clip_maps
        self.view_norm = view_norm
        self.zscore = bool(zscore)
        keys = [qmri_key] if qmri_key is not None else list(map_keys)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob=1.0)
        self.mode = mode
        self.map_keys = tuple(map_keys)
        self.qmri_key = qmri_key
        self.r2_key = r2_key
        self.mprage_key = mprage_key
        self.mask_key = mask_key
        if len(view_keys) != 2 or len(recon_keys) != 2:
            raise ValueError("view_keys and recon_keys must each name two outputs")
        self.view_keys = tuple(view_keys)
        self.recon_keys = tuple(recon_keys)
        # seqinv needs distinct types; duplicates would let both views draw the same type
        self.sequences = tuple(dict.fromkeys(sequences)) if mode == "seqinv" else tuple(sequences)
        if mode == "seqinv" and len(self.sequences) < 2:
            raise ValueError(f"seqinv needs at least two sequence types, got {list(sequences)}")
        self.preset = preset
        self.b1_field = float(b1_field)
        self.b1_degree = int(b1_degree)
        self.patch_size = tuple(int(p) for p in ensure_tuple_rep(patch_size, 3))
        self.keep_inputs = keep_inputs
        self.percentile = percentile
        self.max_tries = max(int(max_tries), 1)
        self.empty_threshold = float(empty_threshold)
        sample_sequence(self.sequences[0], preset=preset, generator=0)  # validates preset and names early
        aug_kwargs = dict(augment or {})
        for forbidden in ("keys", "label_keys", "crop_keys", "patch_size"):
            if forbidden in aug_kwargs:
                raise ValueError(f"augment must not set {forbidden!r}; ContrastiveViewsd sets it")
        crop_keys = (*QMRIMaps.NAMES, _IMAGE)
        self.augment = mri_augmentations((_IMAGE,), self.patch_size, crop_keys=crop_keys, **aug_kwargs)
        self.region_crop: RandSpatialCropd | None = None
        if shared_region is not None:
            if not float(shared_region) >= 1.0:
                raise ValueError(
                    f"shared_region must be >= 1 (a multiple of the view crop) or None, got {shared_region}"
                )
            margins = crop_margins(self.patch_size, aug_kwargs.get("margin"))  # the margins of self.augment's crop
            region = [
                int(math.ceil(float(shared_region) * (p + 2 * m)))
                for p, m in zip(self.patch_size, margins, strict=True)
            ]
            # a region larger than the volume is cut to the volume (MONAI's crop), the view crop then pads
            self.region_crop = RandSpatialCropd(crop_keys, roi_size=region, random_size=False, allow_missing_keys=True)
        self._seq_seed = 0
        self._b1_sets: list[list[float] | None] = [None, None]

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ContrastiveViewsd:
        super().set_random_state(seed=seed, state=state)
        self.augment.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        if self.region_crop is not None:
            self.region_crop.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw the protocol seed and the two B1 coefficient sets from ``self.R``."""
        super().randomize(None)
        self._seq_seed = int(self.R.randint(SEED_HIGH))
        n_terms = len(poly_terms(self.b1_degree))
        self._b1_sets = [
            [float(c) for c in self.R.uniform(-self.b1_field, self.b1_field, n_terms)] if self.b1_field > 0 else None
            for _ in range(2)
        ]

    # -- sources ---------------------------------------------------------------------------------------------
    def _b1_field(self, coeffs: list[float] | None, shape: Sequence[int], ref: torch.Tensor, **kw: Any) -> Any:
        if coeffs is None:
            return 1.0
        field = polynomial_log_field(coeffs, shape, degree=self.b1_degree, device=ref.device, dtype=ref.dtype, **kw)
        return torch.exp(field).unsqueeze(0)

    def _simulated_sources(self, maps: QMRIMaps, mask: torch.Tensor | None) -> list[_Source]:
        full = maps.spatial_shape
        s = subsample_stride(full)
        sub = maps.map(lambda t: plain(t)[:, ::s, ::s, ::s])
        region = brain_region(maps.pd, mask)[:, ::s, ::s, ::s]
        pd_max = float(plain(maps.pd).amax())
        if not pd_max > 0:
            raise ValueError("ContrastiveViewsd: the PD map has no positive value")
        g = torch_generator(self._seq_seed, torch.device("cpu"))
        firsts: list[SequenceSample | None]
        if self.mode == "base":
            firsts = [sample_sequence("mprage", preset=self.preset, generator=g)]
        elif self.mode == "seqaug":
            firsts = [None]
        else:
            firsts = list(sample_distinct_sequences(2, preset=self.preset, sequences=self.sequences, generator=g))
        sources = []
        for i, first in enumerate(firsts):
            coeffs = self._b1_sets[i]
            b1 = self._b1_field(coeffs, sub.spatial_shape, sub.pd, stride=s, full_shape=full)
            sample, image = _draw_protocol(
                lambda smp, b1=b1: sub.simulate(smp, b1),
                first=first,
                preset=self.preset,
                sequences=self.sequences,
                generator=g,
                pd_max=pd_max,
                max_tries=self.max_tries,
                threshold=self.empty_threshold,
            )
            scale = torch.clamp(region_percentile(image, region, self.percentile), min=torch.finfo(image.dtype).tiny)
            sources.append(_Source(sample, coeffs, scale))
        return sources if len(sources) == 2 else sources * 2

    def _real_source(self, image: torch.Tensor, mask: torch.Tensor | None) -> list[_Source]:
        s = subsample_stride(image.shape[1:])
        img = plain(image)
        region = (plain(mask) > 0 if mask is not None else img > 0)[:, ::s, ::s, ::s]
        scale = torch.clamp(region_percentile(img[:, ::s, ::s, ::s], region, self.percentile), min=1e-12)
        return [_Source(None, None, scale)] * 2

    # -- one view --------------------------------------------------------------------------------------------
    def _view(
        self, src: _Source, region: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], full: tuple[int, ...]
    ) -> tuple[Any, Any]:
        """One view and its clean target, cropped from ``region`` (``inputs`` is the whole volume)."""
        cropped = self.augment.crop(dict(region))
        if src.sample is None:
            ref = cropped[_IMAGE]
            image = plain(ref).float()
        else:
            maps = QMRIMaps.from_dict({k: cropped[k] for k in QMRIMaps.NAMES if k in cropped})
            ref = maps.pd
            offset = voxel_offset(inputs["pd"], ref)
            kw: dict[str, Any] = {"offset": offset, "full_shape": full} if offset is not None else {}
            b1 = self._b1_field(src.b1_coeffs, maps.spatial_shape, plain(ref), **kw)
            image = maps.simulate(src.sample, b1)
        clean = normalise_view(image, self.view_norm, src.scale)
        # the target is taken after the spatial and before the intensity augmentations (authors' code)
        target = self.augment.spatial({_IMAGE: like(clean.float(), ref)})[_IMAGE]
        view = self.augment.artefacts({_IMAGE: target})[_IMAGE]
        if view is target:  # every artefact skipped: keep the two outputs distinct tensors
            view = target.clone()
        if self.zscore:
            view, target = (like(zscore(t), t) for t in (view, target))
        return view, target

    def _clipped(self, maps: QMRIMaps, mask: torch.Tensor | None) -> QMRIMaps:
        """The maps clamped to their ``clip_maps`` percentiles inside the brain region (background kept)."""
        if self.clip_maps is None:
            return maps
        region = brain_region(maps.pd, mask)
        low, high = self.clip_maps

        def clip(m: torch.Tensor) -> torch.Tensor:
            values = plain(m)
            inside = region.expand_as(values)
            return like(torch.where(inside, clip_to_percentiles(values, low, high, inside), values), m)

        return maps.map(clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        use_real = self.mode == "base" and self.mprage_key is not None and self.mprage_key in d
        if use_real:
            real = d[self.mprage_key]
            real = real if isinstance(real, torch.Tensor) else torch.as_tensor(np.asarray(real))
            if real.ndim != 4 or real.shape[0] != 1:
                raise ValueError(f"{self.mprage_key!r} must be (1, X, Y, Z), got {tuple(real.shape)}")
            sources = self._real_source(real, mask)
            inputs = {_IMAGE: as_meta(real)}
            full = tuple(real.shape[1:])
        else:
            maps = self._clipped(QMRIMaps.from_data(d, self.map_keys, self.qmri_key, self.r2_key), mask)
            sources = self._simulated_sources(maps, mask)
            inputs = {k: as_meta(v) for k, v in maps.as_dict().items()}
            full = maps.spatial_shape
        region = self.region_crop(dict(inputs)) if self.region_crop is not None else inputs
        for src, vkey, rkey in zip(sources, self.view_keys, self.recon_keys, strict=True):
            view, target = self._view(src, region, inputs, full)
            record = sequence_record(src.sample)
            for t in (view, target):
                if isinstance(t, MetaTensor):
                    t.meta["sequence"] = dict(record)
            d[vkey], d[rkey] = view, target
            d[f"{vkey}_sequence"] = record
            # voxel-to-volume affine of the view (crop, rotation, shear, flips), for the dense term's correspondence
            d[f"{vkey}_affine"] = view_affine(view)
        if not self.keep_inputs:
            for key in (*self.keys, self.r2_key, self.mprage_key, self.mask_key):
                if key is not None:
                    d.pop(key, None)
        return d

"""The image preprocessing shared by the downstream bundles' training, evaluation and inference configs.

:func:`image_preprocessing` builds one MONAI ``Compose``: load a NIfTI file (``NibabelReader``, channel first,
metadata kept in the ``MetaTensor``), cast to float32, reorient to RAS, resample to ``pixdim`` (bilinear for
images, nearest for labels and masks) and normalise the image intensities. Training configs append their crops
and augmentations after it; evaluation and inference use it as is, so every stage sees the same input.

Intensity normalisation is an affine map ``y = (x - offset) / scale`` applied to every voxel, with ``offset``
and ``scale`` estimated on a region (the voxels of ``mask_key`` > 0 when a mask is given, else the nonzero
voxels):

* ``"percentile"`` (:class:`NormalizeIntensityPercentiled`): the 0.5th and 99.5th percentiles of the region map
  to 0 and 1 (``offset = p_low``, ``scale = p_high - p_low``); nothing is clipped;
* ``"zscore"`` (:class:`NormalizeIntensityZScored`): the region gets zero mean and unit standard deviation
  (``offset = mean``, ``scale = std``).

Both record the map in the image's metadata, ``meta["intensity_offset"]`` and ``meta["intensity_scale"]``
(plain floats, see :data:`OFFSET_KEY` / :data:`SCALE_KEY`); :func:`restore_intensity` applies the inverse
``x = y * scale + offset``, which is how a regression output (denoising) returns to the input's intensity scale.
MONAI's ``ScaleIntensityRangePercentilesd`` and ``NormalizeIntensityd`` are not used because the first cannot
restrict its percentiles to nonzero voxels or a mask and neither records the map it applied.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import Compose, EnsureTyped, LoadImaged, MapTransform, Orientationd, Spacingd
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import ensure_tuple

__all__ = [
    "NORMALIZE_MODES",
    "OFFSET_KEY",
    "SCALE_KEY",
    "NormalizeIntensityPercentiled",
    "NormalizeIntensityZScored",
    "image_preprocessing",
    "intensity_map",
    "restore_intensity",
]

#: Intensity normalisations :func:`image_preprocessing` knows.
NORMALIZE_MODES: tuple[str, ...] = ("percentile", "zscore")
#: Metadata key of the recorded intensity offset (``y = (x - offset) / scale``).
OFFSET_KEY = "intensity_offset"
#: Metadata key of the recorded intensity scale.
SCALE_KEY = "intensity_scale"

_EPS = 1e-8  # a scale below this (a constant region) is replaced by 1, so the map stays invertible


class _AffineIntensityNormalized(MapTransform):
    """Base class: estimate ``(offset, scale)`` on a region, apply ``(x - offset) / scale``, record both.

    Args:
        keys: image keys to normalise (each gets its own offset and scale, over all its channels).
        mask_key: optional key of a mask (same spatial shape, one channel or as many as the image); the
            statistics use the voxels where it is > 0. Without it they use the image's nonzero voxels.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(self, keys: KeysCollection, mask_key: Hashable | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def statistics(self, values: torch.Tensor) -> tuple[float, float]:
        """``(offset, scale)`` of the region's values (1D float64 tensor, at least one element)."""
        raise NotImplementedError

    def _region(self, img: torch.Tensor, data: Mapping[Hashable, Any]) -> torch.Tensor:
        """Boolean tensor shaped like ``img``: where the statistics are taken."""
        if self.mask_key is None:
            return img != 0
        mask = data[self.mask_key]
        mask = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)).to(img.device) > 0
        if mask.shape[1:] != img.shape[1:]:
            raise ValueError(
                f"mask '{self.mask_key}' has spatial shape {tuple(mask.shape[1:])}, image has {tuple(img.shape[1:])}"
            )
        return mask.expand_as(img)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            values = raw[self._region(raw, d)].double()
            if values.numel() == 0:
                warnings.warn(f"'{key}': the normalisation region is empty; intensities left unchanged", stacklevel=2)
                offset, scale = 0.0, 1.0
            else:
                offset, scale = self.statistics(values)
                if not np.isfinite(scale) or scale < _EPS:
                    scale = 1.0
            out = (raw.float() - offset) / scale
            if isinstance(img, MetaTensor):
                meta = {k: v for k, v in img.meta.items() if k != "affine"}
                out = MetaTensor(out, affine=img.affine, meta=meta, applied_operations=img.applied_operations)
                out.meta[OFFSET_KEY] = float(offset)
                out.meta[SCALE_KEY] = float(scale)
            d[key] = out
        return d


class NormalizeIntensityPercentiled(_AffineIntensityNormalized):
    """Map the ``lower``-th and ``upper``-th percentiles of the region (nonzero voxels or mask) to 0 and 1.

    No clipping: values beyond the percentiles go below 0 / above 1. The applied map is recorded in the
    image's metadata (see the module docstring). ``lower``/``upper`` are percentages in [0, 100].
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        mask_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, mask_key, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    def statistics(self, values: torch.Tensor) -> tuple[float, float]:
        """``offset = p_lower``, ``scale = p_upper - p_lower``."""
        low, high = (float(v) for v in percentile(values, [self.lower, self.upper]))
        return low, high - low


class NormalizeIntensityZScored(_AffineIntensityNormalized):
    """Zero mean and unit standard deviation over the region (nonzero voxels or mask), applied to every voxel.

    The applied map is recorded in the image's metadata (see the module docstring).
    """

    def statistics(self, values: torch.Tensor) -> tuple[float, float]:
        """``offset = mean``, ``scale = std`` (population standard deviation)."""
        return float(values.mean()), float(values.std(correction=0))


def intensity_map(img: torch.Tensor | Mapping[str, Any]) -> tuple[float, float]:
    """The recorded ``(offset, scale)`` of a normalised MetaTensor (or of its ``meta`` dict).

    Raises:
        KeyError: no normalisation was recorded (the image did not go through this module's normalisation).
    """
    meta = img.meta if isinstance(img, MetaTensor) else img
    if not isinstance(meta, Mapping) or OFFSET_KEY not in meta or SCALE_KEY not in meta:
        raise KeyError(
            f"no intensity normalisation recorded (metadata keys '{OFFSET_KEY}', '{SCALE_KEY}'); "
            "was the image preprocessed with custom.preprocess.image_preprocessing?"
        )
    return _first_float(meta[OFFSET_KEY]), _first_float(meta[SCALE_KEY])


def _first_float(value: Any) -> float:
    """A recorded float, also after a DataLoader collated it into a tensor/list (the first item's value)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double()
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def restore_intensity(x: torch.Tensor, offset: float, scale: float) -> torch.Tensor:
    """Undo the normalisation: ``x * scale + offset`` (``offset``/``scale`` from :func:`intensity_map`)."""
    return x * scale + offset


def image_preprocessing(
    keys: KeysCollection = ("image",),
    label_keys: KeysCollection = (),
    pixdim: Sequence[float] | float | None = (1.0, 1.0, 1.0),
    normalize: str = "percentile",
    mask_key: str | None = None,
) -> Compose:
    """Load, reorient (RAS), resample and intensity-normalise NIfTI images: the bundles' shared preprocessing.

    Args:
        keys: data keys of the images (file paths in, ``(C, *S)`` float32 MetaTensors out; intensities
            normalised).
        label_keys: data keys of label maps / masks: loaded, reoriented and resampled with nearest-neighbour
            interpolation, not normalised.
        pixdim: output voxel size in mm; ``None`` keeps each image's own spacing.
        normalize: ``"percentile"`` (0.5th..99.5th percentiles of the nonzero voxels -> 0..1, no clipping) or
            ``"zscore"`` (zero mean, unit std over the mask or the nonzero voxels); see the module docstring.
        mask_key: optional key of a brain mask: the normalisation statistics use its voxels. Loaded like a
            label (it is added to ``label_keys`` when it is not there).

    Returns:
        The ``Compose``; the normalisation records its map in each image's ``meta`` (see :func:`intensity_map`).
    """
    image_keys = tuple(ensure_tuple(keys))
    labels = tuple(ensure_tuple(label_keys))
    if mask_key is not None and mask_key not in labels and mask_key not in image_keys:
        labels = labels + (mask_key,)
    if not image_keys:
        raise ValueError("image_preprocessing needs at least one image key")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize={normalize!r}; choose one of {list(NORMALIZE_MODES)}")
    all_keys = image_keys + labels
    reader = NibabelReader(squeeze_non_spatial_dims=True)  # a 4D NIfTI holding one volume -> 3D
    transforms: list[Any] = [
        LoadImaged(keys=all_keys, reader=reader, image_only=True, ensure_channel_first=True),
        EnsureTyped(keys=all_keys, dtype=torch.float32, track_meta=True),
        Orientationd(keys=all_keys, axcodes="RAS", labels=None),  # labels from the meta's "space" (RAS)
    ]
    if pixdim is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(labels)
        transforms.append(Spacingd(keys=all_keys, pixdim=pixdim, mode=modes))
    if normalize == "percentile":
        transforms.append(NormalizeIntensityPercentiled(keys=image_keys, mask_key=mask_key))
    else:
        transforms.append(NormalizeIntensityZScored(keys=image_keys, mask_key=mask_key))
    return Compose(transforms)

"""MRI augmentations: torch-native bias field, Rician noise and cuboid dropout, and the paper's pipeline.

* :class:`RandBiasFieldTorchd`, :class:`RandRicianNoiseTorchd`, :class:`RandCuboidDropoutd` - replacements for
  MONAI transforms that go through NumPy (a host round trip for GPU data); they run on the data's device.
* :func:`mri_augmentations` - the paper's augmentation pipeline (random crop, rotation, shear, flips; then bias
  field, Gibbs ringing, Rician noise, cuboid dropout) as the three MONAI ``Compose`` stages of
  :class:`MRIAugmentations`; :func:`crop_margins` is the margin its crop adds around the patch.

Intensities are in the image's units (for images normalised so the brain's 99.5th percentile is 1, fractions of
that level); sizes are in voxels, angles in degrees where the argument name says ``deg``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandGibbsNoised,
    Randomizable,
    RandomizableTransform,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import MAX_SEED, ensure_tuple, ensure_tuple_rep

from custom import physics
from custom.fields import poly_terms, polynomial_log_field
from custom.transforms._common import SEED_HIGH, like, plain, torch_generator

__all__ = [
    "RandBiasFieldTorchd",
    "RandRicianNoiseTorchd",
    "RandCuboidDropoutd",
    "MRIAugmentations",
    "crop_margins",
    "mri_augmentations",
]


class RandBiasFieldTorchd(MapTransform, RandomizableTransform):
    """Smooth multiplicative intensity non-uniformity ``img * exp(field)``, in torch on the data's device.

    Same model as MONAI's ``RandBiasFieldd`` (a Legendre polynomial log-field with terms of total degree
    ``1..degree``, coefficients uniform in ``coeff_range``), which is not used because it builds the field
    with ``numpy.polynomial`` and multiplies the image as a NumPy array (a GPU image would be copied to the
    host and back every call). All keys get the same field.

    Args:
        keys: image keys. prob: probability of applying.
        degree: polynomial degree (3: 19 coefficients).
        coeff_range: coefficient range; the default (-0.2, 0.2) gives fields whose 1st-99th percentiles span
            about 0.6-1.6 over a patch.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        degree: int = 3,
        coeff_range: tuple[float, float] = (-0.2, 0.2),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.degree = int(degree)
        self.coeff_range = (float(coeff_range[0]), float(coeff_range[1]))
        self._coeffs: list[float] = []

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            n = len(poly_terms(self.degree))
            self._coeffs = [float(c) for c in self.R.uniform(*self.coeff_range, n)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        field: torch.Tensor | None = None
        for key in self.key_iterator(d):
            img = d[key]
            if field is None or field.shape != img.shape[1:] or field.device != img.device:
                field = torch.exp(
                    polynomial_log_field(
                        self._coeffs,
                        img.shape[1:],
                        degree=self.degree,
                        device=img.device,
                        dtype=torch.float32,
                    )
                )
            d[key] = img * field.to(img.dtype)
        return d


class RandRicianNoiseTorchd(MapTransform, RandomizableTransform):
    """Rician noise (paper eq. 5, :func:`custom.physics.rician_noise`) with sigma ~ U(``std_range``).

    Replaces MONAI's ``RandRicianNoised``, which draws both Gaussian fields with NumPy on the host
    (``self.R.normal``) and copies them to the image's device each call; here they are drawn by a
    ``torch.Generator`` on the image's device, seeded from ``self.R``. Sigma is in the image's intensity units
    (for images normalised so the brain's 99.5th percentile is 1, a fraction of that level); one sigma per
    call, shared by all keys, each key getting its own noise.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        std_range: tuple[float, float] = (0.0, 0.2),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if std_range[0] < 0 or std_range[1] < std_range[0]:
            raise ValueError(f"std_range must satisfy 0 <= low <= high, got {std_range}")
        self.std_range = (float(std_range[0]), float(std_range[1]))
        self._sigma = 0.0
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._sigma = float(self.R.uniform(*self.std_range))
            self._seed = int(self.R.randint(SEED_HIGH))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for i, key in enumerate(self.key_iterator(d)):
            img = d[key]
            g = torch_generator(self._seed + i, img.device)
            d[key] = like(physics.rician_noise(plain(img), self._sigma, g), img)
        return d


class RandCuboidDropoutd(MapTransform, RandomizableTransform):
    """Random cuboid dropout (Pathak et al. 2016): fill ``holes`` random boxes with ``fill_value``.

    Replaces MONAI's ``RandCoarseDropoutd``, which converts the image to a NumPy array to fill the holes (a
    host round trip for GPU data); here the boxes are drawn with ``self.R`` and filled by slicing on the
    image's device. All keys get the same boxes.

    Args:
        holes: (min, max) number of boxes, inclusive.
        size: (min, max) side length of a box in voxels, drawn per axis; ``max=None`` means a third of the
            image size along that axis. Boxes lie fully inside the image.
        fill_value: the value written into the boxes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        holes: tuple[int, int] = (1, 20),
        size: tuple[int, int | None] = (5, None),
        fill_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if holes[0] < 0 or holes[1] < holes[0]:
            raise ValueError(f"holes must satisfy 0 <= min <= max, got {holes}")
        self.holes = (int(holes[0]), int(holes[1]))
        self.size = (int(size[0]), None if size[1] is None else int(size[1]))
        self.fill_value = float(fill_value)
        self._boxes: list[tuple[slice, ...]] = []

    def randomize(self, data: Sequence[int] | None = None) -> None:
        super().randomize(None)
        self._boxes = []
        if not self._do_transform or data is None:
            return
        shape = tuple(int(s) for s in data)
        for _ in range(int(self.R.randint(self.holes[0], self.holes[1] + 1))):
            box = []
            for n in shape:
                hi = max(1, min(n // 3 if self.size[1] is None else self.size[1], n))
                lo = max(1, min(self.size[0], hi))
                side = int(self.R.randint(lo, hi + 1))
                start = int(self.R.randint(0, n - side + 1))
                box.append(slice(start, start + side))
            self._boxes.append((slice(None), *box))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(d[first].shape[1:])
        if not self._boxes:
            return d
        for key in self.key_iterator(d):
            out = d[key].clone()
            for box in self._boxes:
                out[box] = self.fill_value
            d[key] = out
        return d


# ------------------------------------------------------------------------------------------------------------
# The augmentation pipeline of the paper
# ------------------------------------------------------------------------------------------------------------
class MRIAugmentations(Randomizable):
    """The paper's view augmentations in three stages (each a MONAI ``Compose``), applied in order.

    * ``crop``: ``SpatialPadd`` (zero-pads any axis shorter than the patch, MONAI's usual crop behaviour) then
      ``RandSpatialCropd`` of the patch size plus a margin on each side (clipped to the image). It only
      slices, so it is cheap and can run on qMRI maps before simulation (simulation is voxel-wise).
    * ``spatial``: ``RandAffined`` (rotation, shear; output = patch size, centred in the crop, zero padding)
      and ``RandFlipd`` along each axis, composed lazily (MONAI lazy resampling) so they run as one
      ``grid_sample`` on the data's device. (Run eagerly, ``RandAffined`` without a ``device`` argument builds
      its sampling grid on the CPU and copies it to the data's device each call.)
    * ``artefacts``: bias field, Gibbs ringing, Rician noise, cuboid dropout, on the image keys only.

    Calling the object runs all three. ``set_random_state`` seeds the three stages from one seed.
    """

    def __init__(self, crop: Compose, spatial: Compose, artefacts: Compose) -> None:
        self.crop = crop
        self.spatial = spatial
        self.artefacts = artefacts

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MRIAugmentations:
        super().set_random_state(seed=seed, state=state)
        for stage in (self.crop, self.spatial, self.artefacts):
            stage.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw here: each stage's transforms draw their own parameters when called."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.artefacts(self.spatial(self.crop(dict(data))))


def crop_margins(patch_size: Sequence[int] | int, margin: Sequence[int] | int | None = None) -> tuple[int, int, int]:
    """Voxels that the crop of :func:`mri_augmentations` adds on each side of the patch, per axis.

    ``margin`` (one int or one per axis) when given, else ``ceil(patch / 8)`` per axis, enough for the rotated
    patch's corners to stay inside the crop for a 15 deg rotation about one axis. The crop is
    ``patch + 2 * margin`` voxels per axis.
    """
    if margin is None:
        per_axis = tuple(math.ceil(int(p) / 8) for p in ensure_tuple_rep(patch_size, 3))
    else:
        per_axis = ensure_tuple_rep(margin, 3)
    x, y, z = (int(m) for m in per_axis)
    return x, y, z


def mri_augmentations(
    keys: KeysCollection = ("image",),
    patch_size: Sequence[int] | int = (96, 96, 96),
    *,
    label_keys: KeysCollection = (),
    crop_keys: KeysCollection | None = None,
    margin: Sequence[int] | int | None = None,
    affine_prob: float = 0.8,
    rotate_deg: float = 15.0,
    shear: float = 0.05,
    scale: float = 0.0,
    flip_prob: float = 0.5,
    bias_prob: float = 1.0,
    bias_degree: int = 3,
    bias_coeff: tuple[float, float] = (-0.2, 0.2),
    gibbs_prob: float = 1.0,
    gibbs_alpha: tuple[float, float] = (0.0, 0.8),
    noise_prob: float = 1.0,
    noise_std: tuple[float, float] = (0.0, 0.2),
    dropout_prob: float = 1.0,
    dropout_holes: tuple[int, int] = (1, 20),
    dropout_size: tuple[int, int | None] = (5, None),
) -> MRIAugmentations:
    """Build the paper's augmentation pipeline (Sec. 3.1) for 3-D channel-first images.

    The paper names the augmentations but not their ranges; the defaults follow the authors' code where it is
    plausible and say where they differ.

    Args:
        keys: image keys (bilinear resampling; the artefacts are applied to them).
        patch_size: output spatial size in voxels (paper: 96^3). Smaller images are zero-padded to it.
        label_keys: label/mask keys: cropped and resampled (nearest) with the images, no artefacts.
        crop_keys: keys of the crop stage (default ``keys + label_keys``); e.g. qMRI map keys when the crop
            runs before simulation.
        margin: voxels added on each side of the patch by the crop, so rotated patch corners still see image
            data; default ``ceil(patch / 8)`` (covers a 15 deg rotation about one axis; :func:`crop_margins`).
        affine_prob: probability of the rotation/shear (authors' code: 0.8).
        rotate_deg: rotation about each axis ~ U(-rotate_deg, rotate_deg) degrees (authors' code: 15, there
            passed to MONAI as radians; read as degrees here).
        shear: each of the six shear factors ~ U(-shear, shear) (authors' code: 0.012).
        scale: isotropic-per-axis scaling ``1 + U(-scale, scale)``; 0 (the paper lists none; authors: 0.15).
        flip_prob: probability of a flip along each axis independently.
        bias_prob, bias_degree, bias_coeff: :class:`RandBiasFieldTorchd` (authors' code: coefficients
            (0, 0.3), positive only, which gives fields spanning ~5x over a patch; here symmetric, +-0.2).
        gibbs_prob, gibbs_alpha: MONAI ``RandGibbsNoised`` (k-space truncation; alpha 0 = none, 1 = all).
        noise_prob, noise_std: :class:`RandRicianNoiseTorchd`, sigma ~ U(noise_std) in intensity units.
        dropout_prob, dropout_holes, dropout_size: :class:`RandCuboidDropoutd` (1-20 boxes of 5 to patch/3
            voxels per side, filled with 0, as in the authors' code).
    """
    keys_t = ensure_tuple(keys)
    labels_t = ensure_tuple(label_keys)
    patch = ensure_tuple_rep(patch_size, 3)
    if any(int(p) < 1 for p in patch):
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    patch = tuple(int(p) for p in patch)
    margins = crop_margins(patch, margin)
    crop_t = ensure_tuple(crop_keys) if crop_keys is not None else keys_t + labels_t
    spatial_keys = keys_t + labels_t
    modes = ["bilinear"] * len(keys_t) + ["nearest"] * len(labels_t)
    rot = math.radians(rotate_deg)
    crop = Compose(
        [
            SpatialPadd(crop_t, spatial_size=patch, mode="constant", allow_missing_keys=True),
            RandSpatialCropd(
                crop_t,
                roi_size=[p + 2 * m for p, m in zip(patch, margins, strict=True)],
                random_size=False,
                allow_missing_keys=True,
            ),
        ]
    )
    spatial = Compose(
        [
            RandAffined(
                spatial_keys,
                spatial_size=patch,
                prob=affine_prob,
                rotate_range=[rot] * 3 if rot > 0 else None,
                shear_range=[shear] * 6 if shear > 0 else None,
                scale_range=[scale] * 3 if scale > 0 else None,
                mode=modes,
                padding_mode="zeros",
                allow_missing_keys=True,
            ),
            *(RandFlipd(spatial_keys, prob=flip_prob, spatial_axis=a, allow_missing_keys=True) for a in range(3)),
        ],
        lazy=True,
        # lazy resampling takes interpolation/padding from these per-key overrides, not RandAffined's args
        overrides={
            k: {"mode": m, "padding_mode": "zeros", "dtype": torch.float32}
            for k, m in zip(spatial_keys, modes, strict=True)
        },
    )
    artefacts = Compose(
        [
            RandBiasFieldTorchd(
                keys_t, prob=bias_prob, degree=bias_degree, coeff_range=bias_coeff, allow_missing_keys=True
            ),
            RandGibbsNoised(keys_t, prob=gibbs_prob, alpha=gibbs_alpha, allow_missing_keys=True),
            RandRicianNoiseTorchd(keys_t, prob=noise_prob, std_range=noise_std, allow_missing_keys=True),
            RandCuboidDropoutd(
                keys_t, prob=dropout_prob, holes=dropout_holes, size=dropout_size, allow_missing_keys=True
            ),
        ]
    )
    return MRIAugmentations(crop, spatial, artefacts)

"""MONAI dictionary transforms: MRI simulation from qMRI maps, contrastive views, and MRI augmentations.

All on torch tensors (``MetaTensor`` where MONAI's metadata tracking is on), on the device of the data, so a
pipeline whose inputs were moved to the GPU (``EnsureTyped(device="cuda")``) runs there. What lives where:

* :mod:`custom.transforms.records` - protocol records (:func:`sequence_record`, :func:`sample_from_record`,
  :data:`PARAM_NAMES`) and drawing a protocol whose simulated image is not empty.
* :mod:`custom.transforms.simulation` - :class:`QMRIMaps` (reading the maps, :data:`MAP_KEYS`) and
  :class:`RandSimulateSequenced`: one contrast image from qMRI maps (paper Sec. 3.2, Appendix A): a sampled
  protocol (:mod:`custom.sequences`), a smooth random receive field B1, Rician noise, intensity normalisation.
* :mod:`custom.transforms.augmentations` - :func:`mri_augmentations`, the paper's augmentation pipeline (random
  crop, rotation, shear, flips; then bias field, Gibbs ringing, Rician noise, cuboid dropout) as three MONAI
  ``Compose`` stages (:class:`MRIAugmentations`), and its torch-native transforms :class:`RandBiasFieldTorchd`,
  :class:`RandRicianNoiseTorchd`, :class:`RandCuboidDropoutd`.
* :mod:`custom.transforms.views` - :class:`ContrastiveViewsd`: the two augmented views and their clean
  reconstruction targets for the three pretraining strategies of the paper (Sec. 3.1 and 4.1): ``base``
  (MPRAGE), ``seqaug`` (one sequence, two augmentations) and ``seqinv`` (two different sequence types).
* :mod:`custom.transforms.batched` - the batched view path: :class:`PrepareViewSourced` and
  :class:`RandViewRegiond` (loader workers: cached clipped maps, the shared region), :class:`BatchedContrastiveViews`
  (one call per batch makes every view with batched torch operations on the training device; helpers in
  :mod:`custom.transforms.batched_augment` and :mod:`custom.transforms.batched_protocols`), and
  :class:`ContrastiveViewStage`, which builds the per-sample or a batched path from one set of settings.
* :mod:`custom.fields` (outside this package) - the smooth fields and statistics they share:
  :func:`~custom.fields.polynomial_log_field`, :func:`~custom.fields.region_percentile` (alias ``robust_max``).

Every name is importable from ``custom.transforms`` (configs use ``_target_: custom.transforms.<Name>``).

Units: qMRI maps are PD and MT as fractions in [0, 1] and R1, R2*, R2 in 1/s (convert hMRI percent units when
loading). Sequence parameters are recorded in seconds and radians.

Randomness: every random choice is drawn from the transform's ``self.R`` (MONAI's ``set_random_state``);
torch random numbers (sequence sampling, noise) use a ``torch.Generator`` seeded from ``self.R``, so two
transforms given the same seed produce identical outputs on the same device (CPU and CUDA generators give
different streams for the same seed).
"""

from __future__ import annotations

from custom.fields import polynomial_log_field, region_percentile, robust_max
from custom.transforms.augmentations import (
    MRIAugmentations,
    RandBiasFieldTorchd,
    RandCuboidDropoutd,
    RandRicianNoiseTorchd,
    crop_margins,
    mri_augmentations,
)
from custom.transforms.batched import (
    VIEW_PATHS,
    BatchedContrastiveViews,
    BatchedViewsCollate,
    ContrastiveViewStage,
    PrepareViewSourced,
    RandViewRegiond,
)
from custom.transforms.records import PARAM_NAMES, sample_from_record, sequence_record
from custom.transforms.simulation import MAP_KEYS, QMRIMaps, RandSimulateSequenced
from custom.transforms.views import ContrastiveViewsd

__all__ = [
    "PARAM_NAMES",
    "MAP_KEYS",
    "sequence_record",
    "sample_from_record",
    "QMRIMaps",
    "polynomial_log_field",
    "region_percentile",
    "robust_max",
    "RandSimulateSequenced",
    "ContrastiveViewsd",
    "VIEW_PATHS",
    "PrepareViewSourced",
    "RandViewRegiond",
    "BatchedContrastiveViews",
    "BatchedViewsCollate",
    "ContrastiveViewStage",
    "RandBiasFieldTorchd",
    "RandRicianNoiseTorchd",
    "RandCuboidDropoutd",
    "MRIAugmentations",
    "crop_margins",
    "mri_augmentations",
]

"""Invariance metrics that can rank encoders: a cross-contrast linear tissue probe and dense feature consistency.

Cross-sequence retrieval of pooled embeddings (:mod:`custom.invariance`) cannot rank encoders on the synthetic
data: every subject is a warp of one template, so two subjects differ mostly in small deformations. This module
asks instead whether the encoder's *voxel* features say the same thing about the tissue whatever the contrast.

**Cross-contrast linear probe.** Every subject's qMRI maps are imaged with a fixed panel of contrasts
(:func:`probe_contrasts`: one clinical-preset MPRAGE, FSE, GRE and FLAIR protocol, seeded, and the IXI-like
T1w/T2w/PDw protocols of one site of :data:`custom.data.synthetic.SITE_PROTOCOLS`), each with a little Rician
noise and normalised the same way for every encoder (z-score inside the brain mask, background 0, by default).
The voxel features of an encoder are all its level maps upsampled (trilinear) to the input grid and
concatenated. A multinomial logistic regression (:class:`LogisticProbe`) predicting GM / WM / CSF is fit on
class-balanced voxels of the FIT subjects under one *train* contrast and scored by balanced accuracy on the brain
voxels of the held-out TEST subjects under every *test* contrast: a train x test matrix per encoder. Its
off-diagonal mean is the **cross-contrast** accuracy (the features mean the same under another sequence), its
diagonal mean the **same-contrast** accuracy (the features hold tissue information at all). Chance is 1/3.
Bootstrap intervals resample the test subjects.

**Baselines, same voxels, same probe.** ``position`` (the voxel's canvas coordinates, their squares and
products), ``intensity`` (the normalised voxel intensity and its 3x3x3 mean), ``random`` (a randomly initialised
encoder of the same widths, seeded).

**Position cues removed** (``remove_position=True``, default): every volume, fit and test, is flipped at random
per axis and moved by a random integer translation (up to ``max_shift`` voxels per axis) on a zero-padded
canvas, drawn per subject with the seed (one subject's contrasts share its flips and shift); labels move with
it. Without this, voxel position alone predicts the tissue of the aligned synthetic brains far above chance.

**Dense consistency.** Per encoder level: the mean cosine similarity of the (centred) feature vectors at the same
canvas location of ONE test subject under two different contrasts, against that of TWO different test subjects
at the same canvas location under two different contrasts. The difference is high for sequence-invariant,
subject-specific features. Features are centred per level (the mean over all evaluated voxels is subtracted)
so a constant offset does not give 1.

**Retrieval.** :func:`custom.invariance.cross_sequence_retrieval` of the global-average-pooled deepest maps of
the test subjects under the panel, computed on the untransformed (aligned, centred) brains: with the per-subject
flips and shift, which one subject's contrasts share, the pooled map would identify the subject by its pose.

:func:`run_probe` is the entry point (``seqinv invariance`` and the pretraining bundle's ``evaluate.yaml`` call

Modules: :mod:`.data` (contrast panel, normalisation, tissue labels, the canvas and its flips and shifts, voxel
samples), :mod:`.features` (feature functions and baselines), :mod:`.linear` (the logistic probe and balanced
accuracy), :mod:`.consistency` (dense consistency), :mod:`.evaluate` (:func:`evaluate_probe`), :mod:`.report`
(table, heatmap), :mod:`.run` (:func:`run_probe`).
"""

from __future__ import annotations

from custom.probe.consistency import dense_consistency
from custom.probe.data import TISSUES, ProbeInputError, normalize_image, probe_contrasts
from custom.probe.evaluate import evaluate_probe
from custom.probe.features import (
    EncoderFeatures,
    FeatureFunction,
    IntensityFeatures,
    PositionFeatures,
    ProbeVolume,
    sample_voxel_features,
)
from custom.probe.linear import LogisticProbe, balanced_accuracy, balanced_accuracy_score, confusion_matrix
from custom.probe.report import format_probe_table
from custom.probe.run import BASELINES, EncoderSpec, run_probe

__all__ = [
    "TISSUES",
    "BASELINES",
    "ProbeInputError",
    "ProbeVolume",
    "LogisticProbe",
    "confusion_matrix",
    "balanced_accuracy",
    "balanced_accuracy_score",
    "probe_contrasts",
    "normalize_image",
    "PositionFeatures",
    "IntensityFeatures",
    "EncoderFeatures",
    "sample_voxel_features",
    "dense_consistency",
    "evaluate_probe",
    "run_probe",
    "format_probe_table",
    "FeatureFunction",
    "EncoderSpec",
]

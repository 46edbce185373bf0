"""MONAI dictionary transforms: MRI simulation from qMRI maps, contrastive views, and MRI augmentations.

Three pieces, all on torch tensors (``MetaTensor`` where MONAI's metadata tracking is on), on the device of
the data, so a pipeline whose inputs were moved to the GPU (``EnsureTyped(device="cuda")``) runs there:

* :class:`RandSimulateSequenced` - one contrast image from qMRI maps (paper Sec. 3.2, Appendix A): a sampled
  protocol (:mod:`custom.sequences`), a smooth random receive field B1, Rician noise, intensity normalisation,
  and a guard against the empty images that the paper's wide parameter ranges produce.
* :class:`ContrastiveViewsd` - the two augmented views and their clean reconstruction targets for the three
  pretraining strategies of the paper (Sec. 3.1 and 4.1): ``base`` (MPRAGE), ``seqaug`` (one sequence, two
  augmentations) and ``seqinv`` (two different sequence types).
* :func:`mri_augmentations` - the paper's augmentation pipeline (random crop, rotation, shear, flips; then
  bias field, Gibbs ringing, Rician noise, cuboid dropout) as three MONAI ``Compose`` stages.

Units: qMRI maps are PD and MT as fractions in [0, 1] and R1, R2*, R2 in 1/s (convert hMRI percent units when
loading). Sequence parameters are recorded in seconds and radians.

Randomness: every random choice is drawn from the transform's ``self.R`` (MONAI's ``set_random_state``);
torch random numbers (sequence sampling, noise) use a ``torch.Generator`` seeded from ``self.R``, so two
transforms given the same seed produce identical outputs on the same device (CPU and CUDA generators give
different streams for the same seed).

Recorded protocols: the sampled protocol of an image is stored as a plain dict (``SequenceSample.to_dict()``,
see :func:`sequence_record`) both in ``data[f"{output_key}_sequence"]`` and in the output MetaTensor's
``meta["sequence"]``. To let a DataLoader collate a batch that mixes sequence types, the dict always carries
every parameter name of :data:`PARAM_NAMES`, with NaN for the parameters that the sequence does not have.
``SequenceSample.from_dict(record)`` (or :func:`sample_from_record`, which drops the NaN entries) rebuilds the
protocol, and ``RandSimulateSequenced(fixed_sample=...)`` replays it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
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
from custom.errors import InputError
from custom.intensity import VIEW_NORMS, clip_to_percentiles, normalise_view, zscore
from custom.sequences import (
    PARAM_NAMES,
    SEQUENCES,
    SequenceSample,
    sample_distinct_sequences,
    sample_sequence,
    simulate,
)

__all__ = [
    "PARAM_NAMES",
    "MAP_KEYS",
    "sequence_record",
    "sample_from_record",
    "QMRIMaps",
    "polynomial_log_field",
    "robust_max",
    "RandSimulateSequenced",
    "ContrastiveViewsd",
    "RandBiasFieldTorchd",
    "RandRicianNoiseTorchd",
    "RandCuboidDropoutd",
    "MRIAugmentations",
    "mri_augmentations",
]

# PARAM_NAMES (re-exported): every protocol parameter name of :mod:`custom.sequences` (times in s, angles in rad,
# ``n`` a count, ``efficiency`` a fraction); kept in one place so a new sequence family cannot break collation.

MAP_KEYS: tuple[str, ...] = ("pd", "r1", "r2s", "mt")
"""Default data keys of the separate qMRI maps (PD, R1, R2*, MT); channel order of a 4-channel qMRI image."""

_SEED_HIGH = 2**31 - 1  # torch.Generator seeds drawn from self.R lie in [0, 2**31 - 1)


# ------------------------------------------------------------------------------------------------------------
# Records of sampled protocols
# ------------------------------------------------------------------------------------------------------------
def sequence_record(sample: SequenceSample | None, preset: str | None = None) -> dict[str, Any]:
    """Plain dict for a sampled protocol: ``sample.to_dict()`` with every name of :data:`PARAM_NAMES` present.

    Parameters that the sequence does not have are NaN, so records of different sequences have the same keys
    and collate into a batch. ``sample=None`` describes a real (not simulated) MPRAGE image: sequence
    ``"mprage"``, preset ``preset`` (default ``"real"``), every parameter NaN.
    """
    nan_params: dict[str, Any] = {name: math.nan for name in PARAM_NAMES}
    if sample is None:
        return {"sequence": "mprage", "preset": preset or "real", **nan_params}
    out = sample.to_dict()
    return {"sequence": out.pop("sequence"), "preset": out.pop("preset"), **nan_params, **out}


def sample_from_record(record: Mapping[str, Any]) -> SequenceSample:
    """Rebuild a :class:`~custom.sequences.SequenceSample` from a :func:`sequence_record` (NaN dropped)."""
    clean = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
    return SequenceSample.from_dict(clean)


def _as_sample(value: SequenceSample | Mapping[str, Any] | None) -> SequenceSample | None:
    if value is None or isinstance(value, SequenceSample):
        return value
    return sample_from_record(value)


# ------------------------------------------------------------------------------------------------------------
# Small tensor helpers
# ------------------------------------------------------------------------------------------------------------
def _plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata (no copy); arithmetic on it avoids MetaTensor bookkeeping."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _like(x: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """``x`` as a MetaTensor carrying ``ref``'s affine and metadata (when metadata tracking is on)."""
    x = _plain(x)
    if not get_track_meta():
        return x
    if isinstance(ref, MetaTensor):
        meta = {k: v for k, v in ref.meta.items() if k != "affine"}
        return MetaTensor(x, affine=ref.affine.clone(), meta=meta)
    return MetaTensor(x)


def _view_affine(view: torch.Tensor) -> torch.Tensor:
    """The ``(4, 4)`` float64 voxel-to-volume affine of a view (identity when metadata tracking is off)."""
    affine = getattr(view, "affine", None)
    if affine is None:
        return torch.eye(4, dtype=torch.float64)
    return torch.as_tensor(_plain(affine), dtype=torch.float64).clone()


def _as_meta(x: torch.Tensor) -> torch.Tensor:
    """Wrap a plain tensor as a MetaTensor (identity affine) so crops record their offset in its affine."""
    if isinstance(x, MetaTensor) or not get_track_meta():
        return x
    return MetaTensor(x)


def _torch_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def robust_max(image: torch.Tensor, region: torch.Tensor | None = None, percentile: float = 99.5) -> torch.Tensor:
    """The ``percentile``-th percentile of ``image`` inside ``region`` (a 0-d tensor on the image's device).

    Args:
        image: any tensor.
        region: boolean tensor broadcastable to ``image`` (e.g. a brain mask); ``None`` or an empty region
            uses every voxel.
        percentile: in [0, 100]. Computed with ``torch.kthvalue`` (no size limit, unlike ``torch.quantile``).
    """
    values = _plain(image)
    if region is not None:
        selected = values[_plain(region).expand_as(values)]
        if selected.numel() > 0:
            values = selected
    values = values.reshape(-1).float()
    n = values.numel()
    k = min(max(int(math.ceil(percentile / 100.0 * n)), 1), n)
    return torch.kthvalue(values, k).values


def _legendre(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials ``P_0 .. P_degree`` at ``x`` (shape ``(degree + 1, len(x))``)."""
    out = [torch.ones_like(x), x]
    for n in range(1, degree):
        out.append(((2 * n + 1) * x * out[n] - n * out[n - 1]) / (n + 1))
    return torch.stack(out[: degree + 1])


def _poly_terms(degree: int) -> list[tuple[int, int, int]]:
    """Exponent triples (i, j, k) with ``1 <= i + j + k <= degree`` (the constant term is left out)."""
    return [
        (i, j, k)
        for i in range(degree + 1)
        for j in range(degree + 1 - i)
        for k in range(degree + 1 - i - j)
        if i + j + k > 0
    ]


def polynomial_log_field(
    coeffs: Sequence[float],
    shape: Sequence[int],
    *,
    degree: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    offset: Sequence[int] = (0, 0, 0),
    stride: int = 1,
    full_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Smooth 3-D field ``sum c_ijk P_i(u) P_j(v) P_k(w)`` over ``1 <= i + j + k <= degree`` (Legendre P).

    The coordinates ``u, v, w`` run over [-1, 1] across ``full_shape`` (default ``shape``); a sub-box of it is
    evaluated with ``offset`` (voxel index of the box's first voxel in the full volume) and ``stride`` (every
    ``stride``-th voxel), so a crop of the field equals the field of the crop. Used as a log-field: the
    multiplicative field is ``exp`` of it. ``len(coeffs)`` must equal ``len(_poly_terms(degree))``
    (9 for degree 2, 19 for degree 3). Returns a tensor of ``shape`` on ``device``.
    """
    terms = _poly_terms(degree)
    if len(coeffs) != len(terms):
        raise ValueError(f"degree {degree} needs {len(terms)} coefficients, got {len(coeffs)}")
    full = tuple(full_shape) if full_shape is not None else tuple(shape)
    table = np.zeros((degree + 1,) * 3, dtype=np.float64)
    for (i, j, k), c in zip(terms, coeffs, strict=True):
        table[i, j, k] = c
    c_t = torch.as_tensor(table, dtype=dtype).to(device)
    bases = []
    for n, off, f in zip(shape, offset, full, strict=True):
        idx = torch.arange(n, device=device, dtype=dtype) * stride + off
        bases.append(_legendre(2.0 * idx / max(f - 1, 1) - 1.0, degree))
    return torch.einsum("ijk,ix,jy,kz->xyz", c_t, *bases)


def _voxel_offset(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int] | None:
    """Voxel index, in ``before``, of ``after``'s first voxel, from the MetaTensor affines (None: no meta)."""
    if not (isinstance(before, MetaTensor) and isinstance(after, MetaTensor)):
        return None
    a0 = torch.as_tensor(before.affine, dtype=torch.float64).cpu()
    a1 = torch.as_tensor(after.affine, dtype=torch.float64).cpu()
    rel = torch.linalg.solve(a0, a1)
    off = [int(round(v)) for v in rel[:3, 3].tolist()]
    return off[0], off[1], off[2]


# ------------------------------------------------------------------------------------------------------------
# qMRI maps
# ------------------------------------------------------------------------------------------------------------
@dataclass
class QMRIMaps:
    """qMRI maps, each ``(1, X, Y, Z)``: PD (fraction), R1, R2* (1/s), MT (fraction), optional R2 (1/s)."""

    pd: torch.Tensor
    r1: torch.Tensor
    r2s: torch.Tensor
    mt: torch.Tensor
    r2: torch.Tensor | None = None

    NAMES = ("pd", "r1", "r2s", "mt", "r2")

    @classmethod
    def from_data(
        cls,
        data: Mapping[Hashable, Any],
        map_keys: Sequence[Hashable] = MAP_KEYS,
        qmri_key: Hashable | None = None,
        r2_key: Hashable | None = "r2",
    ) -> QMRIMaps:
        """Read the maps from ``data``: one ``(4 or 5, X, Y, Z)`` image at ``qmri_key`` (channels PD, R1, R2*,
        MT[, R2]), or separate ``(1, X, Y, Z)`` images at ``map_keys`` plus an optional R2 map at ``r2_key``.
        Channel slices are views (no copy); the dtype becomes float32 (float64 is kept)."""
        if qmri_key is not None:
            if qmri_key not in data:
                raise KeyError(f"qMRI image key {qmri_key!r} not in data (keys: {list(data)})")
            q = torch.as_tensor(data[qmri_key]) if not isinstance(data[qmri_key], torch.Tensor) else data[qmri_key]
            if q.ndim != 4 or q.shape[0] not in (4, 5):
                raise ValueError(
                    f"{qmri_key!r} must be (4 or 5, X, Y, Z) with channels PD, R1, R2*, MT[, R2]; got {tuple(q.shape)}"
                )
            chans = [q[c : c + 1] for c in range(q.shape[0])]
        else:
            if len(map_keys) != 4:
                raise ValueError(f"map_keys must name PD, R1, R2*, MT; got {list(map_keys)}")
            missing = [k for k in map_keys if k not in data]
            if missing:
                raise KeyError(f"qMRI map keys {missing} not in data (keys: {list(data)})")
            chans = [data[k] for k in map_keys]
            if r2_key is not None and r2_key in data:
                chans.append(data[r2_key])
        tensors = []
        for c in chans:
            t = c if isinstance(c, torch.Tensor) else torch.as_tensor(np.asarray(c))
            if t.ndim == 3:
                t = t.unsqueeze(0)
            if t.ndim != 4 or t.shape[0] != 1:
                raise ValueError(f"each qMRI map must be (1, X, Y, Z); got {tuple(t.shape)}")
            if t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            tensors.append(t)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"qMRI maps differ in shape: {sorted(shapes)}")
        return cls(*tensors)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.NAMES if getattr(self, n) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> QMRIMaps:
        return cls(d["pd"], d["r1"], d["r2s"], d["mt"], d.get("r2"))

    def map(self, fn: Any) -> QMRIMaps:
        """Apply ``fn`` to every map (e.g. a strided subsample or :func:`_plain`)."""
        return QMRIMaps.from_dict({k: fn(v) for k, v in self.as_dict().items()})

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.pd.shape[1:])

    def simulate(self, sample: SequenceSample, b1: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Noise-free magnitude image ``(1, X, Y, Z)`` (plain tensor) of ``sample`` with receive field b1."""
        p = self.map(_plain)
        return simulate(sample, p.pd, p.r1, p.r2s, p.mt, r2=p.r2, b1=b1)


def _region(maps_pd: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Brain region: ``mask > 0`` when a mask is given, else the voxels with PD > 0."""
    return _plain(mask) > 0 if mask is not None else _plain(maps_pd) > 0


def _subsample_stride(shape: Sequence[int], target: int = 2**18) -> int:
    """Stride that leaves about ``target`` (64^3) voxels of a volume, for cheap global statistics."""
    n = int(np.prod(shape))
    return max(1, int(round((n / target) ** (1.0 / 3.0))))


def _is_empty(image: torch.Tensor, pd_max: float, threshold: float) -> bool:
    """True when the image has no usable signal: ``max <= threshold * max(PD)``, or a non-finite maximum."""
    peak = float(_plain(image).amax())
    return not math.isfinite(peak) or peak <= threshold * pd_max


def _draw_protocol(
    simulate_fn: Any,
    *,
    first: SequenceSample | None,
    preset: str,
    sequences: Sequence[str],
    generator: torch.Generator,
    pd_max: float,
    max_tries: int,
    threshold: float,
) -> tuple[SequenceSample, torch.Tensor]:
    """Sample a protocol whose simulated image is not empty.

    The first draw is ``first`` when given, else a sample of one of ``sequences`` (equal probability); an
    empty image (``max <= threshold * max(PD)``; the ``paper`` preset's ranges, e.g. FSE TE up to 3 s, make
    such images) redraws the parameters of the same sequence type, up to ``max_tries`` draws in all, so the
    sequence types keep their probabilities. If every draw is empty, the ``clinical`` preset of that sequence
    is used (a warning says so; its record names the preset).
    """
    sample = (
        first if first is not None else sample_sequence(None, preset=preset, sequences=sequences, generator=generator)
    )
    image = simulate_fn(sample)
    tries = 1
    while _is_empty(image, pd_max, threshold) and tries < max_tries:
        sample = sample_sequence(sample.name, preset=preset, generator=generator)
        image = simulate_fn(sample)
        tries += 1
    if _is_empty(image, pd_max, threshold):
        fallback = preset != "clinical"
        warnings.warn(
            f"{max_tries} {preset!r} {sample.name} protocols gave empty images"
            + ("; using the clinical preset" if fallback else " (check the qMRI maps and their units)"),
            RuntimeWarning,
            stacklevel=3,
        )
        if fallback:
            sample = sample_sequence(sample.name, preset="clinical", generator=generator)
            image = simulate_fn(sample)
    return sample, image


# ------------------------------------------------------------------------------------------------------------
# Simulation of one contrast
# ------------------------------------------------------------------------------------------------------------
class RandSimulateSequenced(MapTransform, RandomizableTransform):
    """Simulate one MRI contrast ``(1, X, Y, Z)`` from qMRI maps with a randomly sampled protocol.

    Steps: sample a protocol (:func:`custom.sequences.sample_sequence`, each of ``sequences`` equally likely),
    multiply by a smooth random receive field ``B1 = exp(polynomial_log_field)`` and simulate (Appendix A
    eqs. 1-4, magnitude, NaN/inf -> 0), redraw the protocol when the image is empty (see ``max_tries``), add
    Rician noise (eq. 5), and scale so the 99.5th percentile inside the brain is 1.

    Args:
        map_keys: keys of the separate maps PD (fraction), R1 (1/s), R2* (1/s), MT (fraction), each
            ``(1, X, Y, Z)``. Ignored when ``qmri_key`` is given.
        qmri_key: key of one ``(4, X, Y, Z)`` image with channels PD, R1, R2*, MT (a 5th channel is R2, 1/s).
        r2_key: key of an optional R2 map (1/s), used by FSE and FLAIR when present (else R2*; NOTES.md).
        output_key: where the image goes. ``data[f"{output_key}_sequence"]`` gets the protocol record.
        sequences: the sequence types to draw from (subset of ``custom.sequences.SEQUENCES``).
        preset: ``"paper"`` (Appendix A) or ``"clinical"`` parameter distributions.
        b1_field: strength of the receive field: the coefficients of a degree-``b1_degree`` Legendre
            polynomial log-field are U(-b1_field, b1_field). With the defaults (0.1, degree 2) the field spans
            about 0.85-1.2 between its 1st and 99th percentiles over the volume (``0.2``: about 0.7-1.5).
            ``0`` gives B1 = 1.
        b1_degree: polynomial degree of the log-field (2: 9 coefficients).
        noise: range ``(low, high)`` of the Rician noise sigma as a fraction of the clean image's 99.5th
            percentile inside the brain; sigma is drawn uniformly from it. ``None`` or ``(0, 0)``: no noise.
        mask_key: optional brain mask key (``> 0`` is brain); without it the brain is ``PD > 0``.
        normalize: divide by the clean image's 99.5th percentile inside the brain (so it maps to 1).
        percentile: the percentile used for the normalisation and the noise scale.
        fixed_sample: a ``SequenceSample`` (or its record dict) to replay instead of sampling; no redraw.
        clean_key: if given, the noise-free (normalised) image is also stored there.
        max_tries: protocol draws before falling back to the clinical preset (see :func:`_draw_protocol`).
        empty_threshold: an image whose maximum is at most this fraction of max(PD) counts as empty.
        allow_missing_keys: passed to ``MapTransform``.

    The output is float32 on the maps' device, a MetaTensor with the PD map's affine and
    ``meta["sequence"]`` = the record (when metadata tracking is on).
    """

    def __init__(
        self,
        map_keys: Sequence[Hashable] = MAP_KEYS,
        qmri_key: Hashable | None = None,
        r2_key: Hashable | None = "r2",
        output_key: Hashable = "image",
        sequences: Sequence[str] = SEQUENCES,
        preset: str = "paper",
        b1_field: float = 0.1,
        b1_degree: int = 2,
        noise: tuple[float, float] | None = (0.0, 0.05),
        mask_key: Hashable | None = None,
        normalize: bool = True,
        percentile: float = 99.5,
        fixed_sample: SequenceSample | Mapping[str, Any] | None = None,
        clean_key: Hashable | None = None,
        max_tries: int = 10,
        empty_threshold: float = 1e-6,
        allow_missing_keys: bool = False,
    ) -> None:
        keys = [qmri_key] if qmri_key is not None else list(map_keys)
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.map_keys = tuple(map_keys)
        self.qmri_key = qmri_key
        self.r2_key = r2_key
        self.output_key = output_key
        self.sequences = tuple(sequences)
        self.preset = preset
        self.b1_field = float(b1_field)
        self.b1_degree = int(b1_degree)
        self.noise = tuple(noise) if noise is not None else (0.0, 0.0)
        if self.noise[0] < 0 or self.noise[1] < self.noise[0]:
            raise ValueError(f"noise must be a range (low, high) with 0 <= low <= high, got {noise}")
        self.mask_key = mask_key
        self.normalize = normalize
        self.percentile = percentile
        self.fixed_sample = _as_sample(fixed_sample)
        self.clean_key = clean_key
        self.max_tries = max(int(max_tries), 1)
        self.empty_threshold = float(empty_threshold)
        sample_sequence(self.sequences[0], preset=preset, generator=0)  # validates preset and names early
        self._seq_seed = 0
        self._b1_coeffs: list[float] | None = None
        self._noise_fraction = 0.0
        self._noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the protocol seed, the B1 coefficients, the noise level and the noise seed from ``self.R``."""
        super().randomize(None)
        self._seq_seed = int(self.R.randint(_SEED_HIGH))
        n_terms = len(_poly_terms(self.b1_degree))
        coeffs = self.R.uniform(-self.b1_field, self.b1_field, n_terms) if self.b1_field > 0 else None
        self._b1_coeffs = None if coeffs is None else [float(c) for c in coeffs]
        self._noise_fraction = float(self.R.uniform(*self.noise)) if self.noise[1] > 0 else 0.0
        self._noise_seed = int(self.R.randint(_SEED_HIGH))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        maps = QMRIMaps.from_data(d, self.map_keys, self.qmri_key, self.r2_key)
        ref = maps.pd
        device = ref.device
        b1: torch.Tensor | float = 1.0
        if self._b1_coeffs is not None:
            field = polynomial_log_field(
                self._b1_coeffs, maps.spatial_shape, degree=self.b1_degree, device=device, dtype=ref.dtype
            )
            b1 = torch.exp(field).unsqueeze(0)
        pd_max = float(_plain(maps.pd).amax())
        if not pd_max > 0:
            raise ValueError("RandSimulateSequenced: the PD map has no positive value")
        if self.fixed_sample is not None:
            sample, clean = self.fixed_sample, maps.simulate(self.fixed_sample, b1)
            if _is_empty(clean, pd_max, self.empty_threshold):
                warnings.warn(f"replayed protocol {sample} gives an empty image", RuntimeWarning, stacklevel=2)
        else:
            sample, clean = _draw_protocol(
                lambda s: maps.simulate(s, b1),
                first=None,
                preset=self.preset,
                sequences=self.sequences,
                generator=_torch_generator(self._seq_seed, torch.device("cpu")),
                pd_max=pd_max,
                max_tries=self.max_tries,
                threshold=self.empty_threshold,
            )
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        region = _region(maps.pd, mask)
        ref_level = robust_max(clean, region, self.percentile)
        image = clean
        if self._noise_fraction > 0:
            sigma = self._noise_fraction * ref_level
            image = physics.rician_noise(clean, sigma, _torch_generator(self._noise_seed, device))
        if self.normalize:
            scale = torch.clamp(ref_level, min=torch.finfo(ref_level.dtype).tiny)
            image, clean = image / scale, clean / scale
        record = sequence_record(sample)
        out = _like(image.float(), ref)
        if isinstance(out, MetaTensor):
            out.meta["sequence"] = dict(record)
        d[self.output_key] = out
        d[f"{self.output_key}_sequence"] = record
        if self.clean_key is not None:
            d[self.clean_key] = _like(clean.float(), ref)
        return d


# ------------------------------------------------------------------------------------------------------------
# Augmentations: torch-native replacements for MONAI transforms that go through NumPy
# ------------------------------------------------------------------------------------------------------------
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
            n = len(_poly_terms(self.degree))
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
            self._seed = int(self.R.randint(_SEED_HIGH))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for i, key in enumerate(self.key_iterator(d)):
            img = d[key]
            g = _torch_generator(self._seed + i, img.device)
            d[key] = _like(physics.rician_noise(_plain(img), self._sigma, g), img)
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
            data; default ``ceil(patch / 8)`` (covers a 15 deg rotation about one axis).
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
    if margin is None:
        margins = tuple(int(math.ceil(p / 8)) for p in patch)
    else:
        margins = tuple(int(m) for m in ensure_tuple_rep(margin, 3))
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


# ------------------------------------------------------------------------------------------------------------
# Contrastive views
# ------------------------------------------------------------------------------------------------------------
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
            margin = aug_kwargs.get("margin")
            margins = (
                tuple(int(math.ceil(p / 8)) for p in self.patch_size)
                if margin is None
                else tuple(int(m) for m in ensure_tuple_rep(margin, 3))
            )
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
        self._seq_seed = int(self.R.randint(_SEED_HIGH))
        n_terms = len(_poly_terms(self.b1_degree))
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
        s = _subsample_stride(full)
        sub = maps.map(lambda t: _plain(t)[:, ::s, ::s, ::s])
        region = _region(maps.pd, mask)[:, ::s, ::s, ::s]
        pd_max = float(_plain(maps.pd).amax())
        if not pd_max > 0:
            raise ValueError("ContrastiveViewsd: the PD map has no positive value")
        g = _torch_generator(self._seq_seed, torch.device("cpu"))
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
            scale = torch.clamp(robust_max(image, region, self.percentile), min=torch.finfo(image.dtype).tiny)
            sources.append(_Source(sample, coeffs, scale))
        return sources if len(sources) == 2 else sources * 2

    def _real_source(self, image: torch.Tensor, mask: torch.Tensor | None) -> list[_Source]:
        s = _subsample_stride(image.shape[1:])
        img = _plain(image)
        region = (_plain(mask) > 0 if mask is not None else img > 0)[:, ::s, ::s, ::s]
        scale = torch.clamp(robust_max(img[:, ::s, ::s, ::s], region, self.percentile), min=1e-12)
        return [_Source(None, None, scale)] * 2

    # -- one view --------------------------------------------------------------------------------------------
    def _view(
        self, src: _Source, region: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], full: tuple[int, ...]
    ) -> tuple[Any, Any]:
        """One view and its clean target, cropped from ``region`` (``inputs`` is the whole volume)."""
        cropped = self.augment.crop(dict(region))
        if src.sample is None:
            ref = cropped[_IMAGE]
            image = _plain(ref).float()
        else:
            maps = QMRIMaps.from_dict({k: cropped[k] for k in QMRIMaps.NAMES if k in cropped})
            ref = maps.pd
            offset = _voxel_offset(inputs["pd"], ref)
            kw: dict[str, Any] = {"offset": offset, "full_shape": full} if offset is not None else {}
            b1 = self._b1_field(src.b1_coeffs, maps.spatial_shape, _plain(ref), **kw)
            image = maps.simulate(src.sample, b1)
        clean = normalise_view(image, self.view_norm, src.scale)
        # the target is taken after the spatial and before the intensity augmentations (authors' code)
        target = self.augment.spatial({_IMAGE: _like(clean.float(), ref)})[_IMAGE]
        view = self.augment.artefacts({_IMAGE: target})[_IMAGE]
        if view is target:  # every artefact skipped: keep the two outputs distinct tensors
            view = target.clone()
        if self.zscore:
            view, target = (_like(zscore(t), t) for t in (view, target))
        return view, target

    def _clipped(self, maps: QMRIMaps, mask: torch.Tensor | None) -> QMRIMaps:
        """The maps clamped to their ``clip_maps`` percentiles inside the brain region (background kept)."""
        if self.clip_maps is None:
            return maps
        region = _region(maps.pd, mask)
        low, high = self.clip_maps

        def clip(m: torch.Tensor) -> torch.Tensor:
            plain = _plain(m)
            inside = region.expand_as(plain)
            return _like(torch.where(inside, clip_to_percentiles(plain, low, high, inside), plain), m)

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
            inputs = {_IMAGE: _as_meta(real)}
            full = tuple(real.shape[1:])
        else:
            maps = self._clipped(QMRIMaps.from_data(d, self.map_keys, self.qmri_key, self.r2_key), mask)
            sources = self._simulated_sources(maps, mask)
            inputs = {k: _as_meta(v) for k, v in maps.as_dict().items()}
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
            d[f"{vkey}_affine"] = _view_affine(view)
        if not self.keep_inputs:
            for key in (*self.keys, self.r2_key, self.mprage_key, self.mask_key):
                if key is not None:
                    d.pop(key, None)
        return d

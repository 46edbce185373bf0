"""Simulation of one MRI contrast from qMRI maps (paper Sec. 3.2, Appendix A).

* :class:`QMRIMaps` - the qMRI maps of one subject read from a data dict (separate keys or one multi-channel
  image), with a noise-free simulation of a sampled protocol.
* :class:`RandSimulateSequenced` - one contrast image from qMRI maps: a sampled protocol
  (:mod:`custom.sequences`), a smooth random receive field B1, Rician noise, intensity normalisation, and a
  guard against the empty images that the paper's wide parameter ranges produce.

Units: qMRI maps are PD and MT as fractions in [0, 1] and R1, R2*, R2 in 1/s (convert hMRI percent units when
loading). Sequence parameters are recorded in seconds and radians (:mod:`custom.transforms.records`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from custom import physics
from custom.fields import poly_terms, polynomial_log_field, region_percentile
from custom.sequences import SEQUENCES, SequenceSample, sample_sequence, simulate
from custom.transforms._common import SEED_HIGH, brain_region, like, plain, torch_generator
from custom.transforms.records import _as_sample, _draw_protocol, _is_empty, sequence_record

__all__ = ["MAP_KEYS", "QMRIMaps", "RandSimulateSequenced"]

MAP_KEYS: tuple[str, ...] = ("pd", "r1", "r2s", "mt")
"""Default data keys of the separate qMRI maps (PD, R1, R2*, MT); channel order of a 4-channel qMRI image."""


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

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QMRIMaps:
        """Apply ``fn`` to every map (e.g. a strided subsample, or dropping the MONAI metadata)."""
        return QMRIMaps.from_dict({k: fn(v) for k, v in self.as_dict().items()})

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.pd.shape[1:])

    def simulate(self, sample: SequenceSample, b1: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Noise-free magnitude image ``(1, X, Y, Z)`` (plain tensor) of ``sample`` with receive field b1."""
        p = self.map(plain)
        return simulate(sample, p.pd, p.r1, p.r2s, p.mt, r2=p.r2, b1=b1)


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
        r2_key: key of an optional R2 map (1/s), used by FSE and FLAIR when present (else R2*; docs/paper-notes.md).
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
        self._seq_seed = int(self.R.randint(SEED_HIGH))
        n_terms = len(poly_terms(self.b1_degree))
        coeffs = self.R.uniform(-self.b1_field, self.b1_field, n_terms) if self.b1_field > 0 else None
        self._b1_coeffs = None if coeffs is None else [float(c) for c in coeffs]
        self._noise_fraction = float(self.R.uniform(*self.noise)) if self.noise[1] > 0 else 0.0
        self._noise_seed = int(self.R.randint(SEED_HIGH))

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
        pd_max = float(plain(maps.pd).amax())
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
                generator=torch_generator(self._seq_seed, torch.device("cpu")),
                pd_max=pd_max,
                max_tries=self.max_tries,
                threshold=self.empty_threshold,
            )
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        region = brain_region(maps.pd, mask)
        ref_level = region_percentile(clean, region, self.percentile)
        image = clean
        if self._noise_fraction > 0:
            sigma = self._noise_fraction * ref_level
            image = physics.rician_noise(clean, sigma, torch_generator(self._noise_seed, device))
        if self.normalize:
            scale = torch.clamp(ref_level, min=torch.finfo(ref_level.dtype).tiny)
            image, clean = image / scale, clean / scale
        record = sequence_record(sample)
        out = like(image.float(), ref)
        if isinstance(out, MetaTensor):
            out.meta["sequence"] = dict(record)
        d[self.output_key] = out
        d[f"{self.output_key}_sequence"] = record
        if self.clean_key is not None:
            d[self.clean_key] = like(clean.float(), ref)
        return d

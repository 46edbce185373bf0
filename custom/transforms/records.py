"""Records of sampled protocols, and drawing a protocol whose simulated image is not empty.

Recorded protocols: the sampled protocol of an image is stored as a plain dict (``SequenceSample.to_dict()``,
see :func:`sequence_record`) both in ``data[f"{output_key}_sequence"]`` and in the output MetaTensor's
``meta["sequence"]``. To let a DataLoader collate a batch that mixes sequence types, the dict always carries
every parameter name of :data:`PARAM_NAMES` (times in s, angles in rad, ``n`` a count, ``efficiency`` a
fraction), with NaN for the parameters that the sequence does not have. ``SequenceSample.from_dict(record)``
(or :func:`sample_from_record`, which drops the NaN entries) rebuilds the protocol, and
``RandSimulateSequenced(fixed_sample=...)`` replays it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from custom.sequences import PARAM_NAMES, SequenceSample, sample_sequence
from custom.transforms._common import plain

__all__ = ["PARAM_NAMES", "sequence_record", "sample_from_record"]

# PARAM_NAMES (re-exported): every protocol parameter name of :mod:`custom.sequences` (times in s, angles in rad,
# ``n`` a count, ``efficiency`` a fraction); kept in one place so a new sequence family cannot break collation.


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
    """``value`` as a ``SequenceSample``: a sample or ``None`` as it is, a record dict rebuilt."""
    if value is None or isinstance(value, SequenceSample):
        return value
    return sample_from_record(value)


def _is_empty(image: torch.Tensor, pd_max: float, threshold: float) -> bool:
    """True when the image has no usable signal: ``max <= threshold * max(PD)``, or a non-finite maximum."""
    peak = float(plain(image).amax())
    return not math.isfinite(peak) or peak <= threshold * pd_max


def _draw_protocol(
    simulate_fn: Callable[[SequenceSample], torch.Tensor],
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

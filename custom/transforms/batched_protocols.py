"""Protocols for a batch of views: vectorised sampling and grouped, batched simulation.

The batched view generator (:mod:`custom.transforms.batched`) draws one protocol per *slot* (``seqinv``: one per
view; ``seqaug`` / ``base``: one per subject, shared by its two views) and simulates every view of a batch with as
many calls of the signal equations as there are sequence types in it, each call with 1-D parameter tensors (one
value per view; :mod:`custom.physics` broadcasts them).

Distributions are those of :data:`custom.sequences.PRESETS`, drawn for ``n`` slots at once: the same marginal
laws as :func:`custom.sequences.sample_sequence` (including the ``clinical`` preset's TE < TR rejection and the
derived MPRAGE delay TD), from a different random stream (a vectorised draw does not consume the generator in
the order of ``n`` scalar draws). Parameters are float64 tensors on the CPU (times in s, angles in rad); a
parameter that a sequence does not have is NaN, as in :func:`custom.transforms.records.sequence_record`.

:func:`simulate_family` mirrors :func:`custom.sequences.simulate` branch by branch for batched parameters; a test
checks them against each other for every family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from custom import physics
from custom.sequences import (
    _MAX_REJECTIONS,
    PARAM_NAMES,
    TE_BELOW_TR,
    Degrees,
    IntUniform,
    Log10Normal,
    LogUniform,
    Normal,
    Uniform,
    _check_names,
    _check_preset,
    _mprage_model,
)
from custom.transforms.batched_augment import to_device

__all__ = ["MAP_CHANNELS", "SEQUENCE_CHANNELS", "ProtocolBatch", "sample_params", "simulate_family"]

MAP_CHANNELS: tuple[str, ...] = ("pd", "r1", "r2s", "mt", "r2")
"""Channel order of the stacked qMRI maps the batched path carries (R2 is a copy of R2* when no R2 map exists,
which simulates exactly as :func:`custom.sequences.simulate` without one)."""

SEQUENCE_CHANNELS: dict[str, tuple[str, ...]] = {
    "fse": ("pd", "r1", "r2"),
    "flair": ("pd", "r1", "r2"),
    "gre": ("pd", "r1", "r2s", "mt"),
    "spgr": ("pd", "r1", "r2s"),
    "mp2rage": ("pd", "r1"),
    "mprage": ("pd", "r1"),
}
"""The maps each sequence family reads (only these are cut from the region for its views)."""

_F64 = torch.float64


def _draw(dist: object, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` samples of one distribution of :data:`custom.sequences.PRESETS` (float64, CPU)."""
    if isinstance(dist, Degrees):
        return torch.deg2rad(_draw(dist.dist, n, g))
    if isinstance(dist, Uniform):
        return dist.low + (dist.high - dist.low) * torch.rand(n, generator=g, dtype=_F64)
    if isinstance(dist, LogUniform):
        lo, hi = math.log10(dist.low), math.log10(dist.high)
        return torch.pow(10.0, lo + (hi - lo) * torch.rand(n, generator=g, dtype=_F64))
    if isinstance(dist, Normal):
        return (dist.mean + dist.std * torch.randn(n, generator=g, dtype=_F64)).abs()
    if isinstance(dist, Log10Normal):
        return torch.pow(10.0, math.log10(dist.median) + dist.decades * torch.randn(n, generator=g, dtype=_F64))
    if isinstance(dist, IntUniform):
        return torch.randint(dist.low, dist.high + 1, (n,), generator=g).to(_F64)
    raise TypeError(f"no vectorised sampler for {type(dist).__name__}")


def sample_params(name: str, preset: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` protocols of one sequence family: ``{param: (n,) float64}`` (only the family's parameters).

    Same laws as :func:`custom.sequences.sample_sequence`: the preset's distributions, redraws of the protocols
    whose TE is not below TR where the preset asks for it (``clinical``), and MPRAGE's TD derived from TR, TI, TX
    and n (:func:`custom.physics.mprage_delay_time`).
    """
    table = _check_preset(preset)[_check_names([name])[0]]
    params = {k: _draw(dist, n, generator) for k, dist in table.items()}
    if TE_BELOW_TR.get(preset, False):
        for _ in range(_MAX_REJECTIONS):
            bad = params["te"] >= params["tr"]
            count = int(bad.sum())
            if count == 0:
                break
            redraw = {k: _draw(dist, count, generator) for k, dist in table.items()}
            for k in params:
                params[k][bad] = redraw[k]
    if name == "mprage":
        params["td"] = physics.mprage_delay_time(params["tr"], params["ti"], params["tx"], params["n"])
    return params


@dataclass
class ProtocolBatch:
    """One protocol per slot: sequence names, presets (the record's preset: ``paper``, ``clinical`` or ``real``)
    and every parameter of :data:`custom.sequences.PARAM_NAMES` as a ``(P,)`` float64 CPU tensor (NaN where the
    slot's sequence has no such parameter)."""

    names: list[str]
    presets: list[str]
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, count: int, preset: str) -> ProtocolBatch:
        nan = {k: torch.full((count,), math.nan, dtype=_F64) for k in PARAM_NAMES}
        return cls(names=["mprage"] * count, presets=[preset] * count, params=nan)

    def __len__(self) -> int:
        return len(self.names)

    def draw(self, slots: Sequence[int], names: Sequence[str], preset: str, generator: torch.Generator) -> None:
        """(Re)draw the protocols of ``slots`` (sequence ``names[i]`` for ``slots[i]``) from ``preset``."""
        slots, names = list(slots), list(names)
        for name in dict.fromkeys(names):
            idx = [s for s, nm in zip(slots, names, strict=True) if nm == name]
            drawn = sample_params(name, preset, len(idx), generator)
            index = torch.tensor(idx, dtype=torch.long)
            for k in PARAM_NAMES:
                self.params[k][index] = drawn[k] if k in drawn else math.nan
            for s in idx:
                self.names[s] = name
                self.presets[s] = preset

    def record(self, slots: Sequence[int]) -> dict[str, object]:
        """The records of ``slots`` as a DataLoader would collate :func:`~custom.transforms.records.sequence_record`
        dicts: ``sequence`` and ``preset`` lists, every parameter a ``(len(slots),)`` float64 tensor."""
        index = torch.tensor(list(slots), dtype=torch.long)
        return {
            "sequence": [self.names[s] for s in slots],
            "preset": [self.presets[s] for s in slots],
            **{k: self.params[k][index].clone() for k in PARAM_NAMES},
        }

    def family_params(self, slots: Sequence[int], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The parameters of ``slots`` (one family) as ``(len(slots),)`` tensors on ``device``, NaN ones left out
        (moved in one transfer)."""
        index = torch.tensor(list(slots), dtype=torch.long)
        values = {k: self.params[k][index] for k in PARAM_NAMES}
        keys = [k for k, v in values.items() if not bool(torch.isnan(v).any())]
        moved = to_device(torch.stack([values[k] for k in keys]), device, dtype)
        return {k: moved[i] for i, k in enumerate(keys)}

    def subset(self, entries: Sequence[int]) -> ProtocolBatch:
        """A new batch of the protocols at ``entries`` (in that order)."""
        index = torch.tensor(list(entries), dtype=torch.long)
        return ProtocolBatch(
            names=[self.names[e] for e in entries],
            presets=[self.presets[e] for e in entries],
            params={k: v[index].clone() for k, v in self.params.items()},
        )


def simulate_family(
    name: str,
    params: Mapping[str, torch.Tensor],
    maps: Mapping[str, torch.Tensor],
    b1: torch.Tensor | float = 1.0,
    mprage_model: str | None = None,
) -> torch.Tensor:
    """Noise-free magnitude images of ``n`` protocols of one family, batched (:func:`custom.sequences.simulate`).

    Args:
        name: the sequence family.
        params: ``{parameter: (n,) tensor}`` in SI units (s, rad), on the maps' device.
        maps: ``{channel: (n, 1, *S)}`` for the channels of :data:`SEQUENCE_CHANNELS` ``[name]`` (``r2`` read by FSE
            and FLAIR, which is R2* where the data has no R2 map).
        b1: receive field, scalar or ``(n, 1, *S)``.
        mprage_model: as in :func:`custom.sequences.simulate` (default :data:`custom.sequences.MPRAGE_MODEL`).

    Returns ``(n, 1, *S)``, NaN/inf replaced by 0, absolute value taken (a magnitude image).
    """
    model = _mprage_model(mprage_model)
    p = params
    pd, r1 = maps["pd"], maps["r1"]
    if name == "fse":
        out = physics.fse(pd, r1, maps["r2"], tr=p["tr"], te=p["te"], b1=b1)
    elif name == "flair":
        out = physics.flair(pd, r1, maps["r2"], tr=p["tr"], te=p["te"], ti=p["ti"], b1=b1)
    elif name == "gre":
        out = physics.gre(pd, r1, maps["r2s"], maps["mt"], tr=p["tr"], te=p["te"], flip=p["flip"], b1=b1)
    elif name == "spgr":
        zeros = torch.zeros_like(pd)
        out = physics.gre(pd, r1, maps["r2s"], zeros, tr=p["tr"], te=p["te"], flip=p["flip"], b1=b1)
    elif name == "mp2rage":
        keys = ("tr", "ti1", "ti2", "tx", "flip1", "flip2", "n")
        out = physics.mp2rage(pd, r1, **{k: p[k] for k in keys}, efficiency=p.get("efficiency", 1.0), b1=b1)
    elif name == "mprage" and model == "inversion":
        timing = {k: p[k] for k in ("tr", "ti", "tx", "flip", "n")}
        out = physics.mprage_inversion(pd, r1, **timing, efficiency=p.get("efficiency", 1.0), b1=b1)
    elif name == "mprage":
        td = p["td"] if "td" in p else physics.mprage_delay_time(p["tr"], p["ti"], p["tx"], p["n"])
        out = physics.mprage(pd, r1, tr=p["tr"], tx=p["tx"], td=td, flip=p["flip"], n=p["n"], b1=b1)
    else:
        raise ValueError(f"unknown sequence {name!r}; expected one of {tuple(SEQUENCE_CHANNELS)}")
    if torch.is_grad_enabled() and out.requires_grad:
        return torch.nan_to_num(out.abs(), nan=0.0, posinf=0.0, neginf=0.0)
    out = out.abs_()  # the equations return a fresh tensor: finish it in place
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0, out=out)

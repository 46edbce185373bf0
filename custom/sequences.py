"""Distributions of MRI sequence parameters, their sampling, and simulation of a sampled sequence.

Two presets:

* ``paper``: Appendix A of the paper as printed, with the resolutions of NOTES.md (MPRAGE TR ~ N(2.3, 0.23) s;
  FLAIR TE log10-normal around 20 ms with 0.1 decades spread; MPRAGE n ~ U(100, 200); flip angles sampled in
  degrees and stored in radians; TD derived with :func:`custom.physics.mprage_delay_time`).
* ``clinical``: narrower ranges typical of clinical 3 T protocols (T1w MPRAGE, T2w/PDw FSE, CSF-nulled FLAIR,
  spoiled GRE), following the narrower ranges in the authors' code where it has them.

A :class:`SequenceSample` records the sequence name and every parameter in SI units (seconds, radians), can be
turned into a plain dict for logging and rebuilt from it to replay a simulation exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from custom import physics

__all__ = [
    "SEQUENCES",
    "PRESETS",
    "SequenceSample",
    "Uniform",
    "LogUniform",
    "Normal",
    "Log10Normal",
    "as_generator",
    "sample_sequence",
    "sample_distinct_sequences",
    "simulate",
]

SEQUENCES: tuple[str, ...] = ("fse", "gre", "flair", "mprage")


def as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from an int seed, an existing generator, or ``None`` (non-deterministic)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _uniform01(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def _normal01(g: torch.Generator) -> float:
    return float(torch.randn((), generator=g, dtype=torch.float64))


@dataclass(frozen=True)
class Uniform:
    """U(low, high)."""

    low: float
    high: float

    def sample(self, g: torch.Generator) -> float:
        return self.low + (self.high - self.low) * _uniform01(g)


@dataclass(frozen=True)
class LogUniform:
    """10^U(log10 low, log10 high)."""

    low: float
    high: float

    def sample(self, g: torch.Generator) -> float:
        lo, hi = math.log10(self.low), math.log10(self.high)
        return 10.0 ** (lo + (hi - lo) * _uniform01(g))


@dataclass(frozen=True)
class Normal:
    """|N(mean, std)| (absolute value, as the paper constrains samples to plausible, positive values)."""

    mean: float
    std: float

    def sample(self, g: torch.Generator) -> float:
        return abs(self.mean + self.std * _normal01(g))


@dataclass(frozen=True)
class Log10Normal:
    """10^N(log10 median, decades): log-normal around ``median`` with a spread of ``decades``."""

    median: float
    decades: float

    def sample(self, g: torch.Generator) -> float:
        return 10.0 ** (math.log10(self.median) + self.decades * _normal01(g))


@dataclass(frozen=True)
class Degrees:
    """Wraps a distribution sampled in degrees; the sample is returned in radians."""

    dist: Uniform | LogUniform | Normal

    def sample(self, g: torch.Generator) -> float:
        return math.radians(self.dist.sample(g))


@dataclass(frozen=True)
class IntUniform:
    """Integer uniform on [low, high] inclusive (returned as a float for uniform storage)."""

    low: int
    high: int

    def sample(self, g: torch.Generator) -> float:
        return float(torch.randint(self.low, self.high + 1, (), generator=g))


Distribution = Uniform | LogUniform | Normal | Log10Normal | Degrees | IntUniform

PRESETS: dict[str, dict[str, dict[str, Distribution]]] = {
    "paper": {
        "fse": {"te": LogUniform(0.001, 3.0), "tr": LogUniform(0.001, 3.0)},
        "gre": {
            "te": LogUniform(0.002, 0.08),
            "tr": LogUniform(0.005, 5.0),
            "flip": Degrees(Uniform(5.0, 50.0)),
        },
        "flair": {"te": Log10Normal(0.02, 0.1), "tr": LogUniform(0.001, 5.0), "ti": LogUniform(0.001, 3.0)},
        "mprage": {
            "tr": Normal(2.3, 0.23),
            "ti": Uniform(0.6, 0.9),
            "tx": Uniform(0.004, 0.008),
            "te": Uniform(0.002, 0.004),
            "flip": Degrees(Uniform(5.0, 12.0)),
            "n": IntUniform(100, 200),
        },
    },
    "clinical": {
        # T2w (long TE) to PDw (short TE) fast spin echo.
        "fse": {"te": Uniform(0.02, 0.15), "tr": Uniform(2.0, 8.0)},
        # spoiled GRE from T1w (short TR, large flip) to T2*w (long TR, long TE, small flip).
        "gre": {
            "te": LogUniform(0.002, 0.08),
            "tr": LogUniform(0.005, 5.0),
            "flip": Degrees(Uniform(5.0, 50.0)),
        },
        # CSF-nulled T2w FLAIR: TI near T1_csf * ln 2 for long TR.
        "flair": {"te": Uniform(0.08, 0.14), "tr": Uniform(8.0, 11.0), "ti": Uniform(2.2, 2.5)},
        "mprage": {
            "tr": Uniform(2.0, 2.5),
            "ti": Uniform(0.8, 1.0),
            "tx": Uniform(0.005, 0.008),
            "te": Uniform(0.002, 0.004),
            "flip": Degrees(Uniform(7.0, 10.0)),
            "n": IntUniform(128, 192),
        },
    },
}


# Presets that reject samples whose echo time is not shorter than the repetition time. The paper preset keeps
# its printed marginal distributions, so it allows TE >= TR (an implausible protocol, but the paper's).
TE_BELOW_TR: dict[str, bool] = {"paper": False, "clinical": True}
_MAX_REJECTIONS = 1000


@dataclass(frozen=True)
class SequenceSample:
    """One sampled protocol: a sequence name and its parameters in SI units (s, rad; ``n`` a count)."""

    name: str
    params: Mapping[str, float] = field(default_factory=dict)
    preset: str = "custom"

    def __post_init__(self) -> None:
        if self.name not in SEQUENCES:
            raise ValueError(f"unknown sequence {self.name!r}; expected one of {SEQUENCES}")
        object.__setattr__(self, "params", {k: float(v) for k, v in dict(self.params).items()})

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable record (for metadata and logs)."""
        return {"sequence": self.name, "preset": self.preset, **self.params}

    @classmethod
    def from_dict(cls, record: Mapping[str, object]) -> SequenceSample:
        """Rebuild a sample from :meth:`to_dict` output (to replay a simulation)."""
        rec = dict(record)
        name = str(rec.pop("sequence"))
        preset = str(rec.pop("preset", "custom"))
        return cls(name=name, params={k: float(v) for k, v in rec.items()}, preset=preset)

    def __str__(self) -> str:
        def fmt(k: str, v: float) -> str:
            if k == "flip":
                return f"flip={math.degrees(v):.1f}deg"
            if k == "n":
                return f"n={int(v)}"
            return f"{k}={v * 1000:.1f}ms"

        return f"{self.name.upper()}(" + ", ".join(fmt(k, v) for k, v in sorted(self.params.items())) + ")"


def _check_preset(preset: str) -> dict[str, dict[str, Distribution]]:
    if preset not in PRESETS:
        raise ValueError(f"unknown sequence preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_names(sequences: Sequence[str]) -> tuple[str, ...]:
    names = tuple(s.lower() for s in sequences)
    bad = [s for s in names if s not in SEQUENCES]
    if bad or not names:
        raise ValueError(f"unknown or empty sequence list {list(sequences)}; choose from {SEQUENCES}")
    return names


def sample_sequence(
    name: str | None = None,
    *,
    preset: str = "paper",
    sequences: Sequence[str] = SEQUENCES,
    generator: int | torch.Generator | None = None,
) -> SequenceSample:
    """Sample one protocol.

    Args:
        name: the sequence to sample; ``None`` picks one of ``sequences`` with equal probability.
        preset: ``"paper"`` or ``"clinical"``.
        sequences: candidates when ``name`` is None.
        generator: an int seed or a ``torch.Generator`` (``None``: non-deterministic).
    """
    table = _check_preset(preset)
    g = as_generator(generator)
    if name is None:
        names = _check_names(sequences)
        name = names[int(torch.randint(len(names), (), generator=g))]
    name = _check_names([name])[0]
    params = {k: dist.sample(g) for k, dist in table[name].items()}
    for _ in range(_MAX_REJECTIONS):
        if not TE_BELOW_TR.get(preset, False) or params["te"] < params["tr"]:
            break
        params = {k: dist.sample(g) for k, dist in table[name].items()}
    if name == "mprage":
        params["td"] = physics.mprage_delay_time(params["tr"], params["ti"], params["tx"], params["n"])
    return SequenceSample(name=name, params=params, preset=preset)


def sample_distinct_sequences(
    count: int = 2,
    *,
    preset: str = "paper",
    sequences: Sequence[str] = SEQUENCES,
    generator: int | torch.Generator | None = None,
) -> list[SequenceSample]:
    """Sample ``count`` protocols of pairwise different sequence types (for SeqInv views)."""
    names = list(_check_names(sequences))
    if count > len(names):
        raise ValueError(f"cannot draw {count} distinct sequence types from {names}")
    g = as_generator(generator)
    order = torch.randperm(len(names), generator=g)[:count].tolist()
    return [sample_sequence(names[i], preset=preset, generator=g) for i in order]


def simulate(
    sample: SequenceSample,
    pd: torch.Tensor,
    r1: torch.Tensor,
    r2s: torch.Tensor,
    mt: torch.Tensor | None = None,
    *,
    r2: torch.Tensor | None = None,
    b1: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Noise-free magnitude image of ``sample`` from qMRI maps (PD fraction, R1/R2*/R2 in 1/s, MT fraction).

    FSE and FLAIR use the R2 map when one is given, else R2* (NOTES.md). NaN/inf are replaced by 0 and the
    absolute value is taken (a magnitude image).
    """
    p = sample.params
    if sample.name == "fse":
        out = physics.fse(pd, r1, r2 if r2 is not None else r2s, tr=p["tr"], te=p["te"], b1=b1)
    elif sample.name == "flair":
        out = physics.flair(pd, r1, r2 if r2 is not None else r2s, tr=p["tr"], te=p["te"], ti=p["ti"], b1=b1)
    elif sample.name == "gre":
        mt_map = mt if mt is not None else torch.zeros_like(pd)
        out = physics.gre(pd, r1, r2s, mt_map, tr=p["tr"], te=p["te"], flip=p["flip"], b1=b1)
    else:
        td = p.get("td", physics.mprage_delay_time(p["tr"], p["ti"], p["tx"], p["n"]))
        out = physics.mprage(pd, r1, tr=p["tr"], tx=p["tx"], td=td, flip=p["flip"], n=p["n"], b1=b1)
    return torch.nan_to_num(out.abs(), nan=0.0, posinf=0.0, neginf=0.0)

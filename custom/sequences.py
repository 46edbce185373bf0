"""Distributions of MRI sequence parameters, their sampling, and simulation of a sampled sequence.

Two presets:

* ``paper``: Appendix A of the paper as printed, with the resolutions of docs/paper-notes.md (MPRAGE TR
  ~ N(2.3, 0.23) s; FLAIR TE log10-normal around 20 ms with 0.1 decades spread; MPRAGE n ~ U(100, 200); flip
  angles sampled in degrees and stored in radians; TD derived with :func:`custom.physics.mprage_delay_time`).
* ``clinical``: narrower ranges typical of clinical 3 T protocols (T1w MPRAGE, T2w/PDw FSE, CSF-nulled FLAIR,
  spoiled GRE), following the narrower ranges in the authors' code where it has them.

Both presets give MPRAGE an inversion efficiency ~ U(0.8, 1.0) (the authors' code), and :func:`simulate` plays
MPRAGE with its inversion pulse (:func:`custom.physics.mprage_inversion`) unless eq. 4 as printed is asked for
(``mprage_model="eq4"``, or :data:`MPRAGE_MODEL`).

The default sequence list :data:`SEQUENCES` is the paper's four (FSE, GRE, FLAIR, MPRAGE). Two more families of
the authors' code can be named wherever a list of sequences is accepted (:data:`ALL_SEQUENCES`): ``mp2rage``
(the UNI image, :func:`custom.physics.mp2rage`) and ``spgr`` (a short-TR spoiled gradient echo: eq. 2 with
MT = 0).

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
    "ALL_SEQUENCES",
    "PARAM_NAMES",
    "MPRAGE_MODELS",
    "MPRAGE_MODEL",
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
"""The default sequence list: the four families of the paper."""

ALL_SEQUENCES: tuple[str, ...] = (*SEQUENCES, "mp2rage", "spgr")
"""Every sequence family that can be sampled and simulated (the six of the authors' code); opt-in by name."""

PARAM_NAMES: tuple[str, ...] = ("tr", "te", "ti", "tx", "td", "flip", "n", "efficiency", "ti1", "ti2", "flip1", "flip2")
"""Every parameter name a sampled protocol of any family and preset can have (times in s, flips in rad, ``n`` a
count, ``efficiency`` a fraction): records that must share keys (collated batches) fill the others with NaN."""

MPRAGE_MODELS: tuple[str, ...] = ("inversion", "eq4")
"""How :func:`simulate` plays MPRAGE: ``"inversion"`` (:func:`custom.physics.mprage_inversion`, the inversion pulse
with the sampled efficiency) or ``"eq4"`` (:func:`custom.physics.mprage`, paper eq. 4 as printed, no inversion)."""

MPRAGE_MODEL: str = "inversion"
"""The MPRAGE model :func:`simulate` uses when its ``mprage_model`` argument is None (one of :data:`MPRAGE_MODELS`).
Set it at start-up (``custom.sequences.MPRAGE_MODEL = "eq4"``) to switch code that calls :func:`simulate` without
the argument, such as the simulation transforms; DataLoader workers started by ``spawn`` re-import the default."""


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
            # inversion efficiency (Mz -> -efficiency Mz): not in the appendix; the authors' code, docs/paper-notes.md.
            "efficiency": Uniform(0.8, 1.0),
        },
        # Not in the paper; opt-in families of the authors' code (ALL_SEQUENCES). MP2RAGE: the code's TI1 and
        # flip ranges and n ~ 160 +- 10 %; TI2 2.2 s +- 10 %; the code's TR of 2.3 s is shorter than TI2 plus half
        # a train (an impossible protocol), so TR is a typical 3 T MP2RAGE TR here, N(5, 0.5) s.
        "mp2rage": {
            "tr": Normal(5.0, 0.5),
            "ti1": Uniform(0.6, 0.9),
            "ti2": Normal(2.2, 0.22),
            "tx": Uniform(0.005, 0.008),
            "te": Uniform(0.002, 0.004),
            "flip1": Degrees(Uniform(3.0, 6.0)),
            "flip2": Degrees(Uniform(3.0, 6.0)),
            "n": IntUniform(144, 176),
            "efficiency": Uniform(0.8, 1.0),
        },
        # SPGR: the code's ranges (as GRE, with TR up to 0.8 s); simulated as eq. 2 with MT = 0.
        "spgr": {
            "te": LogUniform(0.002, 0.08),
            "tr": LogUniform(0.005, 0.8),
            "flip": Degrees(Uniform(5.0, 50.0)),
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
            "efficiency": Uniform(0.8, 1.0),
        },
        # 3 T MP2RAGE (Marques et al. 2010: TR 5 s, TI 0.7 / 2.5 s, flips 4 / 5 deg), both trains fitting in TR.
        "mp2rage": {
            "tr": Uniform(4.5, 5.5),
            "ti1": Uniform(0.7, 0.9),
            "ti2": Uniform(2.3, 2.7),
            "tx": Uniform(0.006, 0.0075),
            "te": Uniform(0.002, 0.004),
            "flip1": Degrees(Uniform(3.0, 5.0)),
            "flip2": Degrees(Uniform(4.0, 6.0)),
            "n": IntUniform(120, 176),
            "efficiency": Uniform(0.8, 1.0),
        },
        # T1w 3D spoiled gradient echo (FLASH / SPGR): short TR and TE, eq. 2 with MT = 0.
        "spgr": {
            "te": Uniform(0.002, 0.010),
            "tr": Uniform(0.005, 0.030),
            "flip": Degrees(Uniform(5.0, 40.0)),
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
        if self.name not in ALL_SEQUENCES:
            raise ValueError(f"unknown sequence {self.name!r}; expected one of {ALL_SEQUENCES}")
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
            if k.startswith("flip"):
                return f"{k}={math.degrees(v):.1f}deg"
            if k == "n":
                return f"n={int(v)}"
            if k == "efficiency":
                return f"{k}={v:.3f}"
            return f"{k}={v * 1000:.1f}ms"

        return f"{self.name.upper()}(" + ", ".join(fmt(k, v) for k, v in sorted(self.params.items())) + ")"


def _check_preset(preset: str) -> dict[str, dict[str, Distribution]]:
    if preset not in PRESETS:
        raise ValueError(f"unknown sequence preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_names(sequences: Sequence[str]) -> tuple[str, ...]:
    names = tuple(s.lower() for s in sequences)
    bad = [s for s in names if s not in ALL_SEQUENCES]
    if bad or not names:
        raise ValueError(f"unknown or empty sequence list {list(sequences)}; choose from {ALL_SEQUENCES}")
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
        name: the sequence to sample (one of :data:`ALL_SEQUENCES`); ``None`` picks one of ``sequences`` with
            equal probability.
        preset: ``"paper"`` or ``"clinical"``.
        sequences: candidates when ``name`` is None (default: the paper's four, :data:`SEQUENCES`).
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


def _mprage_model(mprage_model: str | None) -> str:
    model = MPRAGE_MODEL if mprage_model is None else mprage_model
    if model not in MPRAGE_MODELS:
        raise ValueError(f"unknown MPRAGE model {model!r}; expected one of {MPRAGE_MODELS}")
    return model


def simulate(
    sample: SequenceSample,
    pd: torch.Tensor,
    r1: torch.Tensor,
    r2s: torch.Tensor,
    mt: torch.Tensor | None = None,
    *,
    r2: torch.Tensor | None = None,
    b1: torch.Tensor | float = 1.0,
    mprage_model: str | None = None,
) -> torch.Tensor:
    """Noise-free magnitude image of ``sample`` from qMRI maps (PD fraction, R1/R2*/R2 in 1/s, MT fraction).

    FSE and FLAIR use the R2 map when one is given, else R2* (docs/paper-notes.md). MPRAGE is played with its inversion
    pulse (:func:`custom.physics.mprage_inversion`, efficiency ``params["efficiency"]``, 1.0 for records that
    have none) unless ``mprage_model`` (default :data:`MPRAGE_MODEL`) is ``"eq4"``, paper eq. 4 as printed
    (:func:`custom.physics.mprage`, which ignores the efficiency). Neither has T2* decay. MP2RAGE is the PD-scaled,
    non-negative UNI image (:func:`custom.physics.mp2rage`); SPGR is eq. 2 with MT = 0. NaN/inf are replaced by 0
    and the absolute value is taken (a magnitude image).
    """
    model = _mprage_model(mprage_model)
    p = sample.params
    if sample.name == "fse":
        out = physics.fse(pd, r1, r2 if r2 is not None else r2s, tr=p["tr"], te=p["te"], b1=b1)
    elif sample.name == "flair":
        out = physics.flair(pd, r1, r2 if r2 is not None else r2s, tr=p["tr"], te=p["te"], ti=p["ti"], b1=b1)
    elif sample.name == "gre":
        mt_map = mt if mt is not None else torch.zeros_like(pd)
        out = physics.gre(pd, r1, r2s, mt_map, tr=p["tr"], te=p["te"], flip=p["flip"], b1=b1)
    elif sample.name == "spgr":
        out = physics.gre(pd, r1, r2s, torch.zeros_like(pd), tr=p["tr"], te=p["te"], flip=p["flip"], b1=b1)
    elif sample.name == "mp2rage":
        keys = ("tr", "ti1", "ti2", "tx", "flip1", "flip2", "n")
        out = physics.mp2rage(pd, r1, **{k: p[k] for k in keys}, efficiency=p.get("efficiency", 1.0), b1=b1)
    elif model == "inversion":
        timing = {k: p[k] for k in ("tr", "ti", "tx", "flip", "n")}
        out = physics.mprage_inversion(pd, r1, **timing, efficiency=p.get("efficiency", 1.0), b1=b1)
    else:
        td = p.get("td", physics.mprage_delay_time(p["tr"], p["ti"], p["tx"], p["n"]))
        out = physics.mprage(pd, r1, tr=p["tr"], tx=p["tx"], td=td, flip=p["flip"], n=p["n"], b1=b1)
    return torch.nan_to_num(out.abs(), nan=0.0, posinf=0.0, neginf=0.0)

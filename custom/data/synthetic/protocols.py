"""Fixed acquisition protocols of the synthetic IXI-like sites and the ARC-like dataset.

A :class:`SiteProtocol` is one scanner setup: a fixed :class:`~custom.sequences.SequenceSample` per contrast
(seconds, radians) plus the site's noise level, bias-field strength and intensity scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from custom import physics
from custom.sequences import SequenceSample

__all__ = ["IXI_SITES", "SiteProtocol", "SITE_PROTOCOLS", "ARC_PROTOCOL"]

IXI_SITES: tuple[str, ...] = ("Guys", "HH", "IOP")
"""IXI sites in the order subjects cycle through them (subject k -> site k mod 3)."""


def _deg(x: float) -> float:
    return math.radians(x)


def _mprage(
    name: str, tr: float, ti: float, tx: float, te: float, flip_deg: float, n: int, efficiency: float = 0.95
) -> SequenceSample:
    """A fixed MPRAGE protocol, simulated with its inversion pulse (``efficiency``: Mz -> -efficiency Mz)."""
    td = physics.mprage_delay_time(tr, ti, tx, n)
    params = {"tr": tr, "ti": ti, "tx": tx, "te": te, "flip": _deg(flip_deg), "n": float(n), "td": td}
    params["efficiency"] = efficiency
    return SequenceSample("mprage", params, preset=name)


@dataclass(frozen=True)
class SiteProtocol:
    """A fixed acquisition setup: one protocol per contrast plus the scanner's noise, bias field and scale.

    Attributes:
        scanner: free-text description.
        sequences: contrast name (file suffix) -> fixed :class:`SequenceSample` (seconds, radians).
        noise_fraction: Rician sigma as a fraction of the 99th percentile of the noise-free brain signal.
        bias_rms: RMS of the log of the smooth multiplicative receive (bias) field over the field of view.
        scale: intensity of the brain's 99th percentile in the written image (arbitrary scanner units).
    """

    scanner: str
    sequences: Mapping[str, SequenceSample]
    noise_fraction: float
    bias_rms: float
    scale: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable description (for metadata and the summary)."""
        return {
            "scanner": self.scanner,
            "sequences": {k: v.to_dict() for k, v in self.sequences.items()},
            "noise_fraction": self.noise_fraction,
            "bias_rms": self.bias_rms,
            "scale": self.scale,
        }


SITE_PROTOCOLS: dict[str, SiteProtocol] = {
    # Real IXI: Guys Philips 1.5 T, HH Philips 3 T, IOP GE 1.5 T; T1 3D gradient echo, T2 and PD from a
    # dual-echo FSE. Tissue values here are the 3 T ones for every site; the sites differ in protocol, noise,
    # bias field and intensity scale. T1w: WM > GM > CSF; T2w: CSF > GM > WM; PDw: CSF >= GM > WM, low contrast.
    # The MPRAGE protocols (IOP T1, ARC T1w) are played with the inversion pulse (efficiency 0.95,
    # custom.physics.mprage_inversion): WM/GM about 1.55 and CSF/GM about 0.37 at the tissue means (eq. 4 gave
    # 1.17-1.19 and 0.7); the GRE protocols reach about 1.27-1.31 WM/GM.
    "Guys": SiteProtocol(
        scanner="Philips-like 1.5 T: T1 spoiled 3D GRE, T2/PD dual-echo FSE",
        sequences={
            "T1": SequenceSample("gre", {"tr": 0.015, "te": 0.0046, "flip": _deg(30.0)}, preset="ixi-Guys"),
            "T2": SequenceSample("fse", {"tr": 5.725, "te": 0.100}, preset="ixi-Guys"),
            "PD": SequenceSample("fse", {"tr": 5.725, "te": 0.008}, preset="ixi-Guys"),
        },
        noise_fraction=0.02,
        bias_rms=0.10,
        scale=1000.0,
    ),
    "HH": SiteProtocol(
        scanner="Philips-like 3 T: T1 spoiled 3D GRE, T2/PD dual-echo FSE",
        sequences={
            "T1": SequenceSample("gre", {"tr": 0.010, "te": 0.003, "flip": _deg(35.0)}, preset="ixi-HH"),
            "T2": SequenceSample("fse", {"tr": 5.0, "te": 0.090}, preset="ixi-HH"),
            "PD": SequenceSample("fse", {"tr": 5.0, "te": 0.010}, preset="ixi-HH"),
        },
        noise_fraction=0.015,
        bias_rms=0.20,
        scale=700.0,
    ),
    "IOP": SiteProtocol(
        scanner="GE-like 1.5 T: T1 inversion-prepared fast GRE (MPRAGE-like), T2/PD dual-echo FSE",
        sequences={
            "T1": _mprage("ixi-IOP", tr=2.0, ti=1.0, tx=0.007, te=0.003, flip_deg=7.0, n=128),
            "T2": SequenceSample("fse", {"tr": 6.0, "te": 0.105}, preset="ixi-IOP"),
            "PD": SequenceSample("fse", {"tr": 6.0, "te": 0.012}, preset="ixi-IOP"),
        },
        noise_fraction=0.03,
        bias_rms=0.15,
        scale=1500.0,
    ),
}
"""Fixed IXI-like acquisition per site (contrast keys are the IXI folder / file suffixes T1, T2, PD)."""

ARC_PROTOCOL = SiteProtocol(
    scanner="Siemens-like 3 T: T1w MPRAGE, T2w FSE, CSF-nulled T2w FLAIR",
    sequences={
        "T1w": _mprage("arc", tr=2.25, ti=1.1, tx=0.007, te=0.003, flip_deg=7.0, n=128),
        "T2w": SequenceSample("fse", {"tr": 4.0, "te": 0.100}, preset="arc"),
        # TI = T1_csf ln(2 / (1 + exp(-TR / T1_csf))) ~ 2.25 s nulls CSF (T1 ~ 3.7 s); long TE for T2 weighting.
        "FLAIR": SequenceSample("flair", {"tr": 9.0, "te": 0.130, "ti": 2.25}, preset="arc"),
    },
    noise_fraction=0.02,
    bias_rms=0.15,
    scale=1000.0,
)
"""Fixed ARC-like acquisition (lesions: dark on T1w, bright on T2w and FLAIR; CSF dark on FLAIR)."""

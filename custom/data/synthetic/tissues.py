"""Tissue and lesion qMRI value tables of the synthetic data (3 T literature values of ``docs/paper-notes.md``).

PD and MT are fractions, R1, R2* and R2 rates in 1/s. Each subject draws its own values from these ranges
(:func:`custom.data.synthetic.subject.sample_tissue_values`).
"""

from __future__ import annotations

__all__ = [
    "TISSUES",
    "QMRI_KINDS",
    "TISSUE_QMRI",
    "LESION_QMRI",
    "BETWEEN_SUBJECT_LOG_SD",
    "TEXTURE_RMS",
    "TEXTURE_SIGMA_MM",
    "PLAUSIBLE_FRACTIONS",
]

TISSUES: tuple[str, ...] = ("GM", "WM", "CSF")
"""Tissue classes; label values are 0 background, 1 GM, 2 WM, 3 CSF."""

QMRI_KINDS: tuple[str, ...] = ("PD", "R1", "R2s", "R2", "MT")
"""qMRI maps of every subject: PD (fraction), R1, R2*, R2 (1/s), MT saturation (fraction)."""

TISSUE_QMRI: dict[str, dict[str, tuple[float, float]]] = {
    # 3 T literature ranges of docs/paper-notes.md (Weiskopf et al. 2013; hMRI toolbox; Callaghan et al. 2015).
    # Each subject draws a value uniformly in (low, high), then multiplies it by exp(0.04 N(0, 1)).
    "GM": {"PD": (0.77, 0.82), "R1": (0.60, 0.68), "R2s": (15.0, 20.0), "R2": (12.0, 12.0), "MT": (0.0075, 0.009)},
    "WM": {"PD": (0.69, 0.71), "R1": (0.95, 1.10), "R2s": (20.0, 23.0), "R2": (13.0, 13.0), "MT": (0.014, 0.018)},
    "CSF": {"PD": (0.95, 1.00), "R1": (0.24, 0.30), "R2s": (2.0, 10.0), "R2": (0.6, 0.6), "MT": (0.0, 0.002)},
}
"""Per-tissue qMRI value ranges: PD and MT as fractions, R1, R2*, R2 in 1/s."""

LESION_QMRI: dict[str, tuple[float, float]] = {
    # Chronic stroke lesion of docs/paper-notes.md (PD 0.85-1.00, R1 0.30-0.50, R2* 5-15, R2 3-6,
    # MT 0.001-0.005), narrowed to the part that models gliotic, FLAIR-hyperintense tissue: R1 0.44-0.50 1/s,
    # R2 3-4.5 1/s, PD 0.88-0.97.
    # Nearer R1 = 0.30 1/s a lesion has the T1 of CSF and a CSF-nulling FLAIR nulls it too (a cavity); there the
    # lesion would be darker than white matter on FLAIR, which the ARC-like data should not show.
    "PD": (0.88, 0.97),
    "R1": (0.44, 0.50),
    "R2s": (5.0, 15.0),
    "R2": (3.0, 4.5),
    "MT": (0.001, 0.005),
}
"""qMRI value ranges of inserted stroke lesions (fractions and 1/s)."""

BETWEEN_SUBJECT_LOG_SD = 0.04
"""Standard deviation of the log-normal factor applied on top of the uniform draw in a tissue's range."""

TEXTURE_RMS = 0.03
"""Relative RMS amplitude of the multiplicative texture of each qMRI map."""

TEXTURE_SIGMA_MM = 2.0
"""Gaussian correlation length (sigma) of the texture, mm."""

PLAUSIBLE_FRACTIONS: dict[str, tuple[float, float]] = {"GM": (0.40, 0.60), "WM": (0.28, 0.42), "CSF": (0.08, 0.25)}
"""Accepted partial-volume tissue fractions of the brain (the MNI152 2009a template itself has about GM 0.53,
WM 0.36, CSF 0.11: its averaged GM map absorbs much of the sulcal CSF). A subject outside is logged as a warning."""

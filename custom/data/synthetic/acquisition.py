"""Image acquisition: a subject's qMRI maps played through a fixed protocol, and the IXI image-model seam.

:func:`acquire` simulates one contrast (signal equation, receive bias field, Rician noise, scanner intensity
scale); :func:`acquire_session` all contrasts of a protocol in one session (one shared bias field).

IXI-like images are made by an :class:`IxiImageModel`, called once per subject by
:func:`custom.data.synthetic.layouts.write_ixi`: ``model(subject, site, rng) -> {contrast: image}``. The default,
:func:`physics_ixi_images`, simulates the site's :data:`~custom.data.synthetic.protocols.SITE_PROTOCOLS` from
the subject's qMRI maps; another model (e.g. intensities drawn per tissue label) plugs in at the same place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from custom import physics
from custom.data.synthetic.fields import smooth_field
from custom.data.synthetic.protocols import SITE_PROTOCOLS, SiteProtocol
from custom.data.synthetic.subject import Subject
from custom.sequences import SequenceSample, simulate

__all__ = ["bias_field", "acquire", "acquire_session", "IxiImageModel", "physics_ixi_images"]


def bias_field(shape: Sequence[int], rng: np.random.Generator, rms: float) -> np.ndarray:
    """Smooth multiplicative receive field ``exp(f)``, ``f`` a low-frequency field with the given RMS (float32)."""
    return np.exp(smooth_field(shape, rng, n_basis=3, rms=rms))


def acquire(
    subject: Subject,
    sample: SequenceSample,
    site: SiteProtocol,
    bias: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulated magnitude image in scanner units (float32 holding integers) of one protocol.

    The noise-free signal (``custom.sequences.simulate`` with the bias field as receive gain B1) gets Rician noise
    with sigma = ``site.noise_fraction`` x its brain 99th percentile, is scaled so that percentile becomes
    ``site.scale`` (times a +-3 % receiver-gain jitter) and rounded. Air outside the head is noise only.
    """
    maps = {k: torch.from_numpy(v) for k, v in subject.maps.items()}
    clean = simulate(sample, maps["PD"], maps["R1"], maps["R2s"], maps["MT"], r2=maps["R2"], b1=torch.from_numpy(bias))
    reference = float(np.percentile(clean.numpy()[subject.mask > 0], 99.0))
    if reference <= 0:
        raise RuntimeError(f"protocol {sample} gives an empty image")
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noisy = physics.rician_noise(clean, site.noise_fraction * reference, generator=generator)
    gain = site.scale / reference * (1.0 + 0.03 * float(np.clip(rng.standard_normal(), -2, 2)))
    return np.round(noisy.numpy() * gain).astype(np.float32)


def acquire_session(subject: Subject, protocol: SiteProtocol, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every contrast of ``protocol`` in one session: contrast name -> image from :func:`acquire`.

    One bias field is drawn first and shared by the session's contrasts, then the contrasts are acquired in the
    protocol's order (this order of draws from ``rng`` keeps the data identical for a given seed).
    """
    bias = bias_field(subject.mask.shape, rng, protocol.bias_rms)
    return {contrast: acquire(subject, sample, protocol, bias, rng) for contrast, sample in protocol.sequences.items()}


class IxiImageModel(Protocol):
    """How an IXI-like subject's images are made from its anatomy (the seam for alternative image models).

    Called once per subject with

    * ``subject``: the :class:`~custom.data.synthetic.subject.Subject` (qMRI ``maps``, tissue ``labels``
      0 bg / 1 GM / 2 WM / 3 CSF, brain ``mask``, tissue qMRI ``values``), all on the output grid;
    * ``site``: the IXI site, a key of :data:`~custom.data.synthetic.protocols.SITE_PROTOCOLS` (Guys, HH, IOP);
    * ``rng``: the subject's random generator, after its anatomy was drawn (use it for every random draw, so the
      data stay deterministic for a given seed);

    and returns one float32 image (scanner units, the subject's grid shape) per IXI contrast: the keys of
    ``SITE_PROTOCOLS[site].sequences`` (``T1``, ``T2``, ``PD``), which name the written files.
    """

    def __call__(self, subject: Subject, site: str, rng: np.random.Generator) -> dict[str, np.ndarray]: ...


def physics_ixi_images(subject: Subject, site: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The default :class:`IxiImageModel`: the site's fixed protocols simulated from the subject's qMRI maps
    (:func:`acquire_session` with ``SITE_PROTOCOLS[site]``)."""
    return acquire_session(subject, SITE_PROTOCOLS[site], rng)

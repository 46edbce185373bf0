"""Image acquisition: a subject's qMRI maps played through a fixed protocol, and the IXI image-model seam.

:func:`acquire` simulates one contrast (signal equation, receive bias field, Rician noise, scanner intensity
scale); :func:`acquire_session` all contrasts of a protocol in one session (one shared bias field).

IXI-like images: :func:`custom.data.synthetic.layouts.write_ixi` asks the named image model for each subject's
images; the default, :func:`physics_ixi_images`, simulates the site's
:data:`~custom.data.synthetic.protocols.SITE_PROTOCOLS` from the subject's qMRI maps; the models that use no
signal equation (``"gmm"``, ``"template"``) live in :mod:`custom.data.image_models`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from custom import physics
from custom.data.synthetic.fields import smooth_field
from custom.data.synthetic.protocols import SITE_PROTOCOLS, SiteProtocol
from custom.data.synthetic.subject import Subject
from custom.sequences import SequenceSample, simulate

__all__ = ["bias_field", "acquire", "acquire_session", "physics_ixi_images"]


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


def physics_ixi_images(subject: Subject, site: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The default IXI image model (``"physics"``): the site's fixed protocols simulated from the subject's qMRI
    maps (:func:`acquire_session` with ``SITE_PROTOCOLS[site]``), contrast name -> image."""
    return acquire_session(subject, SITE_PROTOCOLS[site], rng)

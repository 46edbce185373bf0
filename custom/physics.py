"""MRI signal equations of the paper (Appendix A, eqs. 1-5), in pure torch.

Conventions for every function here:

* Tissue maps are tensors: ``pd`` and ``mt`` are fractions in [0, 1]; ``r1``, ``r2``, ``r2s`` are rates
  in 1/s.
* Sequence parameters are keyword-only: times (``tr``, ``te``, ``ti``, ``tx``, ``td``) in seconds, ``flip`` in
  radians, ``n`` a count of excitation pulses, ``b1`` the (unitless) receive-field gain.
* A parameter may be a Python number, a 0-d tensor, a tensor that broadcasts with the maps, or a 1-D tensor
  with one value per batch item (length equal to the maps' leading dimension), which is reshaped to
  ``(B, 1, 1, ...)`` so a batch of images can be simulated with a batch of protocols in one call.
* The output has the maps' device and dtype (promoted to floating point), is differentiable with respect to
  maps and parameters, and is finite for valid inputs, including PD = 0, R1 = 0 and R2 = 0.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fse", "gre", "flair", "mprage", "mprage_delay_time", "rician_noise"]

Param = float | int | torch.Tensor


def _reference(*maps: torch.Tensor | float) -> torch.Tensor:
    """The first tensor among ``maps`` (promoted to a floating dtype), which sets device, dtype and shape."""
    for m in maps:
        if isinstance(m, torch.Tensor):
            return m if m.is_floating_point() else m.to(torch.get_default_dtype())
    return torch.as_tensor(maps[0], dtype=torch.get_default_dtype())


def _as_param(value: Param, ref: torch.Tensor) -> torch.Tensor:
    """Convert a scalar / per-batch / broadcastable parameter to a tensor that broadcasts with ``ref``."""
    # Python numbers go straight to the maps' dtype (never through float32, which would cost precision).
    t = torch.as_tensor(value, device=ref.device, dtype=ref.dtype if not isinstance(value, torch.Tensor) else None)
    if t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    if t.ndim == 1 and ref.ndim > 1 and t.shape[0] == ref.shape[0] and t.shape[0] != 1:
        t = t.reshape((t.shape[0],) + (1,) * (ref.ndim - 1))
    return t


def _as_map(value: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=ref.device, dtype=ref.dtype if not isinstance(value, torch.Tensor) else None)
    return t.to(ref.dtype) if t.dtype != ref.dtype else t


class _Temporaries:
    """Arithmetic on temporaries that a signal equation owns (never on its inputs).

    When no gradient is needed the operations run in place: on the CPU, allocating (and first touching) a new
    whole-volume tensor per operation costs more than the arithmetic itself, so reusing buffers is what makes
    torch faster than the NumPy version of the same equations (``benchmarks/simulate.py``). When a gradient is
    needed they run out of place, so autograd sees an ordinary graph.
    """

    def __init__(self, shape: torch.Size, *tensors: torch.Tensor) -> None:
        self.shape = shape
        self.inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def new(self, t: torch.Tensor) -> torch.Tensor:
        """Adopt ``t`` (a freshly computed tensor) as a temporary of the full output shape."""
        if self.inplace and t.shape != self.shape:
            t = t.expand(self.shape).clone()
        return t

    def mul(self, t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return t.mul_(other) if self.inplace else t * other

    def exp(self, t: torch.Tensor) -> torch.Tensor:
        return t.exp_() if self.inplace else t.exp()

    def one_minus_exp(self, t: torch.Tensor) -> torch.Tensor:
        """``1 - exp(t)`` via ``expm1`` (accurate for small ``|t|``)."""
        return t.expm1_().neg_() if self.inplace else -torch.expm1(t)

    def one_minus(self, t: torch.Tensor) -> torch.Tensor:
        return t.neg_().add_(1.0) if self.inplace else 1.0 - t

    def add(self, t: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
        return t.add_(other) if self.inplace else t + other

    def abs(self, t: torch.Tensor) -> torch.Tensor:
        return t.abs_() if self.inplace else t.abs()

    def safe_div(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """``num / den`` with 0 where ``den`` is 0 (the 0/0 limits here, e.g. R1 = 0 with zero flip, are 0).

        Out of place, the double ``where`` keeps gradients finite as well as values.
        """
        bad = den.abs() <= torch.finfo(den.dtype).tiny
        if self.inplace:
            return num.div_(den.masked_fill_(bad, 1.0)).masked_fill_(bad, 0.0)
        safe_den = torch.where(bad, torch.ones_like(den), den)
        return torch.where(bad, torch.zeros_like(num), num / safe_den)


def _shape(*tensors: torch.Tensor) -> torch.Size:
    return torch.broadcast_shapes(*(t.shape for t in tensors))


def fse(pd: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, *, tr: Param, te: Param, b1: Param = 1.0) -> torch.Tensor:
    """Fast spin echo, paper eq. 1: ``B1 PD (1 - exp(-R1 TR)) exp(-R2 TE)``.

    Args:
        pd: proton density, fraction in [0, 1].
        r1: longitudinal relaxation rate, 1/s.
        r2: transverse relaxation rate, 1/s (R2* is used in its place when no R2 map exists; see NOTES.md).
        tr: repetition time, seconds.
        te: echo time, seconds.
        b1: receive-field gain (scalar or map), unitless.
    """
    ref = _reference(pd, r1, r2)
    pd, r1, r2 = (_as_map(m, ref) for m in (pd, r1, r2))
    tr, te, b1 = (_as_param(p, ref) for p in (tr, te, b1))
    tmp = _Temporaries(_shape(pd, r1, r2, tr, te, b1), pd, r1, r2, tr, te, b1)
    signal = tmp.mul(tmp.one_minus_exp(tmp.new(r1 * -tr)), pd)
    signal = tmp.mul(signal, tmp.exp(r2 * -te))
    return tmp.mul(signal, b1)


def gre(
    pd: torch.Tensor,
    r1: torch.Tensor,
    r2s: torch.Tensor,
    mt: torch.Tensor,
    *,
    tr: Param,
    te: Param,
    flip: Param,
    b1: Param = 1.0,
) -> torch.Tensor:
    """Spoiled gradient echo with magnetisation transfer, paper eq. 2.

    ``B1 PD sin(a) (1 - MT) (1 - E1) / (1 - cos(a) (1 - MT) E1) exp(-R2* TE)`` with ``E1 = exp(-R1 TR)``.

    Args:
        pd: proton density, fraction. r1: 1/s. r2s: effective transverse rate R2*, 1/s.
        mt: magnetisation-transfer saturation, fraction in [0, 1].
        tr: repetition time, seconds. te: echo time, seconds. flip: flip angle, radians.
        b1: receive-field gain, unitless.
    """
    ref = _reference(pd, r1, r2s, mt)
    pd, r1, r2s, mt = (_as_map(m, ref) for m in (pd, r1, r2s, mt))
    tr, te, flip, b1 = (_as_param(p, ref) for p in (tr, te, flip, b1))
    tmp = _Temporaries(_shape(pd, r1, r2s, mt, tr, te, flip, b1), pd, r1, r2s, mt, tr, te, flip, b1)
    one_minus_mt = tmp.new(1.0 - mt)
    e1 = tmp.exp(tmp.new(r1 * -tr))
    # numerator sin(a) (1 - MT) (1 - E1), denominator 1 - cos(a) (1 - MT) E1
    num = tmp.mul(tmp.mul(tmp.one_minus_exp(tmp.new(r1 * -tr)), one_minus_mt), torch.sin(flip))
    den = tmp.one_minus(tmp.mul(tmp.mul(e1, one_minus_mt), torch.cos(flip)))
    signal = tmp.mul(tmp.safe_div(num, den), pd)
    signal = tmp.mul(signal, tmp.exp(r2s * -te))
    return tmp.mul(signal, b1)


def flair(
    pd: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, *, tr: Param, te: Param, ti: Param, b1: Param = 1.0
) -> torch.Tensor:
    """Fluid-attenuated inversion recovery, paper eq. 3.

    ``B1 PD exp(-R2 TE) (1 - 2 exp(-R1 TI) + exp(-R1 TR))``. The value is signed, exactly as printed (a tissue
    whose magnetisation is still inverted at TI gives a negative value); a magnitude image is its absolute
    value, which is what :func:`rician_noise` and the simulation transform produce.

    Args:
        pd: fraction. r1: 1/s. r2: 1/s. tr, te, ti: repetition, echo and inversion times, seconds.
        b1: receive-field gain, unitless.
    """
    ref = _reference(pd, r1, r2)
    pd, r1, r2 = (_as_map(m, ref) for m in (pd, r1, r2))
    tr, te, ti, b1 = (_as_param(p, ref) for p in (tr, te, ti, b1))
    tmp = _Temporaries(_shape(pd, r1, r2, tr, te, ti, b1), pd, r1, r2, tr, te, ti, b1)
    inversion = tmp.mul(tmp.exp(tmp.new(r1 * -ti)), -2.0)
    inversion = tmp.add(tmp.add(inversion, tmp.exp(r1 * -tr)), 1.0)
    signal = tmp.mul(tmp.mul(inversion, pd), tmp.exp(r2 * -te))
    return tmp.mul(signal, b1)


def mprage(
    pd: torch.Tensor,
    r1: torch.Tensor,
    *,
    tr: Param,
    tx: Param,
    td: Param,
    flip: Param,
    n: Param,
    b1: Param = 1.0,
) -> torch.Tensor:
    """Magnetisation-prepared rapid gradient echo, paper eq. 4, scaled by ``B1 PD``.

    ``B1 PD | sin(a) (1 - E1) / (1 - cos(a) E1) (1 - (cos(a) exp(-TX R1))^n) exp(-TD R1)
    + (1 - exp(-TD R1)) |`` with ``E1 = exp(-R1 TR)``. Eq. 4 as printed has no PD or B1 factor, unlike
    eqs. 1-3; following NOTES.md we multiply by ``B1 PD`` so every sequence shares one signal scale.
    Eq. 4 has no echo-time decay either.

    Args:
        pd: fraction. r1: 1/s.
        tr: repetition time, seconds. tx: time between excitations of the readout train, seconds.
        td: delay time, seconds (see :func:`mprage_delay_time`). flip: flip angle, radians.
        n: number of excitation pulses per train (a count; non-integer values are allowed for gradients).
        b1: receive-field gain, unitless.
    """
    ref = _reference(pd, r1)
    pd, r1 = (_as_map(m, ref) for m in (pd, r1))
    tr, tx, td, flip, n, b1 = (_as_param(p, ref) for p in (tr, tx, td, flip, n, b1))
    tmp = _Temporaries(_shape(pd, r1, tr, tx, td, flip, n, b1), pd, r1, tr, tx, td, flip, n, b1)
    cos_a = torch.cos(flip)
    recovery_tr = tmp.one_minus_exp(tmp.new(r1 * -tr))
    den = tmp.one_minus(tmp.mul(tmp.exp(tmp.new(r1 * -tr)), cos_a))
    steady = tmp.safe_div(recovery_tr, den)
    train = tmp.mul(tmp.exp(tmp.new(r1 * -tx)), cos_a)
    train = tmp.one_minus(train.pow_(n) if tmp.inplace else train.pow(n))
    readout = tmp.mul(tmp.mul(tmp.mul(steady, train), tmp.exp(r1 * -td)), torch.sin(flip))
    signal = tmp.abs(tmp.add(readout, tmp.one_minus_exp(r1 * -td)))
    return tmp.mul(tmp.mul(signal, pd), b1)


def mprage_delay_time(tr: Param, ti: Param, tx: Param, n: Param) -> torch.Tensor | float:
    """Delay TD (seconds) between the end of the readout train and the next inversion.

    The readout train of ``n`` excitations ``tx`` seconds apart is centred on the inversion time, so
    ``TD = TR - TI - n TX / 2``, clipped at 0. The paper samples TR, TI, TX and n but not TD (NOTES.md).
    """
    if all(not isinstance(p, torch.Tensor) for p in (tr, ti, tx, n)):
        return max(float(tr) - float(ti) - float(n) * float(tx) / 2.0, 0.0)
    tr, ti, tx, n = (torch.as_tensor(p) for p in (tr, ti, tx, n))
    return torch.clamp(tr - ti - n * tx / 2.0, min=0.0)


def rician_noise(signal: torch.Tensor, sigma: Param, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rician magnitude noise, paper eq. 5: ``sqrt((S + e_r)^2 + e_i^2)``, ``e_r, e_i ~ N(0, sigma^2)``.

    Args:
        signal: noise-free signal (any real tensor; a negative value is a phase-flipped magnitude).
        sigma: standard deviation of each Gaussian channel, in the signal's units; scalar, per-batch (1-D of
            the batch length) or broadcastable tensor. ``sigma = 0`` returns ``|signal|``.
        generator: optional ``torch.Generator`` on the signal's device, for reproducible noise.

    For zero signal the output is Rayleigh distributed with mean ``sigma * sqrt(pi / 2)``.
    """
    ref = signal if signal.is_floating_point() else signal.to(torch.get_default_dtype())
    sigma_t = _as_param(sigma, ref)
    if torch.any(sigma_t < 0):
        raise ValueError(f"rician_noise: sigma must be >= 0, got min {float(sigma_t.min())}")
    real = torch.randn(ref.shape, generator=generator, device=ref.device, dtype=ref.dtype)
    imag = torch.randn(ref.shape, generator=generator, device=ref.device, dtype=ref.dtype)
    # hypot avoids overflow/underflow and has a finite gradient everywhere except exactly (0, 0).
    return torch.hypot(ref + sigma_t * real, sigma_t * imag)


RAYLEIGH_MEAN_FACTOR = math.sqrt(math.pi / 2.0)
"""Mean of Rician noise at zero signal, in units of sigma."""

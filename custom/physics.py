"""MRI signal equations of the paper (Appendix A, eqs. 1-5), in pure torch, and two inversion-prepared
sequences beside them: :func:`mprage_inversion` (MPRAGE with its inversion pulse) and :func:`mp2rage`.

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

__all__ = ["fse", "gre", "flair", "mprage", "mprage_inversion", "mprage_delay_time", "mp2rage", "rician_noise"]

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
        r2: transverse relaxation rate, 1/s (R2* is used in its place when no R2 map exists; see docs/paper-notes.md).
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
    eqs. 1-3; following docs/paper-notes.md we multiply by ``B1 PD`` so every sequence shares one signal scale.
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
    ``TD = TR - TI - n TX / 2``, clipped at 0. The paper samples TR, TI, TX and n but not TD (docs/paper-notes.md).
    """
    if all(not isinstance(p, torch.Tensor) for p in (tr, ti, tx, n)):
        return max(float(tr) - float(ti) - float(n) * float(tx) / 2.0, 0.0)
    tr, ti, tx, n = (torch.as_tensor(p) for p in (tr, ti, tx, n))
    return torch.clamp(tr - ti - n * tx / 2.0, min=0.0)


# ------------------------------------------------------------------------------------------------------------
# Inversion-prepared gradient-echo trains (MPRAGE with its inversion pulse, MP2RAGE), in closed form.
#
# Between two events the longitudinal magnetisation Mz (in units of the equilibrium M0) changes by an affine
# map ``Mz -> a Mz + b``:
#
# * free recovery for a time t:            a = E = exp(-R1 t),      b = 1 - E;
# * inversion with efficiency eff:         a = -eff,                b = 0;
# * k excitations of flip alpha, each followed by TX of free recovery (q = cos(alpha) E_x, E_x = exp(-R1 TX)):
#   Mz_j+1 = q Mz_j + (1 - E_x), so after k of them a = q^k and b = M_inf (1 - q^k), with the train's own
#   steady state M_inf = (1 - E_x) / (1 - q).
#
# Affine maps compose into an affine map, so one whole repetition, read from any instant, is ``Mz -> A Mz + B``;
# the steady state over repeated TRs is its fixed point ``Mz = B / (1 - A)`` (|A| < 1 whenever R1 > 0). Reading
# the repetition from the centre of k-space gives the magnetisation that is sampled there directly.
# ------------------------------------------------------------------------------------------------------------
_Affine = tuple[torch.Tensor, torch.Tensor]


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den`` is 0, with finite values and gradients (double ``where``)."""
    bad = den.abs() <= torch.finfo(den.dtype).tiny
    safe_den = torch.where(bad, torch.ones_like(den), den)
    return torch.where(bad, torch.zeros_like(num), num / safe_den)


def _compose(*maps: _Affine) -> _Affine:
    """The affine map of ``maps`` applied in order (first one first)."""
    a, b = maps[0]
    for a2, b2 in maps[1:]:
        a, b = a2 * a, a2 * b + b2
    return a, b


def _recovery(r1: torch.Tensor, t: torch.Tensor) -> _Affine:
    """Free longitudinal recovery for ``t`` seconds."""
    return torch.exp(-r1 * t), -torch.expm1(-r1 * t)


def _readout(r1: torch.Tensor, tx: torch.Tensor, flip: torch.Tensor, k: torch.Tensor) -> _Affine:
    """``k`` excitations of angle ``flip``, each followed by ``tx`` of recovery (``k`` may be fractional)."""
    cos_a = torch.cos(flip)
    recovered = -torch.expm1(-r1 * tx)  # 1 - E_x
    # 1 - q = (1 - cos a) + cos a (1 - E_x), accurate for small angles and short TX.
    one_minus_q = 2.0 * torch.sin(flip / 2.0) ** 2 + cos_a * recovered
    q_k = torch.pow(cos_a, k) * torch.exp(-r1 * tx * k)
    return q_k, _safe_div(recovered * (1.0 - q_k), one_minus_q)


def _fixed_point(cycle: _Affine) -> torch.Tensor:
    a, b = cycle
    return _safe_div(b, 1.0 - a)


def _clipped(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp(t, min=0.0)


def mprage_inversion(
    pd: torch.Tensor,
    r1: torch.Tensor,
    *,
    tr: Param,
    ti: Param,
    tx: Param,
    flip: Param,
    n: Param,
    efficiency: Param = 1.0,
    b1: Param = 1.0,
    r2s: torch.Tensor | None = None,
    te: Param = 0.0,
) -> torch.Tensor:
    """MPRAGE with its inversion pulse: the steady-state signal at the centre of k-space.

    The closed-form steady state of the inversion-prepared gradient-echo train (as in Deichmann et al.,
    NeuroImage 2000, "Optimization of 3-D MP-RAGE sequences for structural brain imaging", and Marques et al.,
    NeuroImage 2010, appendix of the MP2RAGE paper), derived here for one train. Unlike :func:`mprage` (paper
    eq. 4, kept as printed), it has the inversion, so grey matter sits nearer the null and WM/GM at 3 T tissue
    values is 1.35-2.3 (median 1.6) over the clinical preset's protocols, against 1.10-1.17 for eq. 4.

    Timing of one repetition TR (the time between inversions): the inversion (``Mz -> -efficiency Mz``), free
    recovery for ``TA = TI - n TX / 2``, ``n`` excitations of angle ``flip`` spaced ``TX`` apart (the readout
    train, centred on TI: the centre of k-space is the excitation after the first ``n / 2`` ones, at time TI
    after the inversion), then free recovery for ``TD = TR - TI - n TX / 2`` (:func:`mprage_delay_time`) until
    the next inversion. ``TA`` and ``TD`` are clipped at 0 (a protocol whose train does not fit is played with no
    gap, i.e. with a later centre or a longer TR than asked for).

    With ``E(t) = exp(-R1 t)``, ``q = cos(a) exp(-R1 TX)``, ``M_inf = (1 - exp(-R1 TX)) / (1 - q)`` and
    ``h = q^(n/2)`` (the half train: ``Mz -> h Mz + M_inf (1 - h)``), one repetition read from the centre
    excitation maps ``Mz -> A Mz + B`` with ``A = -efficiency E(TA) E(TD) h^2`` (half train, TD, inversion, TA,
    half train), and the steady state is ``Mz_c = B / (1 - A)``. The signal is
    ``B1 PD sin(a) |Mz_c|`` (magnitude), times ``exp(-R2* TE)`` when ``r2s`` is given.

    ``efficiency = 0`` turns the inversion into a saturation pulse (saturation-recovery prepared train);
    ``efficiency = -1`` would be no preparation at all. An odd or non-integer ``n`` puts the centre between
    two excitations (``q^(n/2)`` interpolates).

    Args:
        pd: proton density, fraction. r1: longitudinal relaxation rate, 1/s.
        tr: time between inversions, seconds. ti: inversion time (inversion to centre of k-space), seconds.
        tx: time between excitations of the readout train (echo spacing), seconds.
        flip: flip angle, radians (in [0, pi/2) for a non-integer ``n``; a negative cosine needs an integer).
        n: number of excitations per train (non-integer values allowed for gradients).
        efficiency: inversion efficiency, ``Mz -> -efficiency Mz`` (1: perfect inversion).
        b1: receive-field gain, unitless.
        r2s: optional R2* map, 1/s, for a ``exp(-R2* TE)`` factor (default: none, as in eq. 4).
        te: echo time, seconds (used only with ``r2s``).
    """
    maps = (pd, r1) if r2s is None else (pd, r1, r2s)
    ref = _reference(*maps)
    pd, r1 = (_as_map(m, ref) for m in (pd, r1))
    tr, ti, tx, flip, n, efficiency, b1, te = (_as_param(p, ref) for p in (tr, ti, tx, flip, n, efficiency, b1, te))
    half_n = n / 2.0
    ta = _clipped(ti - half_n * tx)
    td = mprage_delay_time(tr, ti, tx, n)
    half = _readout(r1, tx, flip, half_n)
    inversion = (-efficiency, torch.zeros_like(efficiency))
    mz = _fixed_point(_compose(half, _recovery(r1, td), inversion, _recovery(r1, ta), half))
    signal = b1 * pd * torch.sin(flip) * mz.abs()
    if r2s is not None:
        signal = signal * torch.exp(-_as_map(r2s, ref) * te)
    return signal


def mp2rage(
    pd: torch.Tensor,
    r1: torch.Tensor,
    *,
    tr: Param,
    ti1: Param,
    ti2: Param,
    tx: Param,
    flip1: Param,
    flip2: Param,
    n: Param,
    efficiency: Param = 1.0,
    b1: Param = 1.0,
) -> torch.Tensor:
    """MP2RAGE "UNI" image (Marques et al., NeuroImage 2010), shifted to be non-negative and scaled by ``B1 PD``.

    One repetition TR (time between inversions): the inversion (``Mz -> -efficiency Mz``), recovery for
    ``TA = TI1 - n TX / 2``, a train of ``n`` excitations of ``flip1`` spaced ``TX`` apart (centred on TI1),
    recovery for ``TB = TI2 - TI1 - n TX``, a train of ``n`` excitations of ``flip2`` (centred on TI2), recovery
    for ``TC = TR - TI2 - n TX / 2``; ``TA``, ``TB``, ``TC`` are clipped at 0. The steady-state ``Mz`` at the
    centre of each train follows from the same affine-map fixed point as :func:`mprage_inversion`; the two
    images are ``S_i = sin(flip_i) Mz_i`` (signed, the common factor ``PD B1 exp(-R2* TE)`` cancels below) and

    ``UNI = S1 S2 / (S1^2 + S2^2)`` in [-0.5, 0.5] (the real, in-phase case of ``Re(S1* S2) / (|S1|^2 + |S2|^2)``).

    Returned: ``B1 PD (UNI + 0.5)``, in [0, B1 PD]. The physical UNI image is free of PD and receive field; the
    ``B1 PD`` factor is kept (a choice of this project) so that, as for every other sequence here, tissue
    outside the head (PD = 0) is 0 and the receive-field augmentation acts on it. Long-T1 tissue (CSF) is
    dark, short-T1 tissue (WM) bright.

    Args:
        pd: fraction. r1: 1/s. tr: time between inversions, s. ti1, ti2: inversion times (inversion to the
        centre of each train), s. tx: echo spacing, s. flip1, flip2: flip angles of the two trains, radians.
        n: excitations per train. efficiency: inversion efficiency. b1: receive-field gain.
    """
    ref = _reference(pd, r1)
    pd, r1 = (_as_map(m, ref) for m in (pd, r1))
    params = (tr, ti1, ti2, tx, flip1, flip2, n, efficiency, b1)
    tr, ti1, ti2, tx, flip1, flip2, n, efficiency, b1 = (_as_param(p, ref) for p in params)
    half_n = n / 2.0
    ta = _clipped(ti1 - half_n * tx)
    tb = _clipped(ti2 - ti1 - n * tx)
    tc = _clipped(tr - ti2 - half_n * tx)
    half1, half2 = _readout(r1, tx, flip1, half_n), _readout(r1, tx, flip2, half_n)
    inversion = (-efficiency, torch.zeros_like(efficiency))
    first_to_second = _compose(half1, _recovery(r1, tb), half2)
    second_to_first = _compose(half2, _recovery(r1, tc), inversion, _recovery(r1, ta), half1)
    mz1 = _fixed_point(_compose(first_to_second, second_to_first))
    mz2 = first_to_second[0] * mz1 + first_to_second[1]
    s1, s2 = torch.sin(flip1) * mz1, torch.sin(flip2) * mz2
    uni = _safe_div(s1 * s2, s1 * s1 + s2 * s2)
    return b1 * pd * (uni + 0.5)


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

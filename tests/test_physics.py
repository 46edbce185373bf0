"""Signal equations (paper eqs. 1-5): hand-computed values, limits, random inputs, gradients, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from custom import physics

# ---------------------------------------------------------------- NumPy references, written from the paper


def np_fse(pd, r1, r2, tr, te, b1=1.0):
    return b1 * pd * (1 - np.exp(-r1 * tr)) * np.exp(-r2 * te)


def np_gre(pd, r1, r2s, mt, tr, te, flip, b1=1.0):
    e1 = np.exp(-r1 * tr)
    return b1 * pd * np.sin(flip) * (1 - mt) * (1 - e1) / (1 - np.cos(flip) * (1 - mt) * e1) * np.exp(-r2s * te)


def np_flair(pd, r1, r2, tr, te, ti, b1=1.0):
    return b1 * pd * np.exp(-r2 * te) * (1 - 2 * np.exp(-r1 * ti) + np.exp(-r1 * tr))


def np_mprage(pd, r1, tr, tx, td, flip, n, b1=1.0):
    e1 = np.exp(-r1 * tr)
    inner = (1 - e1) / (1 - np.cos(flip) * e1) * (1 - (np.cos(flip) * np.exp(-tx * r1)) ** n)
    return b1 * pd * np.abs(np.sin(flip) * inner * np.exp(-td * r1) + (1 - np.exp(-td * r1)))


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    a = a.detach().cpu().double().numpy()
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.fixture()
def random_maps():
    rng = np.random.default_rng(1234)
    shape = (2000,)
    return {
        "pd": rng.uniform(0.05, 1.0, shape),
        "r1": rng.uniform(0.1, 3.0, shape),
        "r2": rng.uniform(0.5, 60.0, shape),
        "mt": rng.uniform(0.0, 0.05, shape),
        "b1": rng.uniform(0.7, 1.3, shape),
    }


# ---------------------------------------------------------------- hand-computed values


def test_fse_hand_values():
    # 0.8 * (1 - e^-1) * e^-1 = 0.8 * 0.6321206 * 0.3678794
    assert float(physics.fse(t(0.8), t(1.0), t(10.0), tr=1.0, te=0.1)) == pytest.approx(0.18603533, rel=1e-7)
    # CSF-like at TR 5 s, TE 0.1 s, B1 0.9: 0.9 * 1 * (1 - e^-1.35) * e^-0.06
    expected = 0.9 * (1 - math.exp(-1.35)) * math.exp(-0.06)
    assert float(physics.fse(t(1.0), t(0.27), t(0.6), tr=5.0, te=0.1, b1=0.9)) == pytest.approx(expected, 1e-9)


def test_gre_hand_values():
    a = math.radians(30)
    e1 = math.exp(-0.02)
    expected = 0.7 * math.sin(a) * 0.98 * (1 - e1) / (1 - math.cos(a) * 0.98 * e1) * math.exp(-0.21)
    got = physics.gre(t(0.7), t(1.0), t(21.0), t(0.02), tr=0.02, te=0.01, flip=a)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(got) == pytest.approx(0.03275045, rel=1e-6)


def test_flair_hand_values():
    # WM: 0.7 e^-1.3 (1 - 2 e^-2.5 + e^-10)
    expected = 0.7 * math.exp(-1.3) * (1 - 2 * math.exp(-2.5) + math.exp(-10.0))
    got = physics.flair(t(0.7), t(1.0), t(13.0), tr=10.0, te=0.1, ti=2.5)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(got) == pytest.approx(0.15946184, rel=1e-6)


def test_mprage_hand_values():
    a = math.radians(8)
    e1 = math.exp(-2.3)
    inner = (1 - e1) / (1 - math.cos(a) * e1) * (1 - (math.cos(a) * math.exp(-0.006)) ** 150)
    expected = 0.7 * abs(math.sin(a) * inner * math.exp(-0.65) + 1 - math.exp(-0.65))
    got = physics.mprage(t(0.7), t(1.0), tr=2.3, tx=0.006, td=0.65, flip=a, n=150)
    assert float(got) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- limits


def test_fse_limits():
    pd, r1, r2 = t([0.7, 0.8, 1.0]), t([1.0, 0.65, 0.27]), t([13.0, 12.0, 0.6])
    # TE -> 0: pure T1/PD weighting.
    assert torch.allclose(physics.fse(pd, r1, r2, tr=2.0, te=0.0), pd * (1 - torch.exp(-r1 * 2.0)))
    # TR -> infinity: pure T2/PD weighting.
    assert torch.allclose(physics.fse(pd, r1, r2, tr=1e6, te=0.08), pd * torch.exp(-r2 * 0.08))


def test_gre_limits():
    pd, r1, r2s, mt = t([0.7, 0.8]), t([1.0, 0.65]), t([21.0, 17.0]), t([0.0, 0.0])
    # 90 degree flip, no MT: the denominator is 1 -> saturation recovery.
    got = physics.gre(pd, r1, r2s, mt, tr=0.5, te=0.0, flip=math.pi / 2)
    assert torch.allclose(got, pd * (1 - torch.exp(-r1 * 0.5)))
    # TR -> infinity: PD sin(a) (1 - MT) exp(-R2* TE).
    mt = t([0.016, 0.008])
    got = physics.gre(pd, r1, r2s, mt, tr=1e6, te=0.01, flip=0.3)
    assert torch.allclose(got, pd * math.sin(0.3) * (1 - mt) * torch.exp(-r2s * 0.01))
    # zero flip: no signal.
    assert torch.all(physics.gre(pd, r1, r2s, mt, tr=0.02, te=0.01, flip=0.0) == 0)


def test_flair_limits():
    pd, r1, r2 = t([0.7, 1.0]), t([1.0, 0.27]), t([13.0, 0.6])
    # TR, TI -> infinity: full recovery, T2 weighting only.
    assert torch.allclose(physics.flair(pd, r1, r2, tr=1e6, te=0.1, ti=1e5), pd * torch.exp(-r2 * 0.1))
    # TI at the null point of a tissue (TR -> infinity): TI = ln 2 / R1 gives zero signal.
    got = physics.flair(pd, r1, r2, tr=1e6, te=0.1, ti=math.log(2) / r1)
    assert torch.allclose(got, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    # TI -> 0: fully inverted magnetisation, -(1 - e^{-R1 TR}) (signed, as printed).
    got = physics.flair(pd, r1, r2, tr=3.0, te=0.0, ti=0.0)
    assert torch.allclose(got, -pd * (1 - torch.exp(-r1 * 3.0)))


def test_mprage_limits():
    pd, r1 = t([0.7, 0.8, 1.0]), t([1.0, 0.65, 0.27])
    # TD -> infinity: full recovery, signal = PD.
    assert torch.allclose(physics.mprage(pd, r1, tr=2.3, tx=0.006, td=1e4, flip=0.15, n=150), pd)
    # n = 0 (no readout saturation): only recovery during TD.
    got = physics.mprage(pd, r1, tr=2.3, tx=0.006, td=0.7, flip=0.15, n=0)
    assert torch.allclose(got, pd * (1 - torch.exp(-r1 * 0.7)))
    # 90 degree flip: (cos a)^n = 0, steady state = 1 - E1.
    got = physics.mprage(pd, r1, tr=2.3, tx=0.006, td=0.7, flip=math.pi / 2, n=150)
    e1, ed = torch.exp(-r1 * 2.3), torch.exp(-r1 * 0.7)
    assert torch.allclose(got, pd * ((1 - e1) * ed + 1 - ed))


def test_mprage_delay_time():
    assert physics.mprage_delay_time(2.3, 0.8, 0.006, 150) == pytest.approx(2.3 - 0.8 - 0.45)
    assert physics.mprage_delay_time(1.0, 0.9, 0.008, 200) == 0.0  # clipped at 0
    td = physics.mprage_delay_time(t([2.3, 1.0]), t([0.8, 0.9]), t([0.006, 0.008]), t([150.0, 200.0]))
    assert torch.allclose(td, t([1.05, 0.0]))


# ---------------------------------------------------------------- random inputs against the NumPy reference


def test_equations_match_paper_on_random_inputs(random_maps):
    m = random_maps
    rng = np.random.default_rng(7)
    for _ in range(5):
        tr, te, ti = rng.uniform(0.005, 6.0), rng.uniform(0.0, 0.2), rng.uniform(0.01, 3.0)
        flip, tx, td, n = (
            rng.uniform(0.05, 1.5),
            rng.uniform(0.003, 0.01),
            rng.uniform(0, 1.5),
            rng.integers(50, 250),
        )
        tm = {k: torch.from_numpy(v) for k, v in m.items()}
        assert (
            rel_err(
                physics.fse(tm["pd"], tm["r1"], tm["r2"], tr=tr, te=te, b1=tm["b1"]),
                np_fse(m["pd"], m["r1"], m["r2"], tr, te, m["b1"]),
            )
            < 1e-5
        )
        assert (
            rel_err(
                physics.gre(tm["pd"], tm["r1"], tm["r2"], tm["mt"], tr=tr, te=te, flip=flip, b1=tm["b1"]),
                np_gre(m["pd"], m["r1"], m["r2"], m["mt"], tr, te, flip, m["b1"]),
            )
            < 1e-5
        )
        assert (
            rel_err(
                physics.flair(tm["pd"], tm["r1"], tm["r2"], tr=tr, te=te, ti=ti, b1=tm["b1"]),
                np_flair(m["pd"], m["r1"], m["r2"], tr, te, ti, m["b1"]),
            )
            < 1e-5
        )
        assert (
            rel_err(
                physics.mprage(tm["pd"], tm["r1"], tr=tr, tx=tx, td=td, flip=flip, n=int(n), b1=tm["b1"]),
                np_mprage(m["pd"], m["r1"], tr, tx, td, flip, n, m["b1"]),
            )
            < 1e-5
        )


def test_float32_matches_float64_reference(random_maps):
    m = random_maps
    f32 = {k: torch.from_numpy(v).float() for k, v in m.items()}
    got = physics.gre(f32["pd"], f32["r1"], f32["r2"], f32["mt"], tr=0.02, te=0.005, flip=0.35)
    assert got.dtype == torch.float32
    assert rel_err(got, np_gre(m["pd"], m["r1"], m["r2"], m["mt"], 0.02, 0.005, 0.35)) < 1e-5


# ---------------------------------------------------------------- zeros, broadcasting, gradients


def test_zero_maps_are_finite():
    z = torch.zeros(5, dtype=torch.float32)
    outs = [
        physics.fse(z, z, z, tr=2.0, te=0.1),
        physics.gre(z, z, z, z, tr=0.02, te=0.01, flip=0.0),
        physics.gre(z + 0.8, z, z, z, tr=0.02, te=0.01, flip=0.0),  # 0/0 limit
        physics.flair(z, z, z, tr=9.0, te=0.1, ti=2.5),
        physics.mprage(z, z, tr=2.3, tx=0.006, td=0.7, flip=0.0, n=150),
        physics.mprage(z + 1.0, z, tr=2.3, tx=0.006, td=0.7, flip=0.0, n=150),
    ]
    for out in outs:
        assert torch.isfinite(out).all()
    # R1 = 0: nothing recovers, so FSE and GRE give no signal.
    assert torch.all(physics.fse(z + 1, z, z, tr=2.0, te=0.0) == 0)


def test_zero_maps_have_finite_gradients():
    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    pd = torch.full((4,), 0.8, dtype=torch.float64, requires_grad=True)
    out = physics.gre(pd, z, z, z, tr=0.02, te=0.01, flip=0.0).sum()
    out = out + physics.mprage(pd, z, tr=2.3, tx=0.006, td=0.7, flip=0.0, n=150).sum()
    out.backward()
    assert torch.isfinite(pd.grad).all() and torch.isfinite(z.grad).all()


def test_per_batch_parameters_broadcast():
    g = torch.Generator().manual_seed(0)
    pd = torch.rand(3, 1, 4, 4, 4, generator=g)
    r1 = 0.3 + torch.rand(3, 1, 4, 4, 4, generator=g)
    r2 = 5 + 20 * torch.rand(3, 1, 4, 4, 4, generator=g)
    tr, te = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.01, 0.05, 0.1])
    batched = physics.fse(pd, r1, r2, tr=tr, te=te)
    for i in range(3):
        single = physics.fse(pd[i], r1[i], r2[i], tr=float(tr[i]), te=float(te[i]))
        assert torch.allclose(batched[i], single)


def test_gradcheck_all_equations():
    g = torch.Generator().manual_seed(3)

    def leaf(lo, hi):
        return (lo + (hi - lo) * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()

    pd, r1, r2, mt = leaf(0.1, 1.0), leaf(0.2, 2.0), leaf(1.0, 30.0), leaf(0.0, 0.05)
    tr, te, flip = leaf(0.01, 3.0), leaf(0.0, 0.1), leaf(0.1, 1.2)
    assert torch.autograd.gradcheck(lambda *a: physics.fse(a[0], a[1], a[2], tr=a[3], te=a[4]), (pd, r1, r2, tr, te))
    assert torch.autograd.gradcheck(
        lambda *a: physics.gre(a[0], a[1], a[2], a[3], tr=a[4], te=a[5], flip=a[6]),
        (pd, r1, r2, mt, tr, te, flip),
    )
    ti = leaf(0.05, 0.3)  # keeps the FLAIR value away from its sign change
    assert torch.autograd.gradcheck(
        lambda *a: physics.flair(a[0], a[1], a[2], tr=a[3], te=a[4], ti=a[5]), (pd, r1, r2, tr + 3.0, te, ti)
    )
    td = leaf(0.2, 1.0)
    assert torch.autograd.gradcheck(
        lambda *a: physics.mprage(a[0], a[1], tr=a[2], tx=0.006, td=a[3], flip=a[4], n=120),
        (pd, r1, tr, td, flip),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_keeps_dtype(dtype):
    pd = torch.full((8,), 0.8, dtype=dtype)
    r1 = torch.full((8,), 1.0, dtype=dtype)
    out = physics.mprage(pd, r1, tr=2.3, tx=0.006, td=0.7, flip=0.14, n=150)
    assert out.dtype == dtype and torch.isfinite(out).all()


# ---------------------------------------------------------------- Rician noise (eq. 5)


def test_rician_zero_signal_is_rayleigh():
    g = torch.Generator().manual_seed(0)
    sigma = 0.05
    out = physics.rician_noise(torch.zeros(1_000_000, dtype=torch.float64), sigma, generator=g)
    assert float(out.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=5e-3)
    # Rayleigh variance: (4 - pi) / 2 sigma^2
    assert float(out.var()) == pytest.approx((4 - math.pi) / 2 * sigma**2, rel=1e-2)
    assert physics.RAYLEIGH_MEAN_FACTOR == pytest.approx(math.sqrt(math.pi / 2))


def test_rician_high_snr_is_gaussian():
    g = torch.Generator().manual_seed(1)
    out = physics.rician_noise(torch.full((500_000,), 10.0, dtype=torch.float64), 0.1, generator=g)
    # mean ~ S + sigma^2 / (2 S), std ~ sigma at high SNR
    assert float(out.mean()) == pytest.approx(10.0 + 0.01 / 20.0, rel=1e-4)
    assert float(out.std()) == pytest.approx(0.1, rel=1e-2)


def test_rician_seeded_and_zero_sigma():
    s = torch.linspace(-1, 1, 100)
    a = physics.rician_noise(s, 0.1, generator=torch.Generator().manual_seed(5))
    b = physics.rician_noise(s, 0.1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.allclose(physics.rician_noise(s, 0.0), s.abs())
    with pytest.raises(ValueError, match="sigma"):
        physics.rician_noise(s, -1.0)


def test_rician_per_batch_sigma():
    g = torch.Generator().manual_seed(2)
    out = physics.rician_noise(torch.zeros(2, 1, 50, 50, 50), torch.tensor([0.01, 1.0]), generator=g)
    ratio = float(out[1].mean() / out[0].mean())
    assert ratio == pytest.approx(100.0, rel=0.02)


# ---------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cpu_parity(random_maps):
    m = {k: torch.from_numpy(v).float() for k, v in random_maps.items()}
    c = {k: v.cuda() for k, v in m.items()}
    kw = {"tr": 2.3, "tx": 0.006, "td": 0.7, "flip": 0.14, "n": 150}
    cpu = physics.mprage(m["pd"], m["r1"], **kw)
    gpu = physics.mprage(c["pd"], c["r1"], **kw)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-7)
    cpu = physics.gre(m["pd"], m["r1"], m["r2"], m["mt"], tr=0.02, te=0.005, flip=0.3)
    gpu = physics.gre(c["pd"], c["r1"], c["r2"], c["mt"], tr=0.02, te=0.005, flip=0.3)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-7)
    noisy = physics.rician_noise(c["pd"], 0.1, generator=torch.Generator(device="cuda").manual_seed(0))
    assert noisy.is_cuda and torch.isfinite(noisy).all()

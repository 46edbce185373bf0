"""NT-Xent (multi-view, DDP-aware) and the pretraining objective: references, stability, gradients, gloo DDP."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from custom.losses import NTXentLoss, PretrainingLoss, similarity_stats


def naive_ntxent(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive NT-Xent written with explicit loops and exp/sum (float64)."""
    n_views, batch, _ = views.shape
    z = F.normalize(views.double(), dim=-1)
    total = 0.0
    for v in range(n_views):
        for i in range(batch):
            denominator = 0.0
            for u in range(n_views):
                for j in range(batch):
                    if (u, j) != (v, i):
                        denominator += math.exp(float(z[v, i] @ z[u, j]) / temperature)
            anchor = 0.0
            for u in range(n_views):
                if u != v:
                    anchor -= math.log(math.exp(float(z[v, i] @ z[u, i]) / temperature) / denominator)
            total += anchor / (n_views - 1)
    return torch.tensor(total / (n_views * batch), dtype=torch.float64)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("as_list", [True, False])
def test_matches_monai_contrastive_loss(batch: int, as_list: bool) -> None:
    from monai.losses import ContrastiveLoss  # imported here: the DDP test's spawned workers skip monai

    g = torch.Generator().manual_seed(batch)
    z1, z2 = torch.randn(batch, 32, generator=g), torch.randn(batch, 32, generator=g)
    expected = ContrastiveLoss(temperature=0.5)(z1, z2)
    views = [z1, z2] if as_list else torch.stack([z1, z2])
    actual = NTXentLoss(temperature=0.5)(views)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_monai_other_temperatures(temperature: float) -> None:
    from monai.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    expected = ContrastiveLoss(temperature=temperature)(z1, z2)
    torch.testing.assert_close(NTXentLoss(temperature)([z1, z2]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_views,batch", [(3, 4), (4, 3), (2, 3)])
def test_matches_naive_reference_multi_view(n_views: int, batch: int) -> None:
    views = torch.randn(n_views, batch, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = naive_ntxent(views, 0.3)
    torch.testing.assert_close(NTXentLoss(0.3)(views), expected, atol=1e-10, rtol=1e-10)


def test_list_and_tensor_inputs_agree() -> None:
    views = torch.randn(3, 4, 6)
    loss = NTXentLoss()
    torch.testing.assert_close(loss(views), loss(list(views)))
    torch.testing.assert_close(loss(views), loss(tuple(views)))


# ---------------------------------------------------------------- numerical stability and dtypes


def test_finite_small_temperature_large_norm() -> None:
    views = (1e4 * torch.randn(2, 8, 16)).requires_grad_()
    value = NTXentLoss(temperature=0.01)(views)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(views.grad).all()


@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_finite_identical_embeddings(temperature: float) -> None:
    views = torch.ones(3, 4, 8, requires_grad=True)
    value = NTXentLoss(temperature=temperature)(views)
    value.backward()
    # All candidates are equally similar: each positive has probability 1 / (V*B - 1).
    torch.testing.assert_close(value.detach(), torch.tensor(math.log(3 * 4 - 1)))
    assert torch.isfinite(views.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    views32 = torch.randn(2, 8, 16)
    views = views32.to(dtype).requires_grad_()
    value = NTXentLoss(temperature=0.01)(views)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(views.grad.float()).all()
    assert views.grad.dtype == dtype
    torch.testing.assert_close(value, NTXentLoss(temperature=0.01)(views.detach().float()))


def test_autocast_computes_in_float32() -> None:
    views = torch.randn(2, 8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = NTXentLoss(temperature=0.05)(views)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, NTXentLoss(temperature=0.05)(views))


def test_gradcheck_float64() -> None:
    views = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(NTXentLoss(temperature=0.2), (views,))


def test_aligned_views_lower_than_random() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 32, generator=g)
    aligned = [base + 0.05 * torch.randn(16, 32, generator=g), base + 0.05 * torch.randn(16, 32, generator=g)]
    random = [torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)]
    loss = NTXentLoss()
    assert loss(aligned) < loss(random) - 0.5


def test_single_sample_has_zero_loss() -> None:
    """With one sample and two views the only candidate is the positive."""
    torch.testing.assert_close(NTXentLoss()(torch.randn(2, 1, 4)), torch.tensor(0.0))


@pytest.mark.parametrize(
    "views,match",
    [
        ([torch.randn(4, 8)], "at least 2 views"),
        (torch.randn(1, 4, 8), "at least 2 views"),
        ([torch.randn(4, 8), torch.randn(3, 8)], "same shape"),
        ([torch.randn(4, 8), torch.randn(4, 8, 1)], r"shape \(B, D\)"),
        (torch.randn(2, 4), r"shape \(V, B, D\)"),
        (torch.randn(2, 0, 8), "empty"),
        (torch.ones(2, 4, 8, dtype=torch.long), "floating point"),
    ],
)
def test_invalid_views(views, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NTXentLoss()(views)


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=temperature)


# ---------------------------------------------------------------- logging statistics


def test_similarity_stats() -> None:
    base = torch.randn(8, 16)
    stats = similarity_stats([base, base])
    assert set(stats) == {"pos_cosine", "neg_cosine", "embedding_std"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["pos_cosine"] == pytest.approx(1.0, abs=1e-6)
    z = F.normalize(base, dim=-1)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert stats["neg_cosine"] == pytest.approx(float((z @ z.T)[off_diagonal].mean()), abs=1e-6)
    # collapse: every embedding the same direction -> zero spread
    collapsed = similarity_stats(torch.ones(2, 8, 16).requires_grad_())
    assert collapsed["embedding_std"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["neg_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert NTXentLoss().similarity_stats([base, -base])["pos_cosine"] == pytest.approx(-1.0, abs=1e-6)


# ---------------------------------------------------------------- two-process gloo


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank: compute the loss on its share of fixed batches and save losses and gradients."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        loss_fn = NTXentLoss(temperature=0.3)
        # equal shares, 2 and 3 views
        for n_views in (2, 3):
            full = torch.randn(n_views, 8, 6, generator=torch.Generator().manual_seed(n_views), dtype=torch.float64)
            local = full[:, rank * 4 : (rank + 1) * 4].clone().requires_grad_()
            value = loss_fn(local)
            value.backward()
            results[n_views] = (value.detach(), local.grad)
        # unequal shares: 3 and 5 samples
        full = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        sl = slice(0, 3) if rank == 0 else slice(3, 8)
        results["unequal"] = (loss_fn(full[:, sl]).detach(), full[:, sl].shape[1])
        # a DDP-wrapped projector: averaged parameter gradients equal the single-process full-batch gradients
        projector = torch.nn.parallel.DistributedDataParallel(_projector())
        x = _projector_inputs()[:, rank * 4 : (rank + 1) * 4]
        loss_fn(projector(x)).backward()
        results["ddp_grads"] = [p.grad.clone() for p in projector.module.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _projector() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4).double()


def _projector_inputs() -> torch.Tensor:
    return torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)


@pytest.mark.timeout(120)
def test_distributed_gather_matches_single_process(tmp_path) -> None:
    """Two gloo ranks with half the batch each reproduce the single-process loss and gradients (about 5 s)."""
    world_size = 2
    try:
        torch.multiprocessing.spawn(
            _ddp_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=True
        )
    except torch.multiprocessing.ProcessExitedException:
        # gloo occasionally aborts in its C++ teardown ("terminate called without an active exception") after
        # every rank has saved its results; only a failure before that is a failure of the code under test.
        if not all((tmp_path / f"rank{r}.pt").is_file() for r in range(world_size)):
            raise
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    loss_fn = NTXentLoss(temperature=0.3)
    for n_views in (2, 3):
        full = torch.randn(
            n_views, 8, 6, generator=torch.Generator().manual_seed(n_views), dtype=torch.float64
        ).requires_grad_()
        expected = loss_fn(full)
        expected.backward()
        mean_over_ranks = sum(r[n_views][0] for r in results) / world_size
        torch.testing.assert_close(mean_over_ranks, expected.detach())
        for rank, r in enumerate(results):
            # The gather's backward sums over ranks: each rank's embedding gradient is world_size times the
            # single-process slice (DDP's averaging of parameter gradients divides it back out).
            torch.testing.assert_close(r[n_views][1], world_size * full.grad[:, rank * 4 : (rank + 1) * 4])
    # unequal shares: per-rank means weighted by their anchor counts give the full-batch loss
    full = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    weighted = sum(r["unequal"][0] * r["unequal"][1] for r in results) / 8
    torch.testing.assert_close(weighted, loss_fn(full))
    # DDP parameter gradients (averaged over ranks) equal the single-process gradients
    projector = _projector()
    loss_fn(projector(_projector_inputs())).backward()
    for r in results:
        for got, expected_grad in zip(r["ddp_grads"], (p.grad for p in projector.parameters()), strict=True):
            torch.testing.assert_close(got, expected_grad)


def test_no_gather_without_process_group() -> None:
    views = torch.randn(2, 4, 8)
    torch.testing.assert_close(NTXentLoss(gather_distributed=True)(views), NTXentLoss(gather_distributed=False)(views))


# ---------------------------------------------------------------- pretraining objective


def _pretraining_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shape = (2, 1, 4, 4, 4)
    return {
        "z1": torch.randn(2, 8, generator=g),
        "z2": torch.randn(2, 8, generator=g),
        "recon1": torch.randn(shape, generator=g),
        "recon2": torch.randn(shape, generator=g),
        "target1": torch.randn(shape, generator=g),
        "target2": torch.randn(shape, generator=g),
    }


def test_pretraining_loss_total() -> None:
    x = _pretraining_inputs()
    out = PretrainingLoss(temperature=0.5)(**x)
    assert set(out) == {"loss", "contrastive", "reconstruction"}
    contrastive = NTXentLoss(0.5)([x["z1"], x["z2"]])
    recon = F.l1_loss(x["recon1"], x["target1"]) + F.l1_loss(x["recon2"], x["target2"])
    torch.testing.assert_close(out["contrastive"], contrastive)
    torch.testing.assert_close(out["reconstruction"], recon)
    torch.testing.assert_close(out["loss"], contrastive + recon)
    weighted = PretrainingLoss(contrastive_weight=2.0, reconstruction_weight=0.5)(**x)
    torch.testing.assert_close(weighted["loss"], 2.0 * contrastive + 0.5 * recon)


def test_pretraining_loss_gradients_reach_all_inputs() -> None:
    x = {k: v.clone().requires_grad_() for k, v in _pretraining_inputs().items()}
    PretrainingLoss()(**x)["loss"].backward()
    for name in ("z1", "z2", "recon1", "recon2"):
        assert x[name].grad is not None and x[name].grad.abs().sum() > 0, name


def test_pretraining_loss_without_reconstruction() -> None:
    x = _pretraining_inputs()
    off = PretrainingLoss(reconstruction=False)(**x)
    torch.testing.assert_close(off["loss"], off["contrastive"])
    torch.testing.assert_close(off["reconstruction"], torch.tensor(0.0))
    none_given = PretrainingLoss()(x["z1"], x["z2"])
    torch.testing.assert_close(none_given["loss"], none_given["contrastive"])
    torch.testing.assert_close(none_given["reconstruction"], torch.tensor(0.0))


@pytest.mark.parametrize(
    "drop,match",
    [("target1", "target1 is missing"), ("target2", "target2 is missing"), ("recon2", "both recon1 and recon2")],
)
def test_pretraining_loss_missing_inputs(drop: str, match: str) -> None:
    x = _pretraining_inputs()
    x[drop] = None
    with pytest.raises(ValueError, match=match):
        PretrainingLoss()(**x)


def test_pretraining_loss_shape_mismatch() -> None:
    x = _pretraining_inputs()
    x["target2"] = x["target2"][..., :3]
    with pytest.raises(ValueError, match="shape"):
        PretrainingLoss()(**x)


def test_pretraining_loss_invalid_weights() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        PretrainingLoss(reconstruction_weight=-1.0)

"""The contrastive pretraining iteration, as a MONAI ``SupervisedTrainer`` so every MONAI/ignite handler works.

One iteration: both augmented views go through the network in one batch (instance normalisation is per sample,
so this equals two passes), NT-Xent on the projected embeddings plus L1 reconstruction of each view's clean
target, backward (with the AMP grad scaler when AMP is on), gradient clipping over ALL parameters (norm 12 by
default, after unscaling), optimizer step. MONAI's iteration events (FORWARD_COMPLETED, LOSS_COMPLETED,
BACKWARD_COMPLETED, MODEL_COMPLETED) fire as in ``SupervisedTrainer``.

``engine.state.output`` holds: ``image1``/``image2`` (views), ``image1_recon``/``image2_recon`` (targets),
``pred1``/``pred2`` (reconstructions), ``loss``, ``contrastive``, ``reconstruction``, ``lr``,
``pos_cosine``/``neg_cosine`` (mean positive / negative cosine similarity) and ``embedding_std`` (collapse
indicator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from custom.losses import similarity_stats

__all__ = ["GradientClipping", "PretrainingTrainer", "poly_lr_scheduler", "scalars_to_log"]


def poly_lr_scheduler(optimizer: torch.optim.Optimizer, max_epochs: int, power: float = 0.9):
    """The paper's schedule ``lr * (1 - epoch / max_epochs) ** power``, stepped once per epoch."""
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(int(max_epochs), 1), power=power)


class PretrainingTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration is the two-view contrastive + reconstruction step.

    Args (beyond ``SupervisedTrainer``'s):
        view_keys: batch keys of the two augmented views.
        target_keys: batch keys of their clean reconstruction targets.
        grad_clip: max global gradient norm over all parameters (None or 0: no clipping).
        batch_views: optional call ``batch_views(batch, device=...) -> batch`` run on every batch before the step
            (outside autocast), e.g. :class:`custom.transforms.batched.BatchedContrastiveViews`, which makes the
            two views of every subject on the training device from the regions the loader cut (the bundle's
            ``view_path: batched``). ``None``: the batch already holds the views.

    ``network`` must return a dict with ``z`` (projected embeddings) and ``recon`` (reconstruction or None);
    ``loss_function`` is a :class:`custom.losses.PretrainingLoss`.
    """

    def __init__(
        self,
        *args: Any,
        view_keys: Sequence[str] = ("image1", "image2"),
        target_keys: Sequence[str] = ("image1_recon", "image2_recon"),
        grad_clip: float | None = 12.0,
        batch_views: Callable[..., dict] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.view_keys = tuple(view_keys)
        self.target_keys = tuple(target_keys)
        self.grad_clip = grad_clip
        self.batch_views = batch_views

    def _to_device(self, batch: dict, key: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"pretraining batch has no '{key}' (keys: {sorted(batch)})")
        value = batch[key]
        value = value.as_tensor() if hasattr(value, "as_tensor") else value
        return value.to(self.state.device, non_blocking=self.non_blocking)

    def _iteration(self, engine: PretrainingTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if engine.batch_views is not None:
            batchdata = engine.batch_views(batchdata, device=engine.state.device)
        view1, view2 = (engine._to_device(batchdata, k) for k in engine.view_keys)
        target1, target2 = (engine._to_device(batchdata, k) for k in engine.target_keys)
        batch_size = view1.shape[0]
        engine.state.output = {Keys.IMAGE: view1, "image2": view2, "image1_recon": target1, "image2_recon": target2}

        def forward_and_loss() -> None:
            out = engine.network(torch.cat([view1, view2], dim=0))
            z1, z2 = out["z"][:batch_size], out["z"][batch_size:]
            recon = out.get("recon")
            pred1, pred2 = (None, None) if recon is None else (recon[:batch_size], recon[batch_size:])
            engine.state.output.update({"pred1": pred1, "pred2": pred2, Keys.PRED: pred1, "z1": z1, "z2": z2})
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            extra = {}
            if getattr(engine.loss_function, "dense", None) is not None:
                maps = out["maps"]
                extra = {
                    "maps1": [m[:batch_size] for m in maps],
                    "maps2": [m[batch_size:] for m in maps],
                    "affine1": engine._to_device(batchdata, f"{engine.view_keys[0]}_affine"),
                    "affine2": engine._to_device(batchdata, f"{engine.view_keys[1]}_affine"),
                }
            terms = engine.loss_function(z1, z2, pred1, pred2, target1, target2, **extra)
            engine.state.output.update({Keys.LOSS: terms["loss"], **{k: v for k, v in terms.items() if k != "loss"}})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and engine.scaler is not None
        if use_amp:
            with torch.autocast("cuda", **engine.amp_kwargs):
                forward_and_loss()
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
        else:
            forward_and_loss()
            engine.state.output[Keys.LOSS].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.grad_clip:
            if use_amp:
                engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.grad_clip)
        if use_amp:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()

        stats = similarity_stats([engine.state.output["z1"].detach(), engine.state.output["z2"].detach()])
        engine.state.output.update(stats)
        engine.state.output["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        for key in ("loss", "contrastive", "reconstruction", "dense"):
            value = engine.state.output.get(key)
            if isinstance(value, torch.Tensor):
                engine.state.output[key] = value.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


LOGGED_SCALARS = ("loss", "contrastive", "reconstruction", "dense", "pos_cosine", "neg_cosine", "embedding_std", "lr")


def scalars_to_log(output: dict) -> dict[str, float]:
    """The per-iteration scalars that go to TensorBoard (``output_transform`` of ``TensorBoardStatsHandler``)."""
    scalars = {}
    for key in LOGGED_SCALARS:
        value = output.get(key) if isinstance(output, dict) else None
        if value is None:
            continue
        scalars[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return scalars


class GradientClipping:
    """Clip the global gradient norm of a MONAI trainer's optimizer parameters after every backward pass.

    Attached to ``IterationEvents.BACKWARD_COMPLETED`` of a ``SupervisedTrainer``; with AMP the gradients are
    unscaled first (``GradScaler.unscale_``), so the threshold applies to the true gradients.
    """

    def __init__(self, max_norm: float = 12.0) -> None:
        self.max_norm = float(max_norm)

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if self.max_norm <= 0:
            return
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


# Bytes kept for backward per voxel-channel of each encoder level, per view (convolution, normalisation,
# activation and dropout outputs of two convolutions, plus the reconstructor), measured on CPU: the paper model
# (64-768 widths) on two 96^3 views peaked at 7.3 GiB of process memory, about 1 GiB of which is the interpreter
# and libraries.
_BYTES_PER_ACTIVATION = 44.0


def estimated_step_memory_gib(batch_size: int, patch_size: Sequence[int], features: Sequence[int]) -> float:
    """Rough memory (GiB) of one pretraining step: two views of ``batch_size`` patches through the encoder."""
    voxels = 1.0
    for s in patch_size:
        voxels *= float(s)
    per_view = sum(float(f) * voxels / 8.0**level for level, f in enumerate(features))
    return 2 * int(batch_size) * per_view * _BYTES_PER_ACTIVATION / 2**30


def _available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def check_cpu_memory(
    device: torch.device | str, batch_size: int, patch_size: Sequence[int], features: Sequence[int]
) -> None:
    """Stop with a clear message, before training starts, when a CPU step would not fit in the free memory.

    On a GPU (or where free memory is unknown) nothing is checked. The paper configuration (batch 8, 96^3 views,
    64-768 widths) needs about 50 GiB per step on the CPU.
    """
    if torch.device(device).type != "cpu":
        return
    need = estimated_step_memory_gib(batch_size, patch_size, features)
    free = _available_memory_gib()
    if free is not None and need > 0.9 * free:
        from custom.errors import InputError

        raise InputError(
            f"one training step with batch_size {batch_size}, patch_size {list(patch_size)} and encoder widths "
            f"{list(features)} needs about {need:.0f} GiB on the CPU, but {free:.0f} GiB is free. Use a GPU, merge "
            "configs/cpu_small.yaml (CPU-size settings), or lower --batch_size"
        )

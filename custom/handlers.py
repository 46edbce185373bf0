"""Ignite/MONAI event handlers used by the bundles: resumable checkpoints, weight export, PNG snapshots.

MONAI's ``CheckpointSaver`` writes non-atomically (``atomic=False`` in its DiskSaver) and needs a fixed
``load_path`` for resuming, so :class:`ResumableCheckpoint` saves one latest checkpoint atomically and, on
start, resumes from it when it exists (loading is delegated to MONAI's ``CheckpointLoader``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from custom.io import atomic_torch_save, atomic_write

__all__ = ["ResumableCheckpoint", "EncoderExport", "ViewSnapshot", "is_main_process"]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True on rank 0 (or without torch.distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _state_objects(objects: Mapping[str, object]) -> dict[str, object]:
    """Objects with a state dict; ``None`` entries (e.g. the AMP scaler when AMP is off) are left out."""
    return {k: v for k, v in objects.items() if v is not None}


_SCHEDULE_SETTINGS = ("total_iters", "power", "T_max", "milestones", "gamma")


def _resync_learning_rate(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the optimizer's learning rates to what the (possibly re-configured) schedule gives at its step."""
    if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
        step = min(scheduler.last_epoch, scheduler.total_iters)
        factor = (1.0 - step / max(scheduler.total_iters, 1)) ** scheduler.power
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class ResumableCheckpoint:
    """Save ``ckpt_dir/checkpoint.pt`` every ``iteration_interval`` iterations and every epoch; resume on start.

    The checkpoint holds every object of ``save_dict`` (network, optimizer, LR scheduler, trainer state, AMP
    scaler...), so a run stopped by SIGINT, kill or a crash continues where it was when started again with the
    same command. Only rank 0 writes; every rank resumes.

    Args:
        ckpt_dir: folder of the checkpoint.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (None values are ignored).
        iteration_interval: also save every this many iterations (0: only at epoch ends).
        resume: resume from an existing checkpoint when the engine starts.
        filename: checkpoint file name.
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        save_dict: Mapping[str, object],
        iteration_interval: int = 0,
        resume: bool = True,
        filename: str = "checkpoint.pt",
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.save_dict = _state_objects(save_dict)
        self.iteration_interval = int(iteration_interval)
        self.resume = bool(resume)

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.iteration_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.info(f"no checkpoint at {self.path}: starting from scratch")
            return
        device = getattr(engine.state, "device", None) or "cpu"
        # an LR schedule's length comes from this run's config: a run restarted with more --max_epochs continues
        # with the longer schedule instead of the finished one's (whose LR has already decayed to 0)
        schedule = {
            name: {k: getattr(obj, k) for k in _SCHEDULE_SETTINGS if hasattr(obj, k)}
            for name, obj in self.save_dict.items()
            if isinstance(obj, torch.optim.lr_scheduler.LRScheduler)
        }
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        present = {k: v for k, v in self.save_dict.items() if k in saved}
        missing = sorted(set(self.save_dict) - set(present))
        if missing:
            logger.info(f"{self.path} holds no state for {missing}: they start fresh")
        del saved
        CheckpointLoader(load_path=str(self.path), load_dict=present, map_location=device)(engine)
        for name, settings in schedule.items():
            scheduler = self.save_dict[name]
            for key, value in settings.items():
                setattr(scheduler, key, value)
            _resync_learning_rate(scheduler)
        logger.info(f"resumed from {self.path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def save(self, engine: Engine) -> None:
        if not is_main_process():
            return
        state = {k: v.state_dict() for k, v in self.save_dict.items()}  # type: ignore[attr-defined]
        atomic_torch_save(state, self.path)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class EncoderExport:
    """Write the encoder-only state dict (the bundle's ``models/model.pt``) at every epoch end and at completion.

    Args:
        network: the pretraining model (or its DDP wrapper); ``network.encoder`` is exported.
        path: target file (written atomically, rank 0 only).
    """

    def __init__(self, network: torch.nn.Module, path: str | Path) -> None:
        self.network = network
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        encoder = _unwrap(self.network).encoder
        state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        atomic_torch_save(state, self.path)

    def report(self, engine: Engine) -> None:
        if is_main_process():
            logger.info("encoder weights (encoder-only state dict): %s", self.path.resolve())


class ViewSnapshot:
    """Every ``interval`` epochs, a PNG of both views, their clean targets and their reconstructions.

    Reads ``engine.state.output`` keys (first item of the batch, middle axial and coronal slices) and writes
    ``output_dir/snapshots/epoch_XXXX.png`` atomically (rank 0).
    """

    def __init__(
        self,
        output_dir: str | Path,
        interval: int = 1,
        keys: Sequence[str] = ("image1", "image1_recon", "pred1", "image2", "image2_recon", "pred2"),
    ) -> None:
        self.folder = Path(output_dir) / "snapshots"
        self.interval = max(int(interval), 1)
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        output = engine.state.output or {}
        images = {}
        for key in self.keys:
            value = output.get(key) if isinstance(output, Mapping) else None
            if isinstance(value, torch.Tensor) and value.ndim == 5:
                images[key] = value[0, 0].detach().float().cpu().numpy()
        if not images:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6), squeeze=False)
        for col, (key, vol) in enumerate(images.items()):
            axial = vol[:, :, vol.shape[2] // 2].T
            coronal = vol[:, vol.shape[1] // 2, :].T
            for row, sl in enumerate((axial, coronal)):
                axes[row, col].imshow(sl, cmap="gray", origin="lower")
                axes[row, col].axis("off")
            axes[0, col].set_title(key, fontsize=8)
        fig.suptitle(f"epoch {engine.state.epoch}", fontsize=9)
        fig.tight_layout()
        atomic_write(lambda p: fig.savefig(p, dpi=80), self.folder / f"epoch_{engine.state.epoch:04d}.png")
        plt.close(fig)

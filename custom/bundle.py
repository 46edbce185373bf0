"""Small helpers for bundle configs (things that would otherwise grow into long ``$`` expressions)."""

from __future__ import annotations

import ast
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_root", "repeat_to_length"]

logger = logging.getLogger(__name__)


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        value = value.strip()
        if value.startswith("["):
            try:
                return [str(v) for v in ast.literal_eval(value)]
            except (ValueError, SyntaxError):
                return []
        return [v.strip() for v in value.split(",") if v.strip()]
    return []


def bundle_root(default: str, argv: Sequence[str] | None = None) -> str:
    """The bundle folder: the parent of the ``configs/`` folder of the first ``--config_file`` on the command line.

    So ``python -m monai.bundle run --config_file /any/where/<bundle>/configs/train.yaml`` finds its own
    ``models/`` and writes its outputs inside the bundle wherever it is run from. Without a ``--config_file``
    argument (e.g. a bundle driven from Python) ``default`` is returned; ``--bundle_root`` overrides both.
    """
    files = _config_files_from_argv(sys.argv if argv is None else argv)
    if files:
        config = Path(files[0])
        if config.parent.name == "configs":
            return str(config.parent.parent)
    return default


def repeat_to_length(items: Sequence[object], length: int) -> list[object]:
    """``items`` repeated (in order) to exactly ``length`` entries, e.g. to define an epoch by iterations."""
    if not items:
        raise ValueError("cannot repeat an empty list of items")
    reps = -(-int(length) // len(items))
    return (list(items) * reps)[: int(length)]


RANDOM_ENCODER = "random"
AUTO_ENCODER = "auto"


def resolve_encoder(spec: str | None, default_bundle: str | Path) -> str | None:
    """The encoder weights a downstream bundle loads (``--pretrained_encoder``).

    Args:
        spec: a weights file (``model.pt``, checkpoint), a ``seqinv_pretrain`` bundle folder, ``"random"`` for a
            randomly initialised encoder (the "no pretraining" control), or ``"auto"``: ``default_bundle``'s
            ``models/model.pt`` when it exists, else a random encoder with a warning saying so.
        default_bundle: the pretraining bundle used by ``"auto"``.

    Returns:
        a path for :func:`custom.networks.load_encoder_weights`, or ``None`` for random initialisation.
    """
    from custom.errors import InputError

    if spec is None or str(spec).lower() == RANDOM_ENCODER:
        logger.info("encoder: randomly initialised (the no-pretraining control)")
        return None
    if str(spec).lower() == AUTO_ENCODER:
        weights = Path(default_bundle) / "models" / "model.pt"
        if weights.is_file():
            logger.info("encoder: pretrained weights from %s", weights)
            return str(weights)
        logger.warning(
            "no pretrained encoder at %s; using a RANDOMLY INITIALISED encoder. Train bundles/seqinv_pretrain "
            "first or pass --pretrained_encoder <model.pt | bundle folder | random>.", weights,
        )  # fmt: skip
        return None
    path = Path(str(spec))
    if not path.exists():
        raise InputError(f"--pretrained_encoder {path}: no such file or bundle folder")
    logger.info("encoder: pretrained weights from %s", path)
    return str(path)

"""Small helpers for bundle configs (things that would otherwise grow into long ``$`` expressions)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_root", "repeat_to_length"]


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

"""Keep the shared part of the downstream bundles' ``train.yaml`` files in step with its one source.

The three downstream bundles (``ixi_tissue_seg``, ``arc_lesion_seg``, ``ixi_denoise``) train the same way: the
optimizer, scheduler, datasets, loaders, handlers, engines, checkpointing and run list are one block of YAML,
written once in ``bundles/_shared/downstream_train.yaml``. Each bundle's ``configs/train.yaml`` is its own head
(paths, data, network, loss, transforms, task-specific validation pieces) followed by a verbatim copy of that
block, starting at the block's first line (:data:`MARKER`). A copy, not a cross-file reference, because a bundle
zip must run on its own from any folder, and MONAI resolves ``%`` macros to files relative to the working
directory. :func:`sync_configs` rewrites the copies (``seqinv configs --write``) or lists the stale ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from custom.errors import InputError

__all__ = ["DOWNSTREAM_BUNDLES", "MARKER", "SHARED_TRAIN", "render", "sync_configs"]

SHARED_TRAIN = Path("bundles") / "_shared" / "downstream_train.yaml"
DOWNSTREAM_BUNDLES = ("ixi_tissue_seg", "arc_lesion_seg", "ixi_denoise")
MARKER = "# ---------------------------------------------------------------- shared by the downstream bundles"


def render(config_text: str, shared_text: str, name: str = "train.yaml") -> str:
    """``config_text`` up to the :data:`MARKER` line, then ``shared_text`` (which must start with the marker)."""
    if not shared_text.startswith(MARKER + "\n"):
        raise InputError(f"{SHARED_TRAIN}: must start with the line {MARKER!r}")
    lines = config_text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\n") == MARKER:
            return "".join(lines[:i]) + shared_text
    raise InputError(f"{name}: no line {MARKER!r} where the shared part of the downstream train.yaml files begins")


def sync_configs(
    root: str | Path = ".", write: bool = False, bundles: Sequence[str] = DOWNSTREAM_BUNDLES
) -> list[Path]:
    """The downstream ``train.yaml`` files whose shared part differs from :data:`SHARED_TRAIN`.

    Args:
        root: the repository root.
        write: rewrite those files (their own head is kept).
        bundles: bundle folder names under ``root/bundles``.

    Returns:
        The files that differed (and were rewritten when ``write``).
    """
    root = Path(root)
    source = root / SHARED_TRAIN
    if not source.is_file():
        raise InputError(f"{source}: shared downstream training config not found (run from the repository root)")
    shared = source.read_text()
    stale = []
    for name in bundles:
        path = root / "bundles" / name / "configs" / "train.yaml"
        if not path.is_file():
            raise InputError(f"{path}: not found")
        current = path.read_text()
        wanted = render(current, shared, name=str(path))
        if wanted != current:
            stale.append(path)
            if write:
                path.write_text(wanted)
    return stale

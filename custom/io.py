"""Atomic file writes: write to a temporary file in the destination folder, then rename over the target.

A reader never sees a half-written checkpoint, weight file, image or table, and an interrupted write leaves
the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write", "atomic_write_text"]


def _create_unique(folder: Path, stem: str, suffix: str) -> Path:
    """Create a new empty file ``.tmp-<stem>-<random><suffix>`` in ``folder`` and return its path.

    Created with ``os.open(..., 0o666)`` so it gets the permissions a plain ``open()`` gives (0666 less the
    process umask, applied by the kernel); ``tempfile.mkstemp`` would make it private (0600), and reading the
    umask means setting it, a process-wide change.
    """
    for _ in range(100):
        path = folder / f".tmp-{stem}-{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same suffixes); on success it is renamed to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    tmp_path = _create_unique(target.parent, target.stem.split(".")[0], suffix)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_torch_save(obj: object, target: str | Path) -> Path:
    """``torch.save`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def atomic_write_text(text: str, target: str | Path) -> Path:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def atomic_write(writer: Callable[[Path], object], target: str | Path) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``target`` atomically (for nibabel, matplotlib...)."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)

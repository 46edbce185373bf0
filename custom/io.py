"""Atomic file writes: write to a temporary file in the destination folder, then rename over the target.

A reader never sees a half-written checkpoint, weight file, image or table, and an interrupted write leaves
the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write", "atomic_write_text"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it, which races with threads)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same suffixes); on success it is renamed to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.stem.split('.')[0]}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes files private (0600); outputs get the permissions a plain open() gives (0666 less the umask)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
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

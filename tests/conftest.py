"""Session-wide test fixtures.

``synthetic_dataset`` generates each tiny synthetic data set (qMRI, IXI-like, ARC-like) once per test session and
hands the same folder to every test that asks for the same (subjects, seed, resolution). The tests read these
folders only; a test that writes data makes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SyntheticDataset = Callable[..., Path]


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """``get(subjects=9, seed=0, resolution=6.0) -> Path``: the root of a synthetic data set, generated once."""
    cache: dict[tuple[int, int, float], Path] = {}

    def get(subjects: int = 9, seed: int = 0, resolution: float = 6.0) -> Path:
        from custom.data.synthetic import generate_dataset

        key = (int(subjects), int(seed), float(resolution))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"synthetic_{subjects}s_seed{seed}_{resolution:g}mm")
            generate_dataset(root, subjects=subjects, seed=seed, resolution=resolution, preview=False, progress=False)
            cache[key] = root
        return cache[key]

    return get

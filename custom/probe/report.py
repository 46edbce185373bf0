"""The probe's report: the Markdown table, the per-encoder rows, the train x test heatmap and JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import atomic_write

__all__ = ["format_probe_table", "probe_rows", "write_heatmap", "json_safe"]


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_ci(value: float, ci: Sequence[float]) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def format_probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`run_probe` rows."""
    lines = [
        "| encoder | cross-contrast BA [95% CI] | same-contrast BA [95% CI] | dense deepest: same / diff subject "
        "| dense deepest: difference | dense all levels: same / diff subject | dense all levels: difference "
        "| retrieval top-1 (chance) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {_fmt_ci(r['cross_contrast'], r['cross_contrast_ci'])} "
            f"| {_fmt_ci(r['same_contrast'], r['same_contrast_ci'])} "
            f"| {_fmt(r['dense_same_deepest'])} / {_fmt(r['dense_different_deepest'])} "
            f"| {_fmt(r['dense_difference_deepest'], 4)} "
            f"| {_fmt(r['dense_same_mean'])} / {_fmt(r['dense_different_mean'])} "
            f"| {_fmt(r['dense_difference_mean'], 4)} "
            f"| {_fmt(r['retrieval_top1'])} ({_fmt(r['retrieval_chance'])}) |"
        )
    return "\n".join(lines)


def probe_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "encoder": name,
                "cross_contrast": r["cross_contrast"],
                "cross_contrast_ci": r["cross_contrast_ci"],
                "same_contrast": r["same_contrast"],
                "same_contrast_ci": r["same_contrast_ci"],
                "dense_same_deepest": r["dense_deepest"]["same_subject"],
                "dense_different_deepest": r["dense_deepest"]["different_subject"],
                "dense_difference_deepest": r["dense_deepest"]["difference"],
                "dense_same_mean": r["dense_mean"]["same_subject"],
                "dense_different_mean": r["dense_mean"]["different_subject"],
                "dense_difference_mean": r["dense_mean"]["difference"],
                "retrieval_top1": r["retrieval"]["top1"],
                "retrieval_chance": r["retrieval"]["chance_top1"],
            }
        )
    return rows


def write_heatmap(path: Path, results: Mapping[str, Any], contrasts: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 4)
    rows = int(math.ceil(n / cols))
    k = len(contrasts)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.9 * cols + 1.0, 4.1 * rows + 0.4), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (name, r) in zip(axes.flat, results.items(), strict=False):
        matrix = np.asarray(r["matrix"], dtype=float)
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(k):
            for j in range(k):
                if math.isfinite(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_title(f"{name}\ncross {_fmt(r['cross_contrast'])}, same {_fmt(r['same_contrast'])}", fontsize=8)
        ax.set_xticks(range(k), contrasts, rotation=90, fontsize=6)
        ax.set_yticks(range(k), contrasts, fontsize=6)
        ax.set_xlabel("test contrast", fontsize=7)
        ax.set_ylabel("train contrast", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="balanced accuracy (chance 1/3)")
    fig.suptitle("GM/WM/CSF linear probe: train contrast (rows) x test contrast (columns)", fontsize=9)
    atomic_write(lambda tmp: fig.savefig(tmp, format="png", dpi=120), path)
    plt.close(fig)


def json_safe(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value

"""Per-subject result tables: CSV and Markdown, grouped summaries (mean +- std) that count undefined values.

:class:`ResultsTable` holds one row per subject (``subject``, ``site``, ``contrast``, ... and metric columns),
writes CSV and Markdown atomically (:mod:`custom.io`), and summarises metrics per group as mean +- std, ignoring
undefined (NaN/inf/missing) values and counting them. The metrics themselves are in :mod:`custom.metrics`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom.io import atomic_path, atomic_write_text

__all__ = ["NOT_AVAILABLE", "ResultsTable"]

#: Placeholder shown in Markdown cells where a group has no defined value for a metric.
NOT_AVAILABLE = "n/a"


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` when the value is undefined (None, "", NaN, inf). Raises on text."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in {"n/a", "na", "none"}:
            return None
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"not a number: {value!r}") from err
    return x if math.isfinite(x) else None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _rank(values: list[Any], order: Sequence[Any] | None) -> dict[Any, int]:
    """Rank of each value: listed ones in ``order``'s order, then the others by first appearance."""
    ranks: dict[Any, int] = {}
    listed = list(dict.fromkeys(v for v in (order or []) if v in values))
    for i, v in enumerate(listed):
        ranks[v] = i
    for v in values:
        if v not in ranks:
            ranks[v] = len(ranks)
    return ranks


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class ResultsTable:
    """Per-subject results: one row (a ``dict``) per subject, e.g. ``subject``, ``site``, ``contrast`` and metrics.

    Undefined metric values (NaN, inf, ``None``, empty strings) are kept in the rows, excluded from means and
    standard deviations, and counted (``n_undefined``) in :meth:`summary` and the Markdown captions.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one subject's row."""
        self.rows.append(dict(row))

    @property
    def columns(self) -> list[str]:
        """All column names, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for k in row:
                seen.setdefault(k, None)
        return list(seen)

    def metric_columns(self, exclude: Iterable[str] = ()) -> list[str]:
        """Columns whose values are all numbers or undefined (and at least one is a number), minus ``exclude``.

        Count columns (``n_*`` or ``*_n_*``, e.g. ``hd95_n_undefined``) are not metrics and are left out.
        """
        excluded = set(exclude)
        out = []
        for col in self.columns:
            if col in excluded or col.startswith("n_") or "_n_" in col:
                continue
            values = [r.get(col) for r in self.rows]
            present = [v for v in values if v is not None and v != ""]
            if present and all(_is_number(v) for v in present):
                out.append(col)
        return out

    # -------------------------------------------------------------------------------------- CSV

    def to_csv(self, path: str | Path) -> Path:
        """Write all rows to ``path`` as CSV (atomically). Missing cells are empty; NaN is written as ``nan``."""
        columns = self.columns
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, restval="")
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
        return Path(path)

    @classmethod
    def from_csv(
        cls, path: str | Path, text_columns: Sequence[str] = ("subject", "site", "contrast", "model")
    ) -> ResultsTable:
        """Read a table written by :meth:`to_csv`.

        Columns in ``text_columns`` stay strings (so subject ``"002"`` keeps its zeros); any other column whose
        non-empty cells all parse as numbers becomes float (``nan``/``inf`` included; empty cells become NaN).
        """
        with open(path, newline="") as fh:
            raw = list(csv.DictReader(fh))
        if not raw:
            return cls()
        numeric = []
        for col in raw[0]:
            if col in text_columns:
                continue
            cells = [r[col] for r in raw if r.get(col) not in (None, "")]
            try:
                [float(c) for c in cells]
            except ValueError:
                continue
            numeric.append(col)
        rows = []
        for r in raw:
            row: dict[str, Any] = dict(r)
            for col in numeric:
                row[col] = float(r[col]) if r.get(col) not in (None, "") else float("nan")
            rows.append(row)
        return cls(rows)

    # -------------------------------------------------------------------------------------- summary

    def _groups(self, group_by: Sequence[str]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for i, row in enumerate(self.rows):
            missing = [k for k in group_by if k not in row]
            if missing:
                raise ValueError(f"row {i} ({row.get('subject', '?')}) has no {missing} column to group by")
            groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
        return groups

    @staticmethod
    def _stats(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float | int]:
        values, undefined = [], 0
        for row in rows:
            try:
                x = _number(row.get(metric))
            except ValueError as err:
                raise ValueError(f"column {metric!r}, subject {row.get('subject', '?')}: {err}") from err
            if x is None:
                undefined += 1
            else:
                values.append(x)
        n = len(values)
        mean = float(np.mean(values)) if n else float("nan")
        std = float(np.std(values, ddof=1)) if n > 1 else float("nan")
        return {"mean": mean, "std": std, "n": n, "n_undefined": undefined}

    def summary(
        self, group_by: Sequence[str] = ("site", "contrast"), metrics: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Mean, sample standard deviation (ddof=1), n and n_undefined of each metric per group.

        NaN/inf/missing values are ignored per metric and counted in ``n_undefined``; ``mean`` is NaN only when
        a group has no defined value, ``std`` is NaN when it has fewer than two.

        Returns:
            One flat dict per group (groups in order of first appearance): the ``group_by`` keys, ``n_subjects``,
            and ``<metric>:mean``, ``<metric>:std``, ``<metric>:n``, ``<metric>:n_undefined`` per metric -
            ready for ``ResultsTable(table.summary()).to_csv(path)``.
        """
        group_by = tuple(group_by)
        if metrics is None:
            metrics = self.metric_columns(exclude=(*group_by, "subject"))
        out = []
        for key, rows in self._groups(group_by).items():
            entry: dict[str, Any] = dict(zip(group_by, key, strict=True))
            entry["n_subjects"] = len(rows)
            for m in metrics:
                for stat, value in self._stats(rows, m).items():
                    entry[f"{m}:{stat}"] = value
            out.append(entry)
        return out

    # -------------------------------------------------------------------------------------- Markdown

    @staticmethod
    def _cell(stats: Mapping[str, float | int], fmt: str, scale: float) -> str:
        if stats["n"] == 0:
            return NOT_AVAILABLE
        mean = fmt.format(stats["mean"] * scale)
        if stats["n"] < 2:
            return mean
        return f"{mean} ± {fmt.format(stats['std'] * scale)}"

    @staticmethod
    def _row_label(key: tuple[Any, ...]) -> str:
        """Paper style: ``GST [T1w]`` for (site, contrast); ``GST`` for one key; ``GST [T1w, 10%]`` for three."""
        if len(key) == 1:
            return str(key[0])
        return f"{key[0]} [{', '.join(str(k) for k in key[1:])}]"

    def to_markdown(
        self,
        group_by: Sequence[str] = ("site", "contrast"),
        metrics: Sequence[str] | None = None,
        caption: str | None = None,
        row_order: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None,
        col_order: Sequence[Any] | None = None,
        fmt: str = "{:.3f}",
        col_key: str | None = None,
        labels: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
    ) -> str:
        """A Markdown table of "mean ± std" cells laid out like the paper's Tables 1-3, with a caption line under it.

        Rows are the groups of ``group_by`` (labelled ``GST [T1w]`` for site and contrast, as in the paper);
        columns are the ``metrics``, or, when ``col_key`` is given (e.g. ``"contrast"`` or ``"model"``), one
        column per metric and value of that key - the Table 1 grid. A group with no defined value shows ``n/a``;
        one defined value shows the mean alone. The caption line gives ``caption``, the statistics used and how
        many undefined values (e.g. HD95 with an empty mask) each metric had, and where.

        Args:
            group_by: row keys.
            metrics: metric columns (default: every numeric column not used as a key).
            caption: text for the caption line (e.g. :data:`PSNR_CAPTION`).
            row_order: order of the first ``group_by`` key's values (e.g. ``["GST", "HH", "IOP"]``), or a mapping
                ``{key: [values...]}`` for several keys; unlisted values follow in order of first appearance.
            col_order: order of ``col_key`` values (unlisted ones follow).
            fmt: format of means and standard deviations.
            col_key: optional key whose values become columns.
            labels: display names for metrics (e.g. ``{"dice_mean": "DSC", "hd95_mean": "HD95 (mm)"}``).
            scale: per-metric display factor (e.g. ``{"dice_mean": 100}`` for the paper's percent Dice).
        """
        group_by = tuple(group_by)
        keys = (*group_by, col_key) if col_key else group_by
        if metrics is None:
            metrics = self.metric_columns(exclude=(*keys, "subject"))
        if not metrics:
            raise ValueError("no metric columns to tabulate")
        labels = dict(labels or {})
        scale = dict(scale or {})
        groups = self._groups(keys)

        # rows: sorted by per-key ranks
        row_keys = list(dict.fromkeys(k[: len(group_by)] for k in groups))
        orders: dict[str, Sequence[Any] | None]
        if isinstance(row_order, Mapping):
            orders = {k: row_order.get(k) for k in group_by}
        else:
            orders = {k: (row_order if i == 0 else None) for i, k in enumerate(group_by)}
        ranks = [_rank(list(dict.fromkeys(rk[i] for rk in row_keys)), orders[k]) for i, k in enumerate(group_by)]
        row_keys.sort(key=lambda rk: tuple(ranks[i][v] for i, v in enumerate(rk)))

        col_values: list[Any] = [None]
        if col_key:
            found = list(dict.fromkeys(k[-1] for k in groups))
            col_rank = _rank(found, col_order)
            col_values = sorted(found, key=col_rank.__getitem__)

        header = [" / ".join(group_by)]
        for m in metrics:
            name = labels.get(m, m)
            header += [f"{name} [{v}]" if col_key else name for v in col_values]
        lines = [
            "| " + " | ".join(_md_escape(h) for h in header) + " |",
            "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        undefined: dict[str, list[tuple[str, int]]] = {m: [] for m in metrics}
        for rk in row_keys:
            cells = [self._row_label(rk)]
            for m in metrics:
                for v in col_values:
                    rows = groups.get((*rk, v) if col_key else rk)
                    if rows is None:
                        cells.append("")
                        continue
                    stats = self._stats(rows, m)
                    cells.append(self._cell(stats, fmt, scale.get(m, 1.0)))
                    if stats["n_undefined"]:
                        where = self._row_label(rk) + (f" ({v})" if col_key else "")
                        undefined[m].append((where, int(stats["n_undefined"])))
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")

        notes = [caption.strip()] if caption else []
        notes.append("Values: mean ± sample std over subjects; n/a: no defined value.")
        for m, where in undefined.items():
            if where:
                total = sum(n for _, n in where)
                detail = "; ".join(f"{w}: {n}" for w, n in where)
                notes.append(
                    f"{labels.get(m, m)}: {total} undefined value(s) excluded (empty prediction or reference, or "
                    f"missing) - {detail}."
                )
        return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"

    def to_markdown_pivot(
        self,
        row_key: str = "site",
        col_key: str = "contrast",
        metric: str | Sequence[str] = "dice_mean",
        **kwargs: Any,
    ) -> str:
        """Table 1 style grid: rows = ``row_key`` values (sites), columns = ``col_key`` values (contrasts) per metric.

        ``metric`` may be one column or several (columns metric x contrast). Other keyword arguments go to
        :meth:`to_markdown` (``caption``, ``row_order``, ``col_order``, ``fmt``, ``labels``, ``scale``).
        """
        metrics = [metric] if isinstance(metric, str) else list(metric)
        return self.to_markdown(group_by=(row_key,), metrics=metrics, col_key=col_key, **kwargs)

    def write_markdown(self, path: str | Path, pivot: bool = False, **kwargs: Any) -> Path:
        """Write :meth:`to_markdown` (or :meth:`to_markdown_pivot` when ``pivot``) output to ``path`` atomically."""
        text = self.to_markdown_pivot(**kwargs) if pivot else self.to_markdown(**kwargs)
        return atomic_write_text(text, path)

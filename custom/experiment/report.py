"""Results of an experiment: the long CSV, paper-layout Markdown tables and the label-efficiency figure.

Statistics: for each cell (encoder, task, contrast, fraction, seed) and test site, the mean over the site's test
subjects (undefined values such as HD95 of an empty mask left out); then over seeds, the mean and the sample
standard deviation of those per-seed means. Both steps use :class:`custom.metrics.ResultsTable`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custom.experiment.grid import TASKS, display_encoder, parse_fraction
from custom.io import atomic_write, atomic_write_text
from custom.metrics import ResultsTable

__all__ = [
    "RESULT_COLUMNS",
    "direction",
    "read_results",
    "render_tables",
    "summarise",
    "write_figure",
    "write_report",
    "write_results",
]

RESULT_COLUMNS = ("encoder", "task", "fraction", "contrast", "seed", "site", "subject", "metric", "value")
_TEXT = ("encoder", "task", "fraction", "contrast", "site", "subject", "metric")
_SITE_ORDER = ("GST", "HH", "IOP")
_KEY = ("task", "contrast", "metric", "encoder", "site", "fraction")


def direction(metric: str) -> int:
    """+1 when higher is better (Dice, PSNR, SSIM), -1 when lower is (HD95, MSE), 0 when neither (volumes)."""
    m = metric.lower()
    if m.startswith("hd95") or "mse" in m or "loss" in m:
        return -1
    if m.startswith(("dice", "psnr", "ssim")):
        return 1
    return 0


def _fmt(metric: str) -> str:
    return "{:.2f}" if metric.lower().startswith(("psnr", "hd95", "volume")) else "{:.3f}"


def _order(found: Sequence[Any], preferred: Sequence[Any] = ()) -> list[Any]:
    """``found`` values: those in ``preferred`` first, in its order, then the rest in order of appearance."""
    first = [v for v in preferred if v in found]
    return first + [v for v in dict.fromkeys(found) if v not in first]


def _fraction_order(found: Sequence[str]) -> list[str]:
    """Training-set sizes, smallest first: numbers of subjects, then fractions."""

    def key(k: str) -> tuple[int, float]:
        f = parse_fraction(k)
        return (0, float(f.subjects)) if f.subjects is not None else (1, float(f.fraction))

    return sorted(dict.fromkeys(found), key=key)


def _metrics_for(task: str, found: Sequence[str], metrics: Mapping[str, Sequence[str]]) -> list[str]:
    """The metrics shown for ``task``: those asked for (or the task's defaults) that exist; else all found."""
    found = list(dict.fromkeys(found))
    preferred = metrics.get(task) or (TASKS[task].metrics if task in TASKS else ())
    return [m for m in preferred if m in found] or found


# ------------------------------------------------------------------------------------------------- CSV


def write_results(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``results.csv``: one row per cell x subject x metric (the header alone when there is none)."""
    if not rows:
        return atomic_write_text(",".join(RESULT_COLUMNS) + "\n", path)
    return ResultsTable([{k: row.get(k) for k in RESULT_COLUMNS} for row in rows]).to_csv(path)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` (text columns kept as text, ``seed`` as int, ``value`` as float)."""
    rows = ResultsTable.from_csv(path, text_columns=_TEXT).rows
    for row in rows:
        row["seed"] = int(row["seed"])
    return rows


# ------------------------------------------------------------------------------------------------- statistics


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, ...], dict[str, float]]:
    """``{(task, contrast, metric, encoder, site, fraction): {"mean", "std", "n"}}`` over seeds of per-seed means.

    ``n`` counts the seeds with a defined per-seed mean; ``std`` is NaN below two.
    """
    if not rows:
        return {}
    per_subject = ResultsTable([{**{k: row[k] for k in (*_KEY, "seed")}, "value": row["value"]} for row in rows])
    per_seed = [
        {**{k: s[k] for k in (*_KEY, "seed")}, "value": s["value:mean"]}
        for s in per_subject.summary(group_by=(*_KEY, "seed"), metrics=["value"])
    ]
    out = {}
    for s in ResultsTable(per_seed).summary(group_by=_KEY, metrics=["value"]):
        out[tuple(str(s[k]) for k in _KEY)] = {"mean": s["value:mean"], "std": s["value:std"], "n": s["value:n"]}
    return out


# ------------------------------------------------------------------------------------------------- tables


def _signed(value: float, fmt: str) -> str:
    text = fmt.format(value)
    return text if text.startswith("-") else "+" + text


def render_tables(
    rows: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Sequence[str]] | None = None,
    encoders: Sequence[str] = (),
    fractions: Sequence[str] = (),
    sites: Sequence[str] = _SITE_ORDER,
    baseline: str = "base",
) -> str:
    """Paper-layout Markdown tables, one per task, contrast and metric.

    Rows are encoders; columns are test site x training-set size; a cell is the mean ± sample std over seeds of
    the per-seed mean over the site's test subjects (the mean alone for one seed, ``(n=k)`` when fewer seeds than
    elsewhere in the table have a value). The best mean of each column is bold (higher or lower per
    :func:`direction`; no bold where neither is better). With a ``baseline`` encoder (``base``) a last column gives
    each encoder's mean difference to it over the columns where both have a value.

    Args:
        rows: long-format results (:data:`RESULT_COLUMNS`).
        metrics: metrics tabulated per task (default: the task's metrics in :data:`TASKS` found in ``rows``,
            else every metric of the task).
        encoders, fractions, sites: preferred orders (others follow in order of appearance; fractions default to
            smallest first).
        baseline: the encoder of the difference column.
    """
    if not rows:
        return "No finished cells yet: no results to tabulate.\n"
    stats = summarise(rows)
    metrics = dict(metrics or {})
    tasks = _order([r["task"] for r in rows], list(metrics))
    blocks = []
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        wanted = _metrics_for(task, [r["metric"] for r in task_rows], metrics)
        for contrast in dict.fromkeys(r["contrast"] for r in task_rows):
            sub = [r for r in task_rows if r["contrast"] == contrast]
            for metric in wanted:
                blocks.append(_table(task, contrast, metric, sub, stats, encoders, fractions, sites, baseline))
    return "\n".join(blocks)


def _table(
    task: str,
    contrast: str,
    metric: str,
    rows: Sequence[Mapping[str, Any]],
    stats: Mapping[tuple[str, ...], Mapping[str, float]],
    encoders: Sequence[str],
    fractions: Sequence[str],
    sites: Sequence[str],
    baseline: str,
) -> str:
    rows = [r for r in rows if r["metric"] == metric]
    enc_order = _order([r["encoder"] for r in rows], encoders)
    found_fractions = [r["fraction"] for r in rows]
    frac_order = _order(found_fractions, fractions) if fractions else _fraction_order(found_fractions)
    site_order = _order([r["site"] for r in rows], sites)
    columns = [(s, f) for s in site_order for f in frac_order]
    fmt = _fmt(metric)
    sign = direction(metric)

    def get(encoder: str, column: tuple[str, str]) -> Mapping[str, float] | None:
        s = stats.get((task, contrast, metric, encoder, *column))
        return s if s is not None and s["n"] > 0 else None

    n_max = max((s["n"] for e in enc_order for c in columns if (s := get(e, c))), default=0)
    best: dict[tuple[str, str], str] = {}
    if sign:
        for column in columns:
            means = [fmt.format(s["mean"]) for e in enc_order if (s := get(e, column))]
            if len(means) > 1:
                best[column] = (max if sign > 0 else min)(means, key=float)
    with_delta = baseline in enc_order and len(enc_order) > 1

    header = ["encoder", *[f"{site}, {parse_fraction(f).label}" for site, f in columns]]
    if with_delta:
        header.append(f"Δ vs {display_encoder(baseline)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for encoder in enc_order:
        cells = [display_encoder(encoder)]
        for column in columns:
            s = get(encoder, column)
            if s is None:
                cells.append("n/a")
                continue
            mean = fmt.format(s["mean"])
            text = f"**{mean}**" if best.get(column) == mean else mean
            if s["n"] > 1 and math.isfinite(s["std"]):
                text += f" ± {fmt.format(s['std'])}"
            if s["n"] < n_max:
                text += f" (n={s['n']})"
            cells.append(text)
        if with_delta:
            if encoder == baseline:
                cells.append("–")
            else:
                diffs = [s["mean"] - b["mean"] for c in columns if (s := get(encoder, c)) and (b := get(baseline, c))]
                cells.append(_signed(sum(diffs) / len(diffs), fmt) if diffs else "n/a")
        lines.append("| " + " | ".join(cells) + " |")

    better = {1: "higher is better", -1: "lower is better", 0: "no better direction"}[sign]
    notes = [
        f"Mean ± sample std over {n_max} seed(s) of the per-seed mean over each site's test subjects.",
        "Best mean per column in bold." if sign and len(enc_order) > 1 else "",
        f"Δ vs {display_encoder(baseline)}: the encoder's mean minus {display_encoder(baseline)}'s, averaged over "
        "the columns where both have a value."
        if with_delta
        else "",
    ]
    title = f"### {task} · {contrast} · {metric} ({better})"
    return title + "\n\n" + "\n".join(lines) + "\n\n" + " ".join(n for n in notes if n) + "\n"


# ------------------------------------------------------------------------------------------------- figure


def write_figure(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    metrics: Mapping[str, Sequence[str]] | None = None,
    encoders: Sequence[str] = (),
    fractions: Sequence[str] = (),
    sites: Sequence[str] = _SITE_ORDER,
) -> Path | None:
    """Metric vs training-set size per encoder (mean ± std over seeds), one panel per test site.

    One row of panels per task, contrast and metric (the metrics of :func:`render_tables`); ``None`` (nothing
    written) when there are no rows.
    """
    if not rows:
        return None
    from matplotlib.figure import Figure

    stats = summarise(rows)
    metrics = dict(metrics or {})
    panels: list[tuple[str, str, str]] = []
    for task in _order([r["task"] for r in rows], list(metrics)):
        wanted = _metrics_for(task, [r["metric"] for r in rows if r["task"] == task], metrics)
        for contrast in dict.fromkeys(r["contrast"] for r in rows if r["task"] == task):
            panels += [(task, contrast, m) for m in wanted]
    site_order = _order([r["site"] for r in rows], sites)
    enc_order = _order([r["encoder"] for r in rows], encoders)
    found_fractions = [r["fraction"] for r in rows]
    frac_order = _order(found_fractions, fractions) if fractions else _fraction_order(found_fractions)
    ncols = max(len({r["site"] for r in rows if (r["task"], r["contrast"]) == p[:2]}) for p in panels)

    fig = Figure(figsize=(3.6 * ncols, 2.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    offsets = {e: (i - (len(enc_order) - 1) / 2) * 0.06 for i, e in enumerate(enc_order)}
    for r, (task, contrast, metric) in enumerate(panels):
        row_sites = [
            s for s in site_order if any(x["site"] == s for x in rows if (x["task"], x["contrast"]) == (task, contrast))
        ]
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row_sites):
                ax.set_visible(False)
                continue
            site = row_sites[c]
            for encoder in enc_order:
                xs, ys, es = [], [], []
                for i, f in enumerate(frac_order):
                    s = stats.get((task, contrast, metric, encoder, site, f))
                    if s and s["n"] > 0:
                        xs.append(i + offsets[encoder])
                        ys.append(s["mean"])
                        es.append(s["std"] if math.isfinite(s["std"]) else 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=display_encoder(encoder))
            ax.set_xticks(range(len(frac_order)), [parse_fraction(f).label for f in frac_order])
            ax.set_title(f"{site} ({task}, {contrast})", fontsize=9)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8)
    fig.supxlabel("labelled training subjects")
    return atomic_write(lambda tmp: fig.savefig(tmp, format="png", dpi=110), path)


# ------------------------------------------------------------------------------------------------- all


def write_report(
    rows: Sequence[Mapping[str, Any]],
    out: str | Path,
    grid: Any = None,
    failed: Sequence[tuple[str, Path]] = (),
) -> dict[str, Path]:
    """Write ``results.csv``, ``tables.md`` and (with results) ``figure.png`` under ``out``; returns their paths."""
    out = Path(out)
    kwargs: dict[str, Any] = {}
    if grid is not None:
        kwargs = {"metrics": grid.metrics(), "encoders": list(grid.encoders), "fractions": grid.fraction_order()}
    files = {"results": write_results(rows, out / "results.csv")}
    head = ["# Experiment results", ""]
    if grid is not None and grid.description:
        head += [grid.description, ""]
    cells = {(r["encoder"], r["task"], r["fraction"], r["contrast"], r["seed"]) for r in rows}
    head += [f"{len(cells)} finished cell(s); per-subject values in `results.csv`, settings in `grid.yaml`.", ""]
    if failed:
        head += [f"**{len(failed)} cell(s) failed** (not in the tables):", ""]
        head += [f"- `{name}`: log `{log}`" for name, log in failed] + [""]
    text = "\n".join(head) + "\n" + render_tables(rows, **kwargs)
    files["tables"] = atomic_write_text(text, out / "tables.md")
    figure = write_figure(rows, out / "figure.png", **kwargs)
    if figure is not None:
        files["figure"] = figure
    return files

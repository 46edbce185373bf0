"""Runs an experiment grid: each cell is one bundle training and one evaluation through ``python -m monai.bundle``.

Per cell folder ``<out>/cells/<name>/``:

- ``cell.json``: the cell's settings, their fingerprint and the two commands (written before anything runs);
- ``log.txt``: stdout and stderr of both bundle runs (appended, one ``=== phase`` header per run);
- ``train/``: the training run's ``output_dir`` (TensorBoard logs, ``checkpoints/``, ``model.pt`` + ``model.json``);
- ``train.done``: training exited 0 and wrote ``model.pt`` (a rerun then only evaluates);
- ``eval/``: the evaluation's ``output_dir`` (``metrics.csv``, ``metrics.md``, predictions);
- ``done.json``: the cell finished (fingerprint, seconds).

A cell with ``done.json`` (of the same fingerprint) and ``eval/metrics.csv`` is skipped, so a rerun after an
interruption or a kill goes on where it stopped (an interrupted training resumes from its checkpoint, as the bundles
do). A folder made with other settings (another fingerprint) is moved aside to ``<name>.stale<k>`` and the cell runs
again. A failed cell (non-zero exit, a timeout, no model or no metrics written) is reported with its log and the
others go on; :attr:`ExperimentResult.failed` lists them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from custom.experiment.grid import Cell, Grid, load_grid
from custom.io import atomic_write_text

__all__ = [
    "CellOutcome",
    "ExperimentResult",
    "cell_dir",
    "collect_results",
    "format_duration",
    "is_finished",
    "run_experiment",
    "run_grid",
]

CELL_JSON = "cell.json"
LOG = "log.txt"
TRAIN_DONE = "train.done"
DONE = "done.json"
#: Columns of an evaluation's metrics.csv that describe the subject rather than measure it.
KEY_COLUMNS = ("subject", "site", "contrast", "session", "postprocessing", "encoder", "fraction", "seed", "model")
#: Site name for evaluations without a site column (ARC).
NO_SITE = "all"


@dataclass
class CellOutcome:
    """What happened to one cell: ``done`` (ran now), ``skipped`` (finished earlier) or ``failed``.

    ``seconds`` is wall time; ``cpu_seconds`` the CPU time of its bundle runs (user + system, all threads), which
    depends less on what else the machine is doing.
    """

    cell: Cell
    status: str
    seconds: float
    log: Path
    phase: str | None = None
    message: str = ""
    cpu_seconds: float | None = None


@dataclass
class ExperimentResult:
    """Outcomes of every cell and the files written under ``out``."""

    out: Path
    grid: Grid
    outcomes: list[CellOutcome] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _print(message: str) -> None:
    print(message, flush=True)


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def cell_dir(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "cells" / cell.name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_finished(cell: Cell, folder: Path) -> bool:
    """``done.json`` of this cell's fingerprint and ``eval/metrics.csv`` exist."""
    record = _read_json(folder / DONE)
    return (
        bool(record) and record.get("fingerprint") == cell.fingerprint() and (folder / "eval" / "metrics.csv").is_file()
    )


def _move_aside(folder: Path) -> Path:
    k = 1
    while folder.with_name(f"{folder.name}.stale{k}").exists():
        k += 1
    target = folder.with_name(f"{folder.name}.stale{k}")
    folder.rename(target)
    return target


def _prepare(cell: Cell, folder: Path, commands: dict[str, list[str]], log: Callable[[str], None]) -> None:
    """Create the cell folder (moving a folder of other settings aside) and write ``cell.json``."""
    record = _read_json(folder / CELL_JSON)
    if folder.exists() and (record is None or record.get("fingerprint") != cell.fingerprint()):
        if any(folder.iterdir()):
            moved = _move_aside(folder)
            log(f"    {cell.name}: its folder holds a run with other settings; moved to {moved}")
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "fingerprint": cell.fingerprint(),
        "cell": cell.record(),
        "commands": {phase: shlex.join(cmd) for phase, cmd in commands.items()},
    }
    atomic_write_text(json.dumps(payload, indent=2, default=str) + "\n", folder / CELL_JSON)


def _child_env() -> dict[str, str]:
    """The environment of the bundle runs: this ``custom`` package importable first, unbuffered output."""
    import custom

    env = dict(os.environ)
    root = str(Path(custom.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _children_cpu() -> float | None:
    """CPU seconds (user + system) of the finished child processes so far; ``None`` where unavailable."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(path: Path, lines: int = 3) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.rstrip() for line in text if line.strip() and not line.startswith(("=== ", "$ "))][-lines:]


def run_cell(
    cell: Cell, folder: Path, python: str = sys.executable, timeout_s: float | None = None, log=_print
) -> CellOutcome:
    """Train and evaluate one cell (its training is skipped when ``train.done`` says it finished)."""
    start = time.monotonic()
    cpu_start = _children_cpu()
    phases: dict[str, float] = {}
    commands = cell.commands(folder, python=python)
    _prepare(cell, folder, commands, log)
    log_path = folder / LOG
    model = folder / "train" / "model.pt"
    env = _child_env()

    def failed(phase: str, message: str) -> CellOutcome:
        with open(log_path, "a") as fh:
            fh.write(f"=== {phase} FAILED: {message}\n")
        return CellOutcome(cell, "failed", time.monotonic() - start, log_path, phase, message)

    with open(log_path, "a") as fh:
        for phase, cmd in commands.items():
            if phase == "training" and (folder / TRAIN_DONE).is_file() and model.is_file():
                fh.write(f"\n=== training finished earlier ({folder / TRAIN_DONE}); not rerun\n")
                continue
            fh.write(f"\n=== {phase} started {datetime.now().isoformat(timespec='seconds')}\n$ {shlex.join(cmd)}\n")
            fh.flush()
            phase_cpu = _children_cpu()
            try:
                rc = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, timeout=timeout_s
                ).returncode
            except subprocess.TimeoutExpired:
                fh.flush()
                return failed(phase, f"stopped after the grid's timeout_s of {timeout_s:g} s")
            except OSError as err:
                fh.flush()
                return failed(phase, f"could not start {cmd[0]}: {err}")
            fh.flush()
            if phase_cpu is not None:
                phases[phase] = round(_children_cpu() - phase_cpu, 1)
            if rc != 0:
                return failed(phase, f"exit code {rc}")
            if phase == "training":
                if not model.is_file():
                    return failed(phase, f"training ended without writing {model} (did any validation run?)")
                atomic_write_text(datetime.now().isoformat(timespec="seconds") + "\n", folder / TRAIN_DONE)
    metrics = folder / "eval" / "metrics.csv"
    if not metrics.is_file():
        return failed("evaluating", f"evaluation ended without writing {metrics}")
    seconds = time.monotonic() - start
    cpu_end = _children_cpu()
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    record = {
        "fingerprint": cell.fingerprint(),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1) if cpu is not None else None,
        "cpu_seconds_by_phase": phases,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(json.dumps(record, indent=2) + "\n", folder / DONE)
    return CellOutcome(cell, "done", seconds, log_path, cpu_seconds=cpu)


def collect_results(cells: Sequence[Cell], out: str | Path) -> list[dict[str, Any]]:
    """Long-format rows (encoder, task, fraction, contrast, seed, site, subject, metric, value) of finished cells."""
    from custom.metrics import ResultsTable

    rows: list[dict[str, Any]] = []
    for cell in cells:
        folder = cell_dir(out, cell)
        if not is_finished(cell, folder):
            continue
        table = ResultsTable.from_csv(folder / "eval" / "metrics.csv", text_columns=KEY_COLUMNS)
        for row in table.rows:
            for metric in table.metric_columns(exclude=KEY_COLUMNS):
                rows.append(
                    {
                        "encoder": cell.encoder,
                        "task": cell.task,
                        "fraction": cell.fraction.key,
                        "contrast": cell.contrast,
                        "seed": cell.seed,
                        "site": row.get("site") or NO_SITE,
                        "subject": row.get("subject", ""),
                        "metric": metric,
                        "value": row.get(metric),
                    }
                )
    return rows


def _describe(cells: Sequence[Cell], out: Path, log: Callable[[str], None]) -> None:
    width = max(len(c.name) for c in cells)
    for i, cell in enumerate(cells, start=1):
        state = "finished" if is_finished(cell, cell_dir(out, cell)) else "to run"
        weights = cell.encoder_path
        if weights != "random" and not Path(weights).exists():
            weights += "  (MISSING)"
        log(f"[{i}/{len(cells)}] {cell.name:<{width}}  {state:<8}  encoder {weights}")
    example = cells[0].commands(cell_dir(out, cells[0]))
    log(f"commands of the first cell (run from {Path.cwd()}):")
    for cmd in example.values():
        log("  " + shlex.join(cmd))


def run_grid(
    grid: Grid,
    out: str | Path,
    dry_run: bool = False,
    python: str = sys.executable,
    log: Callable[[str], None] = _print,
) -> ExperimentResult:
    """Write ``out/grid.yaml``, run every unfinished cell, then write ``results.csv``, ``tables.md``, ``figure.png``."""
    from custom.experiment.report import write_report

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid.to_yaml(), out / "grid.yaml")
    cells = grid.cells()
    result = ExperimentResult(out=out, grid=grid, files={"grid": out / "grid.yaml"})
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the grid gives several cells the same name: {', '.join(duplicates)}")
    todo = {c.name for c in cells if not is_finished(c, cell_dir(out, c))}
    log(
        f"experiment: {len(cells)} cells ({len(cells) - len(todo)} finished earlier, {len(todo)} to run); "
        f"grid: {out / 'grid.yaml'}"
    )
    if dry_run:
        _describe(cells, out, log)
        return result
    missing = sorted(
        {c.encoder_path for c in cells if c.encoder_path != "random" and not Path(c.encoder_path).exists()}
    )
    for path in missing:
        log(f"WARNING: encoder weights {path} do not exist; the cells using them will fail")

    start = time.monotonic()
    ran: list[float] = []
    left = len(todo)
    for i, cell in enumerate(cells, start=1):
        folder = cell_dir(out, cell)
        prefix = f"[{i}/{len(cells)}] {cell.name}"
        if cell.name not in todo:
            log(f"{prefix}: skipped (finished earlier; {folder / 'eval' / 'metrics.csv'})")
            result.outcomes.append(CellOutcome(cell, "skipped", 0.0, folder / LOG))
            continue
        log(f"{prefix}: training + evaluation (log: {folder / LOG})")
        try:
            outcome = run_cell(cell, folder, python=python, timeout_s=grid.timeout_s, log=log)
        except KeyboardInterrupt:
            log(f"{prefix}: interrupted; the same command resumes (finished cells are skipped)")
            raise
        result.outcomes.append(outcome)
        left -= 1
        if outcome.status == "done":
            ran.append(outcome.seconds)
        if ran:
            mean = sum(ran) / len(ran)
            eta = f"about {format_duration(mean * left)} left ({format_duration(mean)} x {_cells(left)})"
        else:
            eta = f"{_cells(left)} left"
        elapsed = f"elapsed {format_duration(time.monotonic() - start)}"
        if outcome.status == "done":
            cpu = f" (CPU {format_duration(outcome.cpu_seconds)})" if outcome.cpu_seconds is not None else ""
            log(f"{prefix}: done in {format_duration(outcome.seconds)}{cpu} | {elapsed} | {eta}")
        else:
            log(
                f"{prefix}: FAILED in {outcome.phase} ({outcome.message}) after {format_duration(outcome.seconds)}; "
                f"log: {outcome.log} | {elapsed} | {eta}"
            )
            for line in _tail(outcome.log):
                log(f"    {line}")

    rows = collect_results(cells, out)
    result.files.update(write_report(rows, out, grid=grid, failed=[(o.cell.name, o.log) for o in result.failed]))
    for name in ("results", "tables", "figure"):
        if name in result.files:
            log(f"{name}: {result.files[name]}")
    if result.failed:
        log(f"{len(result.failed)} of {len(cells)} cells FAILED:")
        for o in result.failed:
            log(f"  {o.cell.name}: {o.phase}, {o.message}; log: {o.log}")
    return result


def run_experiment(
    grid: str | Path | None = None,
    out: str | Path = "runs/experiment",
    preset: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = _print,
) -> ExperimentResult:
    """``seqinv experiment``: load ``grid`` (and/or ``preset``) and run it into ``out``."""
    return run_grid(load_grid(grid, preset=preset), out, dry_run=dry_run, log=log)

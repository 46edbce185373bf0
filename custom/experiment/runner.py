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
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
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


def _child_env(threads: int | None = None) -> dict[str, str]:
    """The environment of the bundle runs: this ``custom`` package importable first, unbuffered output, and
    ``threads`` CPU threads (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``) when given."""
    import custom

    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    root = str(Path(custom.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(cmd: Sequence[str], out, env: dict[str, str], timeout_s: float | None) -> tuple[int, float | None]:
    """Run ``cmd`` (output to the file ``out``) and return its exit code and CPU seconds (user + system, its own
    and its reaped children's, e.g. data-loader workers); ``None`` CPU where the platform cannot tell.

    The CPU time is read from this child's own resource usage (``os.wait4``), so it stays right when several
    cells run at once (``RUSAGE_CHILDREN`` would mix them).

    Raises:
        subprocess.TimeoutExpired: past ``timeout_s`` (the child is killed).
    """
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if not hasattr(os, "wait4"):  # pragma: no cover - Windows
        try:
            return proc.wait(timeout=timeout_s), None
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9  # reaped here: Popen must not wait for it again
                raise subprocess.TimeoutExpired(list(cmd), timeout_s)
            time.sleep(0.2)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _tail(path: Path, lines: int = 3) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.rstrip() for line in text if line.strip() and not line.startswith(("=== ", "$ "))][-lines:]


def run_cell(
    cell: Cell,
    folder: Path,
    python: str = sys.executable,
    timeout_s: float | None = None,
    log=_print,
    threads: int | None = None,
) -> CellOutcome:
    """Train and evaluate one cell (its training is skipped when ``train.done`` says it finished).

    ``threads``: CPU threads of each bundle run (``OMP_NUM_THREADS``), set when several cells run at once.
    """
    start = time.monotonic()
    phases: dict[str, float] = {}
    commands = cell.commands(folder, python=python)
    _prepare(cell, folder, commands, log)
    log_path = folder / LOG
    model = folder / "train" / "model.pt"
    env = _child_env(threads)

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
            try:
                rc, phase_cpu = _run_child(cmd, fh, env, timeout_s)
            except subprocess.TimeoutExpired:
                fh.flush()
                return failed(phase, f"stopped after the grid's timeout_s of {timeout_s:g} s")
            except OSError as err:
                fh.flush()
                return failed(phase, f"could not start {cmd[0]}: {err}")
            fh.flush()
            if phase_cpu is not None:
                phases[phase] = round(phase_cpu, 1)
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
    cpu = sum(phases.values()) if phases else None
    record = {
        "fingerprint": cell.fingerprint(),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1) if cpu is not None else None,
        "cpu_seconds_by_phase": phases,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(json.dumps(record, indent=2) + "\n", folder / DONE)
    return CellOutcome(cell, "done", seconds, log_path, cpu_seconds=cpu)


def site_labels(grid: Grid) -> dict[str, str]:
    """Site code -> table name for the sites the grid's synthetic data renders with another image model
    (``{"IOP": "IOP-gmm"}``), so no table shows a gmm site under a physics site's name."""
    if grid.synthetic_data is None:
        return {}
    codes = {"Guys": "GST"}
    return {
        codes.get(site, site): f"{codes.get(site, site)}-{model}"
        for site, model in grid.synthetic_data["ixi_image_models"].items()
        if model != "physics"
    }


def collect_results(
    cells: Sequence[Cell], out: str | Path, labels: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Long-format rows (encoder, task, fraction, contrast, seed, site, subject, metric, value) of finished cells;
    ``labels`` renames sites (see :func:`site_labels`)."""
    labels = labels or {}
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
                        "site": labels.get(row.get("site") or NO_SITE, row.get("site") or NO_SITE),
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

    if grid.synthetic_data is not None and grid.data_root:
        ensure_synthetic_data(grid.data_root, grid.synthetic_data, log)
    threads = max(1, (os.cpu_count() or 1) // grid.jobs) if grid.jobs > 1 else None
    if grid.jobs > 1:
        log(f"running {grid.jobs} cells at once, {threads} CPU thread(s) each")

    start = time.monotonic()
    ran: list[float] = []
    left = len(todo)
    lock = threading.Lock()

    stopping = threading.Event()

    def one(i: int, cell: Cell) -> CellOutcome:
        nonlocal left
        folder = cell_dir(out, cell)
        prefix = f"[{i}/{len(cells)}] {cell.name}"
        if stopping.is_set():  # interrupted while this cell waited for a free job: do not start it
            return CellOutcome(cell, "failed", 0.0, folder / LOG, "training", "not started (interrupted)")
        log(f"{prefix}: training + evaluation (log: {folder / LOG})")
        outcome = run_cell(cell, folder, python=python, timeout_s=grid.timeout_s, log=log, threads=threads)
        if outcome.message in ("exit code -2", "exit code 130"):  # its bundle run got Ctrl-C: start nothing more
            stopping.set()
        with lock:
            left -= 1
            if outcome.status == "done":
                ran.append(outcome.seconds)
            if ran:
                mean = sum(ran) / len(ran) / grid.jobs
                eta = f"about {format_duration(mean * left)} left ({format_duration(mean)} x {_cells(left)})"
            else:
                eta = f"{_cells(left)} left"
            elapsed = f"elapsed {format_duration(time.monotonic() - start)}"
            if outcome.status == "done":
                cpu = f" (CPU {format_duration(outcome.cpu_seconds)})" if outcome.cpu_seconds is not None else ""
                log(f"{prefix}: done in {format_duration(outcome.seconds)}{cpu} | {elapsed} | {eta}")
            else:
                log(
                    f"{prefix}: FAILED in {outcome.phase} ({outcome.message}) after "
                    f"{format_duration(outcome.seconds)}; log: {outcome.log} | {elapsed} | {eta}"
                )
                for line in _tail(outcome.log):
                    log(f"    {line}")
        return outcome

    outcomes: dict[int, CellOutcome] = {}
    pending = []
    for i, cell in enumerate(cells, start=1):
        if cell.name not in todo:
            metrics = cell_dir(out, cell) / "eval" / "metrics.csv"
            log(f"[{i}/{len(cells)}] {cell.name}: skipped (finished earlier; {metrics})")
            outcomes[i] = CellOutcome(cell, "skipped", 0.0, cell_dir(out, cell) / LOG)
        else:
            pending.append((i, cell))
    try:
        if grid.jobs == 1:
            for i, cell in pending:
                outcomes[i] = one(i, cell)
        else:
            pool = ThreadPoolExecutor(max_workers=grid.jobs)
            try:
                futures = {pool.submit(one, i, cell): i for i, cell in pending}
                waiting = set(futures)
                while waiting:  # short waits: the main thread takes a Ctrl-C within half a second
                    finished, waiting = wait(waiting, timeout=0.5)
                    for future in finished:
                        outcomes[futures[future]] = future.result()
            finally:
                # on Ctrl-C no queued cell may start; the running ones end with their (interrupted) children
                stopping.set()
                pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        log("interrupted; the same command resumes (finished cells are skipped)")
        raise
    result.outcomes.extend(outcomes[i] for i in sorted(outcomes))

    rows = collect_results(cells, out, site_labels(grid))
    result.files.update(write_report(rows, out, grid=grid, failed=[(o.cell.name, o.log) for o in result.failed]))
    for name in ("results", "tables", "figure"):
        if name in result.files:
            log(f"{name}: {result.files[name]}")
    if result.failed:
        log(f"{len(result.failed)} of {len(cells)} cells FAILED:")
        for o in result.failed:
            log(f"  {o.cell.name}: {o.phase}, {o.message}; log: {o.log}")
    return result


SYNTHETIC_MARKER = "synthetic_data.json"


def ensure_synthetic_data(data_root: str | Path, spec: dict[str, Any], log: Callable[[str], None] = _print) -> Path:
    """Create the grid's synthetic data set in ``data_root`` unless it is there already (made with ``spec``).

    It is written to ``<data_root>.partial`` and renamed when complete, with ``synthetic_data.json`` (the spec and
    the generator's summary) inside, so an interrupted run never leaves a half data set that looks finished.

    Raises:
        GridError: ``data_root`` exists but was not made from ``spec`` (another spec, or data of your own).
    """
    from custom.data.synthetic import generate_dataset
    from custom.experiment.grid import GridError

    root = Path(data_root)
    marker = root / SYNTHETIC_MARKER
    if root.exists():
        made = _read_json(marker)
        if made is not None and made.get("spec") == spec:
            log(f"synthetic data: {root} (made earlier with {spec})")
            return root
        what = f"was made with {made.get('spec')}" if made else f"has no {SYNTHETIC_MARKER} (not made by a grid)"
        raise GridError(
            f"data_root {root} exists but {what}; the grid's synthetic_data is {spec}: delete the folder, "
            "or point data_root elsewhere"
        )
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    log(f"synthetic data: creating {root} ({spec})")
    summary = generate_dataset(
        partial,
        subjects=spec["subjects"],
        seed=spec["seed"],
        resolution=spec["resolution"],
        ixi_image_models=spec["ixi_image_models"] or None,
        progress=True,
    )
    atomic_write_text(
        json.dumps({"spec": spec, "summary": summary}, indent=2, default=str) + "\n", partial / SYNTHETIC_MARKER
    )
    partial.rename(root)
    log(f"synthetic data: {root} written in {format_duration(float(summary.get('seconds', 0.0)))}")
    return root


def run_experiment(
    grid: str | Path | None = None,
    out: str | Path = "runs/experiment",
    preset: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = _print,
    jobs: int | None = None,
) -> ExperimentResult:
    """``seqinv experiment``: load ``grid`` (and/or ``preset``) and run it into ``out`` (``jobs``: cells at once,
    overriding the grid's ``jobs``)."""
    loaded = load_grid(grid, preset=preset)
    if jobs is not None:
        if int(jobs) < 1:
            from custom.experiment.grid import GridError

            raise GridError(f"--jobs must be >= 1, got {jobs}")
        loaded.jobs = int(jobs)
    return run_grid(loaded, out, dry_run=dry_run, log=log)

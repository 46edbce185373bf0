"""``seqinv experiment``: encoder x task x label fraction x contrast x seed grids of bundle runs.

:mod:`~custom.experiment.grid` (grid files, cells), :mod:`~custom.experiment.presets` (``cpu``, ``paper``),
:mod:`~custom.experiment.runner` (one ``monai.bundle`` training and evaluation per cell, resumable) and
:mod:`~custom.experiment.report` (``results.csv``, ``tables.md``, ``figure.png``).
"""

from custom.experiment.grid import Cell, Fraction, Grid, GridError, load_grid, parse_fraction
from custom.experiment.presets import PRESETS
from custom.experiment.report import read_results, render_tables, write_report
from custom.experiment.runner import ExperimentResult, run_experiment, run_grid

__all__ = [
    "PRESETS",
    "Cell",
    "ExperimentResult",
    "Fraction",
    "Grid",
    "GridError",
    "load_grid",
    "parse_fraction",
    "read_results",
    "render_tables",
    "run_experiment",
    "run_grid",
    "write_report",
]

"""The experiment grid: encoders x tasks x label fractions x contrasts x seeds, resolved into cells.

(About 600 lines, kept in one module on purpose: the grid file's schema, its validation with messages naming
the bad key, and its resolution into cells are one job; the runner and the report only read resolved cells.)

A grid is a YAML mapping (see the README, "Experiments")::

    encoders:                       # name -> weights; "random" = no pretraining
      random: random
      seqinv: bundles/seqinv_pretrain/runs/compare/seqinv_s0/model.pt
    tasks:
      tissue_seg:                   # -> bundles/ixi_tissue_seg
        contrasts: [T1]
        fractions: [1subject, 1.0]  # "<N>subject(s)" = N training subjects; a number in (0, 1] = a fraction
        train_configs: [cpu_small.yaml]
        overrides: {max_epochs: 20}
        fraction_overrides: {1subject: {train_repeats: 5}}   # training overrides of one fraction's cells
    seeds: [0, 1]
    data_root: data/synth24         # optional: IXI tasks use <data_root>/ixi, lesion_seg <data_root>/arc
    overrides: {}                   # --key value for training and evaluation of every cell

:func:`load_grid` merges an optional preset under the file, checks every key and resolves paths (relative paths
are taken from the current folder and written absolute), so the grid written next to the results
(:meth:`Grid.to_yaml`) is exactly what ran and reruns from any folder. :meth:`Grid.cells` lists the cells in run
order: seed outermost, so a first pass over every setting finishes before the second seed starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from custom.errors import InputError

__all__ = [
    "CELL_KEYS",
    "Cell",
    "Fraction",
    "Grid",
    "GridError",
    "TASKS",
    "TaskInfo",
    "display_encoder",
    "load_grid",
    "parse_fraction",
]


class GridError(InputError):
    """A grid file or preset is malformed (the message names the key and what was expected)."""


@dataclass(frozen=True)
class TaskInfo:
    """A downstream task: its bundle folder name, contrasts, where its data lives under ``data_root``, metrics."""

    bundle: str
    contrasts: tuple[str, ...]
    data_subdir: str
    metrics: tuple[str, ...]


TASKS: dict[str, TaskInfo] = {
    "tissue_seg": TaskInfo("ixi_tissue_seg", ("T1", "T2", "PD"), "ixi", ("dice_mean", "hd95_mean")),
    "lesion_seg": TaskInfo("arc_lesion_seg", ("T1w", "T2w", "FLAIR"), "arc", ("dice_mean", "hd95_mean")),
    "denoise": TaskInfo("ixi_denoise", ("T1", "T2", "PD"), "ixi", ("psnr_denoised", "ssim_denoised")),
}
"""Task name -> bundle (under ``bundles_dir``), its contrasts, its data folder under ``data_root``, table metrics."""

#: Keys every cell sets itself; an override may not set them.
CELL_KEYS = ("contrast", "fraction", "train_subjects", "seed", "pretrained_encoder", "output_dir", "model_path")

#: Default weights of the known encoder names (from ``benchmarks/pretrain_compare.py``); ``{seed}`` is allowed.
KNOWN_ENCODERS = {
    "random": "random",
    "base": "bundles/seqinv_pretrain/runs/compare/base_s0/model.pt",
    "seqaug": "bundles/seqinv_pretrain/runs/compare/seqaug_s0/model.pt",
    "seqinv": "bundles/seqinv_pretrain/runs/compare/seqinv_s0/model.pt",
}
_DISPLAY = {"random": "Random", "base": "Base", "seqaug": "SeqAug", "seqinv": "SeqInv"}
_TOP_KEYS = {
    "preset", "bundles_dir", "encoders", "tasks", "seeds", "data_root", "overrides", "train_overrides",
    "eval_overrides", "train_configs", "eval_configs", "timeout_s", "description", "synthetic_data", "jobs",
}  # fmt: skip
_SYNTHETIC_KEYS = {"subjects", "seed", "resolution", "ixi_image_models"}
_TASK_KEYS = {
    "contrasts", "fractions", "metrics", "bundle", "overrides", "train_overrides", "eval_overrides",
    "train_configs", "eval_configs", "data_root", "fraction_overrides",
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+]*$")
_SUBJECTS = re.compile(r"^\s*(\d+)\s*_?\s*(?:subjects?|subj)\s*$", re.IGNORECASE)


def display_encoder(name: str) -> str:
    """Table name of an encoder: ``Random``, ``Base``, ``SeqAug``, ``SeqInv`` for the known ones, else as given."""
    return _DISPLAY.get(name, name)


# ------------------------------------------------------------------------------------------------- fractions


@dataclass(frozen=True)
class Fraction:
    """A training-set size: a share of the training subjects, or a number of subjects.

    ``key`` is what results are labelled with (``"1subject"``, ``"3subjects"``, ``"0.1"``, ``"1.0"``), ``label``
    the table heading (``1 subject``, ``10%``).
    """

    fraction: float | None = None
    subjects: int | None = None

    @property
    def key(self) -> str:
        if self.subjects is not None:
            return f"{self.subjects}subject{'s' if self.subjects != 1 else ''}"
        return repr(float(self.fraction))

    @property
    def label(self) -> str:
        if self.subjects is not None:
            return f"{self.subjects} subject{'s' if self.subjects != 1 else ''}"
        return f"{100 * float(self.fraction):g}%"

    @property
    def overrides(self) -> dict[str, Any]:
        """The bundle options selecting this training set (``--train_subjects N`` or ``--fraction x``)."""
        if self.subjects is not None:
            return {"train_subjects": self.subjects}
        return {"fraction": float(self.fraction)}


def parse_fraction(value: Any) -> Fraction:
    """``"1subject"``, ``"3 subjects"`` -> a number of subjects; ``0.1``, ``"1.0"`` -> a fraction in (0, 1]."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, str):
        match = _SUBJECTS.match(value)
        if match:
            n = int(match.group(1))
            if n < 1:
                raise GridError(f"fractions: {value!r} asks for no training subject; use 1subject or more")
            return Fraction(subjects=n)
    if isinstance(value, bool):
        raise GridError(f"fractions: {value!r} is not a fraction in (0, 1] or a number of subjects like 1subject")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise GridError(
            f"fractions: {value!r} is not a fraction in (0, 1] (e.g. 0.1) or a number of subjects (e.g. 1subject)"
        ) from None
    if not 0.0 < x <= 1.0:
        raise GridError(f"fractions: {value!r} is outside (0, 1]; write a number of subjects as e.g. 5subjects")
    return Fraction(fraction=x)


# ------------------------------------------------------------------------------------------------- cells


def _render(value: Any) -> str:
    """A ``--key value`` argument as ``monai.bundle run`` (python-fire) reads it back."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)  # numbers, booleans, None, lists and dicts as Python literals


def _config_arg(files: Sequence[str]) -> str:
    return json.dumps(list(files)) if len(files) > 1 else files[0]


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow (one-line) lists."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True))


@dataclass(frozen=True)
class Cell:
    """One bundle training and one evaluation: a task, contrast, training-set size, encoder and seed."""

    task: str
    bundle: str
    contrast: str
    fraction: Fraction
    encoder: str
    encoder_path: str
    seed: int
    train_configs: tuple[str, ...]
    eval_configs: tuple[str, ...]
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    eval_overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Folder name: ``tissue_seg-T1-1subject-seqinv-s0``."""
        return f"{self.task}-{self.contrast}-{self.fraction.key}-{self.encoder}-s{self.seed}"

    def train_args(self, cell_dir: str | Path) -> dict[str, Any]:
        """Every ``--key value`` of the training run (the grid's overrides, then the cell's own keys)."""
        out = Path(cell_dir) / "train"
        return {
            **self.train_overrides,
            "contrast": self.contrast,
            **self.fraction.overrides,
            "seed": self.seed,
            "pretrained_encoder": self.encoder_path,
            "output_dir": str(out),
            "model_path": str(out / "model.pt"),
        }

    def eval_args(self, cell_dir: str | Path) -> dict[str, Any]:
        """Every ``--key value`` of the evaluation (same contrast and split seed; the cell's trained model)."""
        return {
            **self.eval_overrides,
            "contrast": self.contrast,
            "seed": self.seed,
            "model_path": str(Path(cell_dir) / "train" / "model.pt"),
            "output_dir": str(Path(cell_dir) / "eval"),
        }

    def commands(self, cell_dir: str | Path, python: str = "python") -> dict[str, list[str]]:
        """``python -m monai.bundle run training|evaluating --config_file ... --key value ...`` of this cell."""

        def command(run_id: str, files: Sequence[str], args: Mapping[str, Any]) -> list[str]:
            cmd = [python, "-m", "monai.bundle", "run", run_id, "--config_file", _config_arg(files)]
            for key, value in args.items():
                cmd += [f"--{key}", _render(value)]
            return cmd

        return {
            "training": command("training", self.train_configs, self.train_args(cell_dir)),
            "evaluating": command("evaluating", self.eval_configs, self.eval_args(cell_dir)),
        }

    def record(self) -> dict[str, Any]:
        """The cell's settings (no output paths): what its results depend on."""
        return {
            "task": self.task,
            "bundle": self.bundle,
            "contrast": self.contrast,
            "fraction": self.fraction.key,
            "encoder": self.encoder,
            "encoder_path": self.encoder_path,
            "seed": self.seed,
            "train_configs": list(self.train_configs),
            "eval_configs": list(self.eval_configs),
            "train_overrides": dict(self.train_overrides),
            "eval_overrides": dict(self.eval_overrides),
        }

    def fingerprint(self) -> str:
        """A short hash of :meth:`record`: a finished cell is reused only when it matches."""
        text = json.dumps(self.record(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- grid


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise GridError(f"{where} must be a mapping of key: value, got {type(value).__name__} {value!r}")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, Sequence):
        raise GridError(f"{where} must be a list, got {type(value).__name__} {value!r}")
    return list(value)


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge, other values (lists too) are replaced; null removes a mapping (a task)."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if value is None and isinstance(out.get(key), Mapping):
            del out[key]  # "tasks: {denoise: null}" drops a task of the preset
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _absolute(path: str | Path, base: Path) -> str:
    p = Path(str(path)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _looks_like_path(value: Any) -> bool:
    return isinstance(value, str) and not value.startswith(("$", "@", "%")) and ("/" in value or value == ".")


def _check_overrides(overrides: Mapping[str, Any], where: str, base: Path) -> dict[str, Any]:
    out = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise GridError(f"{where}: {key!r} is not a config key (write it without the leading --)")
        if key in CELL_KEYS:
            raise GridError(
                f"{where}: {key!r} is set by the grid for every cell (contrasts, fractions, seeds, encoders, --out); "
                "remove it from the overrides"
            )
        if key.endswith(("_dir", "_path", "_file")) and _looks_like_path(value):
            value = _absolute(value, base)
        out[key] = value
    return out


@dataclass
class Grid:
    """A checked grid with absolute paths (see the module docstring for the file format)."""

    encoders: dict[str, str]
    tasks: dict[str, dict[str, Any]]
    seeds: list[int]
    bundles_dir: str
    data_root: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    train_configs: list[str] = field(default_factory=list)
    eval_configs: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    preset: str | None = None
    description: str | None = None
    synthetic_data: dict[str, Any] | None = None
    jobs: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid as plain data (loadable again by :func:`load_grid`)."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        if self.preset:
            out["resolved_from_preset"] = self.preset
        out.update(
            {
                "bundles_dir": self.bundles_dir,
                "data_root": self.data_root,
                "encoders": dict(self.encoders),
                "seeds": list(self.seeds),
                "tasks": copy.deepcopy(self.tasks),
                "overrides": dict(self.overrides),
                "train_overrides": dict(self.train_overrides),
                "eval_overrides": dict(self.eval_overrides),
                "train_configs": list(self.train_configs),
                "eval_configs": list(self.eval_configs),
                "timeout_s": self.timeout_s,
                "jobs": self.jobs,
            }
        )
        if self.synthetic_data is not None:
            out["synthetic_data"] = copy.deepcopy(self.synthetic_data)
        return out

    def to_yaml(self) -> str:
        header = "# the resolved experiment grid: exactly what ran (seqinv experiment --grid <this file> reruns it)\n"
        return header + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)

    def _config_files(self, bundle: Path, main: str, extra: Sequence[str]) -> tuple[str, ...]:
        files = [bundle / "configs" / main]
        for name in extra:
            p = Path(name)
            files.append(p if p.is_absolute() else bundle / "configs" / p)
        return tuple(str(f) for f in files)

    def cells(self) -> list[Cell]:
        """Every cell, in run order: seed, task, contrast, fraction, encoder."""
        out = []
        for seed in self.seeds:
            for task, spec in self.tasks.items():
                bundle = Path(spec["bundle"])
                train_configs = self._config_files(bundle, "train.yaml", [*self.train_configs, *spec["train_configs"]])
                eval_configs = self._config_files(bundle, "evaluate.yaml", [*self.eval_configs, *spec["eval_configs"]])
                common: dict[str, Any] = {}
                data_root = spec.get("data_root") or self.data_root
                if data_root:
                    common["dataset_dir"] = str(Path(data_root) / TASKS[task].data_subdir)
                common.update(self.overrides)
                common.update(spec["overrides"])
                train = {**common, **self.train_overrides, **spec["train_overrides"]}
                evaluate = {**common, **self.eval_overrides, **spec["eval_overrides"]}
                per_fraction = spec.get("fraction_overrides", {})
                for contrast in spec["contrasts"]:
                    for fraction in spec["fractions"]:
                        fkey = parse_fraction(fraction).key
                        cell_train = {**train, **per_fraction.get(fkey, {})}
                        for encoder, path in self.encoders.items():
                            out.append(
                                Cell(
                                    task=task,
                                    bundle=str(bundle),
                                    contrast=contrast,
                                    fraction=parse_fraction(fraction),
                                    encoder=encoder,
                                    encoder_path=path.replace("{seed}", str(seed)),
                                    seed=int(seed),
                                    train_configs=train_configs,
                                    eval_configs=eval_configs,
                                    train_overrides=cell_train,
                                    eval_overrides=evaluate,
                                )
                            )
        return out

    def metrics(self) -> dict[str, list[str]]:
        """Table and figure metrics per task."""
        return {task: list(spec["metrics"]) for task, spec in self.tasks.items()}

    def fraction_order(self) -> list[str]:
        keys: dict[str, None] = {}
        for spec in self.tasks.values():
            for f in spec["fractions"]:
                keys.setdefault(parse_fraction(f).key, None)
        return list(keys)


def _fraction_value(value: Any) -> float | str:
    """A fraction as a float, a number of subjects as its key (``1subject``): how the resolved grid writes them."""
    f = parse_fraction(value)
    return f.key if f.subjects is not None else float(f.fraction)


def _default_bundles_dir(base: Path) -> Path:
    here = base / "bundles"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "bundles"  # a source checkout: <repo>/custom/experiment/grid.py


def _resolve_encoder(name: str, value: Any, base: Path) -> str:
    if value is None:
        if name not in KNOWN_ENCODERS:
            raise GridError(
                f"encoders: {name!r} has no weights; give a path (model.pt, checkpoint, seqinv_pretrain bundle "
                f"folder or zip) or 'random' (known names with default paths: {', '.join(KNOWN_ENCODERS)})"
            )
        value = KNOWN_ENCODERS[name]
    if not isinstance(value, (str, Path)):
        raise GridError(f"encoders: {name}: expected a path or 'random', got {value!r}")
    if str(value).lower() == "random":
        return "random"
    if str(value).lower() == "auto":
        raise GridError(f"encoders: {name}: 'auto' depends on what happens to be installed; name the weights file")
    return _absolute(value, base)


def resolve_grid(raw: Mapping[str, Any], base: str | Path | None = None) -> Grid:
    """Check a grid mapping (a preset already merged in) and make its paths absolute (relative to ``base``)."""
    base = Path(base or Path.cwd()).resolve()
    raw = _mapping(raw, "the grid")
    unknown = set(raw) - _TOP_KEYS - {"resolved_from_preset"}
    if unknown:
        raise GridError(f"unknown grid key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    bundles_dir = Path(_absolute(raw["bundles_dir"], base)) if raw.get("bundles_dir") else _default_bundles_dir(base)

    encoders_raw = raw.get("encoders")
    if isinstance(encoders_raw, Sequence) and not isinstance(encoders_raw, str):
        encoders_raw = {str(name): None for name in encoders_raw}
    encoders_raw = _mapping(encoders_raw, "encoders")
    if not encoders_raw:
        raise GridError("encoders: give at least one, e.g. {random: random, seqinv: path/to/model.pt}")
    encoders = {}
    for name, value in encoders_raw.items():
        if not _NAME.match(str(name)):
            raise GridError(f"encoders: {name!r} is not a usable name (letters, digits, _ . + only)")
        encoders[str(name)] = _resolve_encoder(str(name), value, base)

    tasks_raw = raw.get("tasks")
    if isinstance(tasks_raw, Sequence) and not isinstance(tasks_raw, str):
        tasks_raw = {str(name): {} for name in tasks_raw}
    tasks_raw = _mapping(tasks_raw, "tasks")
    if not tasks_raw:
        raise GridError(f"tasks: give at least one of {', '.join(TASKS)}")
    tasks: dict[str, dict[str, Any]] = {}
    for task, spec in tasks_raw.items():
        if task not in TASKS:
            raise GridError(f"tasks: unknown task {task!r}; known: {', '.join(TASKS)}")
        info = TASKS[task]
        spec = _mapping(spec, f"tasks: {task}")
        unknown = set(spec) - _TASK_KEYS
        if unknown:
            raise GridError(f"tasks: {task}: unknown key(s) {sorted(unknown)}; known: {sorted(_TASK_KEYS)}")
        bundle = Path(_absolute(spec["bundle"], base)) if spec.get("bundle") else bundles_dir / info.bundle
        if not (bundle / "configs" / "train.yaml").is_file():
            raise GridError(f"tasks: {task}: no bundle at {bundle} (expected {bundle / 'configs' / 'train.yaml'})")
        contrasts = [str(c) for c in _list(spec.get("contrasts", [info.contrasts[0]]), f"tasks: {task}: contrasts")]
        bad = [c for c in contrasts if c not in info.contrasts]
        if bad or not contrasts:
            raise GridError(f"tasks: {task}: contrasts {bad or '[]'}: expected some of {', '.join(info.contrasts)}")
        fractions = [_fraction_value(f) for f in _list(spec.get("fractions", [1.0]), f"tasks: {task}: fractions")]
        if not fractions:
            raise GridError(f"tasks: {task}: fractions: give at least one, e.g. [1subject, 1.0]")
        metrics = [str(m) for m in _list(spec.get("metrics", list(info.metrics)), f"tasks: {task}: metrics")]
        configs = {}
        for key in ("train_configs", "eval_configs"):
            configs[key] = []
            for name in _list(spec.get(key), f"tasks: {task}: {key}"):
                p = Path(str(name))
                path = p if p.is_absolute() else bundle / "configs" / p
                if not path.is_file():
                    raise GridError(f"tasks: {task}: {key}: {path} does not exist")
                configs[key].append(str(path))
        tasks[task] = {
            "bundle": str(bundle),
            "contrasts": list(dict.fromkeys(contrasts)),
            "fractions": list(dict.fromkeys(fractions)),
            "metrics": metrics,
            "data_root": _absolute(spec["data_root"], base) if spec.get("data_root") else None,
            "train_configs": configs["train_configs"],
            "eval_configs": configs["eval_configs"],
            "overrides": _check_overrides(_mapping(spec.get("overrides"), f"{task}: overrides"), task, base),
            "train_overrides": _check_overrides(_mapping(spec.get("train_overrides"), f"{task}: train"), task, base),
            "eval_overrides": _check_overrides(_mapping(spec.get("eval_overrides"), f"{task}: eval"), task, base),
        }
        per_fraction = {}
        for fraction, values in _mapping(spec.get("fraction_overrides"), f"tasks: {task}: fraction_overrides").items():
            key = parse_fraction(fraction).key
            if key not in {parse_fraction(f).key for f in fractions}:
                raise GridError(f"tasks: {task}: fraction_overrides: {fraction!r} is not one of the task's fractions")
            per_fraction[key] = _check_overrides(_mapping(values, f"{task}: {fraction}"), f"{task}: {fraction}", base)
        if per_fraction:
            tasks[task]["fraction_overrides"] = per_fraction
        if not tasks[task]["data_root"]:
            del tasks[task]["data_root"]

    seeds_raw = _list(raw.get("seeds", [0]), "seeds")
    try:
        seeds = [int(s) for s in seeds_raw]
    except (TypeError, ValueError):
        raise GridError(f"seeds must be whole numbers, got {seeds_raw!r}") from None
    if not seeds or any(float(s) != int(s) for s in seeds_raw):
        raise GridError(f"seeds must be a non-empty list of whole numbers, got {seeds_raw!r}")
    seeds = list(dict.fromkeys(seeds))

    for key in ("train_configs", "eval_configs"):
        for name in _list(raw.get(key), key):
            if Path(str(name)).is_absolute() and not Path(str(name)).is_file():
                raise GridError(f"{key}: {name} does not exist")
            for task, spec in tasks.items():
                p = Path(str(name))
                if not p.is_absolute() and not (Path(spec["bundle"]) / "configs" / p).is_file():
                    raise GridError(f"{key}: {name} is not in {Path(spec['bundle']) / 'configs'} (task {task})")
    synthetic = _synthetic_spec(raw.get("synthetic_data"), raw.get("data_root"))
    jobs = raw.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise GridError(f"jobs must be a whole number >= 1 (cells run at once), got {jobs!r}")
    timeout = raw.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise GridError(f"timeout_s must be a positive number of seconds per bundle run, got {timeout!r}")
    return Grid(
        encoders=encoders,
        tasks=tasks,
        seeds=seeds,
        bundles_dir=str(bundles_dir),
        data_root=_absolute(raw["data_root"], base) if raw.get("data_root") else None,
        overrides=_check_overrides(_mapping(raw.get("overrides"), "overrides"), "overrides", base),
        train_overrides=_check_overrides(_mapping(raw.get("train_overrides"), "train_overrides"), "train", base),
        eval_overrides=_check_overrides(_mapping(raw.get("eval_overrides"), "eval_overrides"), "eval", base),
        train_configs=[str(c) for c in _list(raw.get("train_configs"), "train_configs")],
        eval_configs=[str(c) for c in _list(raw.get("eval_configs"), "eval_configs")],
        timeout_s=float(timeout) if timeout is not None else None,
        preset=raw.get("preset") or raw.get("resolved_from_preset"),
        description=raw.get("description"),
        synthetic_data=synthetic,
        jobs=int(jobs),
    )


def _synthetic_spec(value: Any, data_root: Any) -> dict[str, Any] | None:
    """Check ``synthetic_data`` (how to create ``data_root`` when it is missing): subjects, seed, resolution, models."""
    if value is None:
        return None
    spec = _mapping(value, "synthetic_data")
    unknown = set(spec) - _SYNTHETIC_KEYS
    if unknown:
        raise GridError(f"synthetic_data: unknown key(s) {sorted(unknown)}; known: {sorted(_SYNTHETIC_KEYS)}")
    if not data_root:
        raise GridError("synthetic_data needs data_root: the folder the synthetic data set is written to")
    try:
        out = {
            "subjects": int(spec.get("subjects", 24)),
            "seed": int(spec.get("seed", 0)),
            "resolution": float(spec.get("resolution", 2.0)),
            "ixi_image_models": {str(k): str(v) for k, v in _mapping(spec.get("ixi_image_models"), "models").items()},
        }
    except (TypeError, ValueError) as err:
        raise GridError(f"synthetic_data: {err}") from None
    if out["subjects"] < 3 or out["resolution"] <= 0:
        raise GridError(f"synthetic_data: need subjects >= 3 and resolution > 0 mm, got {spec!r}")
    from custom.data.image_models import IMAGE_MODELS

    bad = {k: v for k, v in out["ixi_image_models"].items() if v not in IMAGE_MODELS}
    if bad:
        raise GridError(f"synthetic_data: ixi_image_models: unknown model(s) {bad}; known: {', '.join(IMAGE_MODELS)}")
    return out


def load_grid(path: str | Path | None = None, preset: str | None = None, base: str | Path | None = None) -> Grid:
    """Read a grid file and/or a preset (the file's keys over the preset's; a file may name ``preset:`` itself)."""
    from custom.experiment.presets import preset_grid

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GridError(f"--grid {path}: no such file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise GridError(f"--grid {path}: not valid YAML ({err})") from None
        raw = _mapping(raw, f"--grid {path}")
    name = preset or raw.get("preset")
    if preset and raw.get("preset") and raw["preset"] != preset:
        raise GridError(f"--preset {preset} but {path} says preset: {raw['preset']}; give one")
    if name:
        base_grid = preset_grid(str(name))
        top = {k: v for k, v in raw.items() if k != "preset"}
        for key in ("encoders", "tasks"):  # a list keeps only those of the preset (encoders: [random, seqinv])
            if isinstance(top.get(key), list):
                top[key] = {str(k): base_grid.get(key, {}).get(str(k)) for k in top[key]}
                base_grid[key] = {}
        raw = _deep_merge(base_grid, top)
        raw["preset"] = str(name)
    if not raw:
        raise GridError("give --grid grid.yaml or --preset cpu|paper")
    return resolve_grid(raw, base=base)

"""Inference on a user's own NIfTI scans, with every output written on the input's own voxel grid.

(About 590 lines, kept in one module on purpose: the input checks, the predictor engine and the writer that
restores the input grid form one path that every bundle's inference.yaml uses together.)

Shared by every bundle's ``inference.yaml`` (tissues, lesions, denoising; the pretraining bundle's feature
extraction, :mod:`custom.features`). Each builds a :class:`NiftiPredictor` (the bundle's ``evaluator``, an ignite
engine) from its top-level ``network`` (``network_def`` on the device), ``handlers`` (a strict MONAI
``CheckpointLoader``, run when the engine starts), ``preprocessing``, ``inferer`` and ``postprocessing`` (here
:class:`WriteOnInputGrid`), gives it the files from :func:`inference_inputs` and ends with :func:`finish`, so
``python -m monai.bundle run`` exits with status 1 when a file failed.

Per file, :meth:`NiftiPredictor.predict_file`:

1. :func:`validate_nifti` checks the file (exists, a readable NIfTI, one 3D volume, not constant, finite) and
   raises :class:`~custom.errors.InputError` naming the file otherwise;
2. the bundle's preprocessing (:func:`custom.preprocess.image_preprocessing`: RAS, ``pixdim`` spacing,
   intensity normalisation) prepares the network input;
3. the network runs through the inferer (e.g. ``SlidingWindowInferer``) under ``torch.no_grad`` on ``device``
   (autocast when ``amp`` and the device is CUDA);
4. the postprocessing (:class:`WriteOnInputGrid`) puts the output back on the input's grid: MONAI
   ``SpatialResample`` resamples it from the preprocessed grid (its MetaTensor affine) to the input's affine and
   shape, linearly. Segmentation resamples the class probabilities (softmax; sigmoid for a single channel) and
   takes the argmax on the input grid, so labels are never interpolated; regression resamples the values, after
   undoing the intensity normalisation when ``restore_intensity`` (the ``offset``/``scale`` that the
   normalisation recorded in the image's metadata,
   see :mod:`custom.preprocess`);
5. ``<output_dir>/<input stem>_<postfix>.nii.gz`` (and, if asked, the probabilities as a 4D
   ``<stem>_prob.nii.gz``, shape ``(X, Y, Z, C)``) is written atomically with the input's affine and a copy of
   its header, so it overlays the input exactly whatever its orientation (RAS, LPS, oblique) or voxel size.

:meth:`NiftiPredictor.run` does this for each file, printing one line per file; a failing file is reported and
the others still run. It returns a :class:`Summary` (``exit_code`` 0 or 1).
"""

from __future__ import annotations

import contextlib
import glob
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import Compose, SpatialResample
from monai.utils import ensure_tuple

from custom.errors import InputError
from custom.io import atomic_write
from custom.postprocess import min_component_voxels, remove_small_components
from custom.preprocess import image_preprocessing, intensity_map, restore_intensity

__all__ = [
    "NIFTI_SUFFIXES",
    "TASKS",
    "NiftiPredictor",
    "Summary",
    "WriteOnInputGrid",
    "collect_inputs",
    "inference_inputs",
    "finish",
    "nifti_stem",
    "validate_nifti",
]

#: File name endings accepted as NIfTI (case-insensitive).
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: Output kinds of :class:`NiftiPredictor`.
TASKS: tuple[str, ...] = ("segmentation", "regression")

PathLike = str | Path


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------
def nifti_stem(path: PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (any other name loses only its last suffix)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def validate_nifti(path: PathLike) -> nib.Nifti1Image:
    """Open ``path`` and check that it holds one usable 3D NIfTI volume; return the nibabel image.

    Accepted: ``.nii`` / ``.nii.gz`` files (NIfTI-1 or NIfTI-2) of shape ``(X, Y, Z)`` with every axis longer than
    one voxel, or ``(X, Y, Z, 1, ...)`` (a 4D/5D file holding one volume; the extra axes are dropped by the
    preprocessing, and outputs are 3D), with finite, not all equal values and an invertible affine.

    Raises:
        InputError: naming the file and the problem: missing; not a NIfTI file name; unreadable, corrupt or
            truncated; not one 3D volume (2D, a single slice, a 4D series); no voxels; all voxels equal (e.g.
            all zero); NaN or infinite values; a singular or non-finite affine.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz file name)")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, gzip/zlib errors, EOFError...
        raise InputError(f"{path}: cannot read it as NIfTI ({type(err).__name__}: {err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a single-file NIfTI image (nibabel read it as {type(img).__name__})")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise InputError(f"{path}: expected a 3D image, got a {len(shape)}D image of shape {shape}")
    if any(s == 0 for s in shape):
        raise InputError(f"{path}: the image has no voxels (shape {shape})")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        volumes = math.prod(extra)
        raise InputError(
            f"{path}: expected one 3D volume, got shape {shape} ({len(shape)}D, {volumes} volumes); "
            "split the series and give one volume per file"
        )
    if any(s == 1 for s in shape[:3]):
        raise InputError(f"{path}: expected a 3D volume, got a single slice (shape {shape}); 2D is not supported")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the image's affine (voxel-to-world matrix) is not invertible:\n{affine}")

    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated / corrupt data block
        raise InputError(f"{path}: cannot read the image data; the file may be truncated or corrupt ({err})") from err
    if np.issubdtype(data.dtype, np.complexfloating) or data.dtype.fields is not None:
        raise InputError(f"{path}: unsupported voxel type {data.dtype}; expected real scalar values")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        raise InputError(f"{path}: {bad} voxel(s) are NaN or infinite")
    low, high = data.min(), data.max()
    if low == high:
        raise InputError(f"{path}: the image is empty: every voxel equals {low.item()}")
    return img


def collect_inputs(
    image: PathLike | Sequence[PathLike] | None = None,
    dataset_dir: PathLike | None = None,
    patterns: str | Sequence[str] = ("*.nii", "*.nii.gz"),
) -> list[Path]:
    """The input files: ``image`` (one path or a list), or the files of folder ``dataset_dir`` matching ``patterns``.

    Give exactly one of ``image`` and ``dataset_dir``. A folder is searched non-recursively; hidden files
    (names starting with ``.``, e.g. macOS ``._*`` companions or unfinished atomic writes) are skipped; the
    result is sorted by name and has no duplicates. The files themselves are checked later, one by one, by
    :func:`validate_nifti`.

    Raises:
        InputError: both or neither given; an ``image`` that does not exist; a folder that does not exist, is
            not a folder, or holds no matching file.
    """
    if (image is None) == (dataset_dir is None):
        raise InputError("give exactly one of --image (a NIfTI file) and --dataset_dir (a folder of NIfTI files)")
    if image is not None:
        files = [Path(p).expanduser() for p in ensure_tuple(image)]
        if not files:
            raise InputError("--image: no file given")
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise InputError(f"--image: file not found: {', '.join(missing)}")
        return files
    folder = Path(dataset_dir).expanduser()  # type: ignore[arg-type]
    if not folder.exists():
        raise InputError(f"--dataset_dir: folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"--dataset_dir: not a folder: {folder}")
    pats = ensure_tuple(patterns)
    found = {p for pat in pats for p in folder.glob(str(pat)) if p.is_file() and not p.name.startswith(".")}
    if not found:
        raise InputError(f"--dataset_dir: no file in {folder} matches {', '.join(map(str, pats))}")
    return sorted(found, key=lambda p: p.name)


def inference_inputs(
    image: PathLike | Sequence[PathLike] | None = None,
    dataset_dir: PathLike | None = None,
    demo: str | None = None,
) -> list[Path]:
    """The scans an inference config runs on: ``--image`` or ``--dataset_dir`` (see :func:`collect_inputs`), or with
    neither, the demo scans of a repository checkout (``demo``, a folder or a glob pattern of folders relative to
    the working directory; the first match) when they exist.

    Raises:
        InputError: both given; or neither given and no demo scans here, with a message that names the two options
            (not a path the user never typed).
    """
    if image is not None or dataset_dir is not None:
        return collect_inputs(image=image, dataset_dir=dataset_dir)
    matches = sorted(p for p in glob.glob(demo) if Path(p).is_dir()) if demo else []
    if not matches:
        raise InputError(
            "no input scans: give --image <scan.nii.gz> (one or a list) or --dataset_dir <folder of .nii/.nii.gz files>"
        )
    print(f"no --image or --dataset_dir given: running on the demo scans in {matches[0]}")
    return collect_inputs(dataset_dir=matches[0])


# ---------------------------------------------------------------------------------------------------------------
# Run summary
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Outcome of :meth:`NiftiPredictor.run`: per-file results of the files that worked, and the failures."""

    ok: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of files processed (successes and failures)."""
        return len(self.ok) + len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every file worked, 1 when any failed."""
        return 1 if self.failures else 0

    def report(self) -> str:
        """Multi-line text: counts, then one line per failure."""
        lines = [f"done: {len(self.ok)}/{self.total} file(s) ok, {len(self.failures)} failed"]
        lines += [f"  FAILED {path}: {message}" for path, message in self.failures]
        return "\n".join(lines)


def finish(summary: Summary) -> Summary:
    """End of an inference config: raise ``SystemExit(1)`` when any file failed, else return ``summary``.

    ``SystemExit`` is not an ``Exception``, so MONAI's config parser does not wrap it and
    ``python -m monai.bundle run`` exits with status 1.
    """
    if summary.exit_code:
        raise SystemExit(1)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Postprocessing: the network output back on the input's grid, written as NIfTI
# ---------------------------------------------------------------------------------------------------------------
def _first_tensor(out: Any) -> torch.Tensor:
    """The network output tensor (the first of a tuple/list, e.g. deep supervision)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the network returned {type(out).__name__}; expected a tensor (B, C, *spatial)")
    return out


class WriteOnInputGrid:
    """A bundle's inference ``postprocessing``: the network output, resampled onto the input file's own grid and
    written as NIfTI beside a copy of the input's header.

    Called with ``{"pred": network output (1, C, *S) on the preprocessed grid, "image": the preprocessed input
    MetaTensor (C_in, *S) (its affine, its recorded intensity map), "input": input path, "input_image": the nibabel
    image}``; returns the per-file result (see :meth:`NiftiPredictor.predict_file`).

    Why not MONAI's ``Invertd`` + ``SaveImaged``: the output must land on the grid of the *file* (its affine and shape,
    oblique or LPS included) with a copy of its header, segmentation must take the argmax *after* resampling the class
    probabilities (labels are never interpolated), small lesion components are removed in millilitres of the input's
    voxels, and a denoiser's output needs the recorded intensity normalisation undone; ``Invertd`` inverts the
    spatial transforms of the preprocessing only and ``SaveImaged`` writes a new header.

    Args:
        output_dir: folder for the outputs (created when needed).
        task: ``"segmentation"`` (writes argmax labels) or ``"regression"`` (writes the values, e.g. denoising).
        output_postfix: output name is ``<input stem>_<output_postfix>.nii.gz``.
        save_probabilities: segmentation only: also write the class probabilities on the input grid as
            ``<stem>_prob.nii.gz`` (float32, shape ``(X, Y, Z, C)``).
        num_classes: segmentation: expected number of classes; a network output with another number of channels
            is an error (a single-channel output is binary, sigmoid: 2 classes). ``None``: not checked.
        restore_intensity: regression only: undo the preprocessing's intensity normalisation, so the output is
            in the input's intensity scale (``y * scale + offset`` with the map recorded in the image's meta).
        label_dtype: voxel type of written label maps (numpy dtype or its name).
        residual: regression only: the network predicts a residual to subtract from its (normalised) input, e.g.
            the noise of a denoiser: the output is ``input - network(input)`` (then restored when asked).
        min_component_ml: segmentation only: after the argmax on the input grid, connected components (26-
            connectivity) of a foreground label smaller than this many millilitres become background; 0 (the
            default) keeps everything. The written map, the volumes and anything scored from them use the
            cleaned labels.
    """

    def __init__(
        self,
        output_dir: PathLike = "output",
        task: str = "segmentation",
        output_postfix: str = "seg",
        save_probabilities: bool = False,
        num_classes: int | None = None,
        restore_intensity: bool = False,
        label_dtype: Any = np.uint8,
        residual: bool = False,
        min_component_ml: float = 0.0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task={task!r}; choose one of {list(TASKS)}")
        if save_probabilities and task != "segmentation":
            raise ValueError("save_probabilities applies to task='segmentation' only")
        if (restore_intensity or residual) and task != "regression":
            raise ValueError("restore_intensity and residual apply to task='regression' only")
        if min_component_ml and task != "segmentation":
            raise ValueError("min_component_ml applies to task='segmentation' only")
        min_component_voxels(float(min_component_ml), (1.0, 1.0, 1.0))  # validates the volume (mL)
        self.min_component_ml = float(min_component_ml)
        self.output_dir = Path(output_dir).expanduser()
        self.task = task
        self.output_postfix = str(output_postfix)
        self.save_probabilities = bool(save_probabilities)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.restore_intensity = bool(restore_intensity)
        self.residual = bool(residual)
        self.label_dtype = np.dtype(label_dtype)

    # -- paths ---------------------------------------------------------------------------------------------------
    def output_path(self, path: PathLike) -> Path:
        """Where the prediction for ``path`` is written."""
        return self.output_dir / f"{nifti_stem(path)}_{self.output_postfix}.nii.gz"

    def probabilities_path(self, path: PathLike) -> Path:
        """Where the probabilities for ``path`` are written (when ``save_probabilities``)."""
        return self.output_dir / f"{nifti_stem(path)}_prob.nii.gz"

    # -- steps ---------------------------------------------------------------------------------------------------
    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(C, *S)`` from logits ``(C, *S)``."""
        channels = logits.shape[0]
        if (
            self.num_classes is not None
            and channels != self.num_classes
            and not (channels == 1 and self.num_classes == 2)
        ):
            raise RuntimeError(f"the network outputs {channels} channels, expected num_classes={self.num_classes}")
        if channels == 1:
            p = torch.sigmoid(logits)
            return torch.cat([1.0 - p, p], dim=0)
        return torch.softmax(logits, dim=0)

    @staticmethod
    def _to_input_grid(values: torch.Tensor, src_affine: torch.Tensor, img: nib.Nifti1Image) -> np.ndarray:
        """Resample ``values`` ``(C, *S)`` from the preprocessed grid to the input image's grid: ``(C, X, Y, Z)``."""
        src = MetaTensor(values, affine=src_affine.to(torch.float64))
        dst_affine = torch.as_tensor(np.asarray(img.affine, dtype=np.float64))
        resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)
        out = resample(src, dst_affine=dst_affine, spatial_size=tuple(int(s) for s in img.shape[:3]))
        out = out.as_tensor() if isinstance(out, MetaTensor) else out
        return out.detach().cpu().float().numpy()

    @staticmethod
    def _save(data: np.ndarray, img: nib.Nifti1Image, target: Path, dtype: np.dtype) -> Path:
        """Write ``data`` with ``img``'s affine and a copy of its header (voxel type ``dtype``), atomically."""
        header = img.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)  # the written values are the stored values
        header["cal_min"], header["cal_max"] = 0, 0  # display range of the input does not apply
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        out = type(img)(np.asarray(data).astype(dtype, copy=False), img.affine, header)
        out.header.set_zooms(zooms + (1.0,) * (data.ndim - 3))  # (X, Y, Z, C): unit step along the classes
        return atomic_write(lambda tmp: nib.save(out, str(tmp)), target)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        """Resample and write one prediction; return ``{"output", "probabilities"}`` plus the per-task values."""
        image, img, path = data["image"], data["input_image"], Path(data["input"])
        x = image.as_tensor()[None] if isinstance(image, MetaTensor) else torch.as_tensor(image)[None]
        out = _first_tensor(data["pred"]).float()
        if isinstance(out, MetaTensor):
            out = out.as_tensor()
        if out.ndim != x.ndim or out.shape[0] != 1 or out.shape[2:] != x.shape[2:]:
            raise RuntimeError(
                f"network output shape {tuple(out.shape)} does not match its input {tuple(x.shape)} "
                "(batch and spatial sizes must agree; a SlidingWindowInferer pads sizes the network cannot take)"
            )
        out = out[0]
        result: dict[str, Any] = {"output": self.output_path(path), "probabilities": None}
        if self.task == "segmentation":
            probs = self._to_input_grid(self._probabilities(out), image.affine, img)
            labels = probs.argmax(axis=0)
            if self.min_component_ml > 0:
                spacing = img.header.get_zooms()[:3]
                labels, result["components_removed"] = remove_small_components(
                    labels, min_component_voxels(self.min_component_ml, spacing)
                )
            self._save(labels, img, result["output"], self.label_dtype)
            if self.save_probabilities:
                result["probabilities"] = self._save(
                    np.moveaxis(probs, 0, -1), img, self.probabilities_path(path), np.dtype(np.float32)
                )
            voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
            counts = np.bincount(labels.reshape(-1), minlength=probs.shape[0])
            result["voxels"] = {int(k): int(c) for k, c in enumerate(counts)}
            result["volume_ml"] = {int(k): float(c) * voxel_ml for k, c in enumerate(counts)}
            return result
        if self.residual:
            out = x[0].to(out.device).float() - out
        if self.restore_intensity:
            out = restore_intensity(out, *intensity_map(image))
        values = self._to_input_grid(out.cpu(), image.affine, img)
        values = np.moveaxis(values, 0, -1) if values.shape[0] != 1 else values[0]  # several channels: (X,Y,Z,C)
        self._save(values, img, result["output"], np.dtype(np.float32))
        result.update(min=float(values.min()), max=float(values.max()), mean=float(values.mean()))
        return result


# ---------------------------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------------------------
class NiftiPredictor(Engine):
    """Predict on NIfTI files and write the results (a bundle's inference ``evaluator``; an ignite ``Engine``).

    One iteration per file: :func:`validate_nifti`, ``preprocessing``, ``inferer(network)``, ``postprocessing``.
    Being an ignite engine, it takes MONAI handlers: the inference configs attach a strict ``CheckpointLoader``
    (``val_handlers``), which loads the weights when :meth:`run` starts.

    Args:
        network: ``(B, C_in, *S) -> output`` (e.g. logits ``(B, C, *S)``); moved to ``device``, run in eval mode.
        inferer: a MONAI inferer called as ``inferer(inputs, network)``, e.g. ``SlidingWindowInferer`` (which also
            pads images whose size the network cannot take); ``None``: ``SimpleInferer``.
        preprocessing: a ``Compose`` from :func:`custom.preprocess.image_preprocessing` (reads ``{"image": path}``,
            returns ``"image"`` as a MetaTensor with its affine); ``None``: ``image_preprocessing()``.
        postprocessing: called with ``{"pred", "image", "input", "input_image"}`` (see :class:`WriteOnInputGrid`),
            returns the per-file result dict. ``None``: a :class:`WriteOnInputGrid` built from ``output_dir``,
            ``task``, ``output_postfix``, ``save_probabilities``, ``num_classes``, ``restore_intensity``,
            ``label_dtype``, ``residual`` and ``min_component_ml`` (see there), which must keep their defaults when
            a ``postprocessing`` is given.
        device: torch device (or its name) to run the network on.
        amp: autocast (float16) on CUDA devices; ignored on CPU.
        val_handlers: ignite / MONAI handlers attached to this engine (e.g. ``CheckpointLoader``), as MONAI's
            evaluators take them.
    """

    def __init__(
        self,
        network: nn.Module,
        inferer: Callable[..., Any] | None = None,
        preprocessing: Compose | None = None,
        output_dir: PathLike = "output",
        task: str = "segmentation",
        output_postfix: str = "seg",
        save_probabilities: bool = False,
        device: str | torch.device = "cpu",
        amp: bool = False,
        num_classes: int | None = None,
        restore_intensity: bool = False,
        label_dtype: Any = np.uint8,
        residual: bool = False,
        min_component_ml: float = 0.0,
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        val_handlers: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(self._iteration)
        writer_args = dict(
            output_dir=output_dir,
            task=task,
            output_postfix=output_postfix,
            save_probabilities=save_probabilities,
            num_classes=num_classes,
            restore_intensity=restore_intensity,
            label_dtype=label_dtype,
            residual=residual,
            min_component_ml=min_component_ml,
        )
        if postprocessing is None:
            postprocessing = WriteOnInputGrid(**writer_args)
        else:
            defaults = WriteOnInputGrid()
            changed = [k for k, v in writer_args.items() if k != "output_dir" and v != getattr(defaults, k, v)]
            if changed:
                raise ValueError(f"give {changed} to the postprocessing, not to NiftiPredictor, when passing one")
        self.postprocessing = postprocessing
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.preprocessing = preprocessing if preprocessing is not None else image_preprocessing()
        self.amp = bool(amp)
        self._summary = Summary()
        self._written: dict[Path, Path] = {}
        for handler in val_handlers or ():
            handler.attach(self)

    # -- the writer's settings, for callers that read them from the predictor -----------------------------------
    @property
    def output_dir(self) -> Path | None:
        return getattr(self.postprocessing, "output_dir", None)

    @property
    def task(self) -> str | None:
        return getattr(self.postprocessing, "task", None)

    def output_path(self, path: PathLike) -> Path | None:
        """Where the prediction for ``path`` is written (``None`` when the postprocessing does not say)."""
        locate = getattr(self.postprocessing, "output_path", None)
        return locate(path) if callable(locate) else None

    # -- steps ---------------------------------------------------------------------------------------------------
    def _infer(self, x: torch.Tensor) -> Any:
        """Network output for the preprocessed image ``x`` ``(1, C_in, *S)``."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if self.amp and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.network.eval()
        with torch.no_grad(), autocast:
            return self.inferer(x, self.network)

    def predict_file(self, path: PathLike) -> dict[str, Any]:
        """Validate, preprocess, predict and postprocess (resample to the input grid and write) one file.

        Returns:
            ``{"input", "output", "probabilities" (path or None), "shape", "seconds"}`` and, for segmentation,
            ``"voxels"`` and ``"volume_ml"`` per class label (and ``"components_removed"`` when
            ``min_component_ml`` is set); for regression ``"min"``, ``"max"``, ``"mean"`` (with the default
            :class:`WriteOnInputGrid`; another postprocessing returns its own keys).

        Raises:
            InputError: the file is not a usable 3D NIfTI (see :func:`validate_nifti`).
        """
        start = time.perf_counter()
        path = Path(path)
        img = validate_nifti(path)
        data = self.preprocessing({"image": str(path)})
        image = data["image"]
        if not isinstance(image, MetaTensor):
            raise TypeError("the preprocessing must return 'image' as a MetaTensor (metadata tracking on)")
        x = image.as_tensor()[None].to(self.device)
        pred = self._infer(x)
        result = {"input": path, "output": None, "probabilities": None}
        result.update(self.postprocessing({"pred": pred, "image": image, "input": path, "input_image": img}))
        result["shape"] = tuple(int(s) for s in img.shape[:3])
        result["seconds"] = time.perf_counter() - start
        return result

    def _iteration(self, engine: Engine, path: Path) -> dict[str, Any] | None:
        """One file: predict it, or record its failure (the other files still run)."""
        i, n = engine.state.iteration, engine.state.epoch_length
        start = time.perf_counter()
        try:
            target = self.output_path(path)
            if target is not None and target in self._written:
                raise InputError(f"{path}: its output {target} would overwrite that of {self._written[target]}")
            result = self.predict_file(path)
            if target is not None:
                self._written[target] = path
        except Exception as err:  # one bad file must not stop the others; KeyboardInterrupt still does
            message = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
            self._summary.failures.append((path, message))
            print(f"[{i}/{n}] {path.name}: FAILED: {message}", flush=True)
            return None
        self._summary.ok.append(result)
        shown = result.get("output") or "done"
        print(f"[{i}/{n}] {path.name}: ok -> {shown} ({time.perf_counter() - start:.1f} s)", flush=True)
        return result

    def run(self, paths: PathLike | Iterable[PathLike]) -> Summary:  # type: ignore[override]
        """Predict every file in ``paths``; a failing file is reported and skipped, the others still run.

        Fires the engine's events (``STARTED`` loads the weights when a ``CheckpointLoader`` is attached). Prints
        ``[i/n] name: ok -> output (x.x s)`` or ``[i/n] name: FAILED: message`` per file, then the
        :meth:`Summary.report`. Two inputs that would write the same output (``a.nii`` and ``a.nii.gz``) fail the
        second rather than overwrite the first.

        Raises:
            InputError: ``paths`` is empty.
        """
        files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not files:
            raise InputError("no input images to process")
        self._summary, self._written = Summary(), {}
        super().run(files, max_epochs=1)
        print(self._summary.report(), flush=True)
        return self._summary

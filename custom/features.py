"""Encoder features of your own scans: the inference of the ``seqinv_pretrain`` bundle.

``bundles/seqinv_pretrain/configs/inference.yaml`` runs the pretrained encoder (``models/model.pt`` as
:class:`custom.networks.PooledEncoder`, loaded by a strict ``CheckpointLoader``) on NIfTI scans with the same
:class:`custom.inference.NiftiPredictor` engine as the downstream bundles, with

* ``preprocessing`` (:func:`feature_preprocessing`): load, RAS, resample to ``pixdim``, normalise the intensities
  as the pretraining views were (:class:`NormalizeLikeViewsd`, default ``histeq``), zero-pad every axis to a
  multiple of the encoder's size divisor (16 for five levels);
* ``inferer`` (:class:`EncoderFeatureInferer`): the whole padded volume through the encoder at once, giving ``h``
  (the global average of the deepest map, what the projector saw in pretraining) and, when asked, one level's map;
* ``postprocessing`` (:class:`FeatureWriter`): ``<stem>_features.npy`` (float32 ``(C,)``) and, when asked,
  ``<stem>_level<k>.nii.gz`` (the level-``k`` map, ``(X_k, Y_k, Z_k, C_k)``, on the preprocessed grid downsampled by
  ``2**k``, with the matching affine); :func:`write_feature_table` then writes ``features.csv`` (one row per scan).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.inferers import Inferer
from monai.transforms import Compose, DivisiblePadd, EnsureTyped, LoadImaged, MapTransform, Orientationd, Spacingd

from custom.inference import Summary, nifti_stem
from custom.intensity import histogram_equalise, percentile_rescale
from custom.io import atomic_write, atomic_write_text

__all__ = [
    "FEATURE_NORMS",
    "EncoderFeatureInferer",
    "FeatureWriter",
    "NormalizeLikeViewsd",
    "feature_preprocessing",
    "level_affine",
    "write_feature_table",
]

#: Intensity normalisations of :class:`NormalizeLikeViewsd`.
FEATURE_NORMS: tuple[str, ...] = ("histeq", "zscore", "none")


class NormalizeLikeViewsd(MapTransform):
    """Normalise an image's nonzero voxels as the pretraining views were; the zero background stays 0.

    ``histeq`` (default, the views of ``train.yaml``'s ``view_norm: histeq``): 0.5 / 95 percentile rescale to
    [0, 1], histogram equalisation, then a z-score, all over the nonzero voxels (:mod:`custom.intensity`);
    ``zscore``: z-score over the nonzero voxels; ``none``: unchanged.
    """

    def __init__(self, keys: KeysCollection, method: str = "histeq", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in FEATURE_NORMS:
            raise ValueError(f"unknown normalisation {method!r}; choose one of {list(FEATURE_NORMS)}")
        self.method = method

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            raw = raw.float()
            if self.method == "none":
                continue
            region = raw != 0
            if not bool(region.any()):
                region = torch.ones_like(raw, dtype=torch.bool)
            values = raw[region]
            if self.method == "histeq":
                values = histogram_equalise(percentile_rescale(values, 0.5, 95.0))
            values = (values - values.mean()) / values.std(unbiased=False).clamp_min(1e-8)
            out = torch.zeros_like(raw)
            out[region] = values
            d[key] = (
                MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
                if isinstance(img, MetaTensor)
                else out
            )
        return d


def feature_preprocessing(
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0), normalize: str = "histeq", size_divisor: int = 16
) -> Compose:
    """Load a NIfTI scan (``{"image": path}``), reorient to RAS, resample to ``pixdim`` mm (``None``: keep the
    scan's spacing), normalise (:class:`NormalizeLikeViewsd`) and zero-pad every axis to a multiple of
    ``size_divisor`` (the encoder's ``2 ** (levels - 1)``)."""
    reader = NibabelReader(squeeze_non_spatial_dims=True)
    steps: list[Any] = [
        LoadImaged(keys="image", reader=reader, image_only=True, ensure_channel_first=True),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
        Orientationd(keys="image", axcodes="RAS", labels=None),
    ]
    if pixdim is not None:
        steps.append(Spacingd(keys="image", pixdim=tuple(float(p) for p in pixdim), mode="bilinear"))
    steps += [NormalizeLikeViewsd(keys="image", method=normalize), DivisiblePadd(keys="image", k=int(size_divisor))]
    return Compose(steps)


class EncoderFeatureInferer(Inferer):
    """Run a :class:`~custom.networks.PooledEncoder` on a whole (padded) volume.

    Returns ``{"pooled": (B, C)}`` (the network's output ``h``) and, with ``save_map``, ``"map"``: the feature map
    of encoder level ``level`` (``-1`` the deepest), ``(B, C_level, *S / 2**level)``, and ``"level"``: its index.
    """

    def __init__(self, save_map: bool = False, level: int = -1) -> None:
        super().__init__()
        self.save_map = bool(save_map)
        self.level = int(level)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not self.save_map:
            return {"pooled": network(inputs)}
        maps = network.feature_maps(inputs)
        if not -len(maps) <= self.level < len(maps):
            raise ValueError(f"feature level {self.level} does not exist: the encoder has {len(maps)} levels")
        level = self.level % len(maps)
        return {"pooled": maps[-1].flatten(2).mean(dim=2), "map": maps[level], "level": level}


def level_affine(affine: np.ndarray, level: int) -> np.ndarray:
    """Voxel-to-world affine of encoder level ``level`` (``level`` 2x max-poolings of the grid ``affine``).

    Voxel ``i`` of level ``k`` pools input voxels ``s*i .. s*i + s - 1`` (``s = 2**k``); its centre is input index
    ``s*i + (s - 1) / 2``.
    """
    scale = float(2**level)
    step = np.diag([scale, scale, scale, 1.0])
    step[:3, 3] = (scale - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ step


class FeatureWriter:
    """The ``seqinv_pretrain`` inference ``postprocessing``: write each scan's features under ``output_dir``.

    Writes ``<stem>_features.npy`` (float32 ``(C,)``, the pooled deepest features ``h``) and, when the inferer
    returned a map, ``<stem>_level<k>.nii.gz`` (float32 ``(X_k, Y_k, Z_k, C_k)``, on the preprocessed RAS grid at
    ``pixdim * 2**k``, affine from :func:`level_affine`). Returns ``{"output", "features", "map"}``.
    """

    def __init__(self, output_dir: str | Path = "output", output_postfix: str = "features") -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.output_postfix = str(output_postfix)

    def output_path(self, path: str | Path) -> Path:
        """Where the feature vector of ``path`` is written."""
        return self.output_dir / f"{nifti_stem(path)}_{self.output_postfix}.npy"

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        pred, path, image = data["pred"], Path(data["input"]), data["image"]
        pooled = pred["pooled"] if isinstance(pred, Mapping) else pred
        vector = torch.as_tensor(pooled).detach().float().cpu().reshape(-1).numpy()
        target = self.output_path(path)
        atomic_write(lambda tmp: np.save(tmp, vector, allow_pickle=False), target)
        result: dict[str, Any] = {"output": target, "features": vector, "map": None}
        if isinstance(pred, Mapping) and pred.get("map") is not None:
            level = int(pred["level"])
            fmap = torch.as_tensor(pred["map"]).detach().float().cpu()[0].numpy()  # (C, X, Y, Z)
            affine = level_affine(np.asarray(image.affine, dtype=np.float64), level)
            out = nib.Nifti1Image(np.moveaxis(fmap, 0, -1).astype(np.float32), affine)
            out.header.set_xyzt_units("mm")
            map_path = self.output_dir / f"{nifti_stem(path)}_level{level}.nii.gz"
            result["map"] = atomic_write(lambda tmp: nib.save(out, str(tmp)), map_path)
        return result


def write_feature_table(summary: Summary, path: str | Path) -> Path:
    """``features.csv``: one row per scan that worked, ``input`` then ``h0 .. h<C-1>``; returns ``path``."""
    rows = [r for r in summary.ok if r.get("features") is not None]
    width = max((len(r["features"]) for r in rows), default=0)
    lines: list[list[str]] = [["input", *(f"h{i}" for i in range(width))]]
    lines += [[str(r["input"]), *(f"{float(v):.7g}" for v in r["features"])] for r in rows]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    path = Path(path)
    atomic_write_text(buffer.getvalue(), path)
    print(f"features of {len(rows)} scan(s): {path}")
    return path

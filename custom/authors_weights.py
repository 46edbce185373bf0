"""The authors' released encoders: their file format, the key mapping onto :class:`custom.networks.Encoder`, import.

The paper's authors published three pretrained 3D encoders on the Hugging Face Hub (Apache-2.0):
``liamchalcroft/midl-2025-base`` (Base), ``liamchalcroft/midl-2025-seq-aug`` (SeqAug) and
``liamchalcroft/midl-2025-seq-inv`` (SeqInv). They are the only real-data weights for this method. Nothing here
downloads them: fetch the file yourself (see the ``seqinv_pretrain`` docs), then either

* pass it wherever an encoder is accepted (``--pretrained_encoder <file>`` of the downstream bundles, ``seqinv
  invariance --weights <file>``): :func:`custom.weights.load_encoder_weights` recognises the format and maps the
  keys with :func:`authors_to_encoder_keys`; or
* convert it once into this project's plain encoder state dict with ``seqinv import-encoder <file> --out
  model.pt`` (:func:`import_authors_encoder`), which checks it and reports what was copied.

Format (the authors' export script): ``torch.save({"config": {...}, "state_dict": {...}})`` with ``config`` =
``{"spatial_dims": 3, "in_channels": 1, "features": (64, 128, 256, 512, 768), "act": "GELU", "norm": "instance",
"bias": True, "dropout": 0.2}`` and the state dict of an encoder built from MONAI ``BasicUNet`` parts: ``conv_0``
(``TwoConv``) then ``down_1`` ... ``down_4`` (``Down``: max-pooling then ``TwoConv``). Keys look like
``conv_0.conv_0.conv.weight`` or ``down_3.convs.conv_1.conv.bias``, possibly behind ``_orig_mod.``
(``torch.compile``), ``module.`` (DDP) or ``encoder.`` prefixes, which are stripped.

Key mapping: ``conv_0.<rest>`` -> ``levels.0.<rest>`` and ``down_<k>.<rest>`` -> ``levels.<k>.<rest>``. The
``<rest>`` is the same on both sides because :class:`~custom.networks.ConvBlock` and the encoder's down blocks use
``TwoConv``'s / ``Down``'s sub-module names (``conv_0``, ``conv_1``, ``max_pooling``, ``convs``, and MONAI
``Convolution``'s ``conv``).

Same function: both apply conv (3x3x3, padding 1, bias) -> InstanceNorm (no affine parameters, no running
statistics) -> GELU, plus dropout. MONAI ``TwoConv`` puts the dropout before the activation (``NDA``), this
project's encoder after it (``NAD``, the paper's order); in eval mode dropout is the identity, so the two are the
same function, and a frozen encoder (the downstream bundles) is always in eval mode. For training with dropout,
build the encoder with ``adn_ordering="NDA"`` to reproduce ``TwoConv`` exactly.

Refused (``ValueError`` naming the file): anything that is not complete, i.e. a tensor of another model, a
missing level or tensor, levels that are not ``conv_0, down_1, ..., down_<L-1>``, a config the encoder cannot
represent (another activation or normalisation, affine norm parameters, no bias, another input channel count or
dimensionality), or a config whose widths differ from the tensors'.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AUTHORS_CONFIG",
    "AUTHORS_REPOSITORIES",
    "authors_config",
    "authors_to_encoder_keys",
    "check_authors_config",
    "import_authors_encoder",
    "is_authors_state",
]

#: Hugging Face model repositories of the authors' encoders (mode name -> repository).
AUTHORS_REPOSITORIES: dict[str, str] = {
    "base": "liamchalcroft/midl-2025-base",
    "seqaug": "liamchalcroft/midl-2025-seq-aug",
    "seqinv": "liamchalcroft/midl-2025-seq-inv",
}
#: The ``config`` of the authors' files (their export script).
AUTHORS_CONFIG: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "features": (64, 128, 256, 512, 768),
    "act": "GELU",
    "norm": "instance",
    "bias": True,
    "dropout": 0.2,
}

#: ``conv_0.<rest>`` (level 0) or ``down_<k>.<rest>`` (level k >= 1).
_LEVEL_KEY = re.compile(r"^(?:conv_0|down_(?P<k>[1-9][0-9]*))\.(?P<rest>.+)$")


def is_authors_state(keys: Sequence[str] | Mapping[str, Any]) -> bool:
    """Whether state-dict keys (wrapper prefixes already stripped) follow the authors' ``conv_0`` / ``down_<k>``
    layout rather than this project's ``levels.<i>``."""
    names = list(keys)
    return (
        bool(names)
        and any(_LEVEL_KEY.match(str(k)) for k in names)
        and not any(str(k).startswith("levels.") for k in names)
    )


def authors_to_encoder_keys(
    entries: Mapping[str, torch.Tensor], source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Map the authors' encoder keys onto :class:`~custom.networks.Encoder` keys (``levels.<i>.<rest>``).

    Args:
        entries: the authors' state dict with wrapper prefixes stripped (keys ``conv_0.*``, ``down_<k>.*``).
        source: the file name, for messages.

    Raises:
        ValueError: a key that is not an encoder tensor of that layout (a partial or foreign file is refused, not
            half-loaded), or levels that are not ``conv_0, down_1, ..., down_<L-1>``.
    """
    mapped: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, value in entries.items():
        match = _LEVEL_KEY.match(str(key))
        if match is None:
            foreign.append(str(key))
            continue
        level = int(match.group("k") or 0)
        mapped[f"levels.{level}.{match.group('rest')}"] = value
    if foreign:
        raise ValueError(
            f"{source}: {len(foreign)} tensor(s) are not encoder tensors of the authors' layout (conv_0.*, "
            f"down_<k>.*), e.g. {sorted(foreign)[:5]}; refusing a partial import"
        )
    levels = sorted({int(k.split(".")[1]) for k in mapped})
    if not levels or levels != list(range(len(levels))):
        names = ["conv_0" if i == 0 else f"down_{i}" for i in levels]
        raise ValueError(f"{source}: encoder levels {names} are not conv_0, down_1, ..., down_<L-1>; missing levels")
    return mapped


def _name(value: Any) -> tuple[str, dict[str, Any]]:
    """A MONAI layer spec (``"GELU"`` or ``("instance", {"affine": True})``) as ``(lower-case name, kwargs)``."""
    if isinstance(value, (tuple, list)) and value:
        kwargs = value[1] if len(value) > 1 and isinstance(value[1], Mapping) else {}
        return str(value[0]).lower(), dict(kwargs)
    return str(value).lower(), {}


def authors_config(raw: Any) -> dict[str, Any] | None:
    """The ``config`` dict stored beside the state dict in an authors' file, or ``None`` when there is none."""
    if isinstance(raw, Mapping) and isinstance(raw.get("config"), Mapping):
        return dict(raw["config"])
    return None


def check_authors_config(config: Mapping[str, Any] | None, widths: Sequence[int], source: str) -> dict[str, Any]:
    """Check that ``config`` describes an encoder :class:`~custom.networks.Encoder` represents exactly, with the
    widths ``widths`` read from the tensors. Returns the ``Encoder`` keyword arguments (``features``, ``dropout``).

    A missing config (a bare state dict) is accepted: the tensors alone then decide the widths, and the layer types
    cannot be checked beyond the tensors (no norm parameters, a bias per convolution; checked by the caller).

    Raises:
        ValueError: naming the file and the setting the encoder cannot reproduce.
    """
    widths = tuple(int(w) for w in widths)
    if config is None:
        return {"features": widths, "dropout": float(AUTHORS_CONFIG["dropout"])}
    problems = []
    if int(config.get("spatial_dims", 3)) != 3:
        problems.append(f"spatial_dims {config.get('spatial_dims')} (this encoder is 3D)")
    if int(config.get("in_channels", 1)) != 1:
        problems.append(f"in_channels {config.get('in_channels')} (the bundles feed one MRI channel)")
    act, _ = _name(config.get("act", "GELU"))
    if act != "gelu":
        problems.append(f"activation {config.get('act')!r} (this encoder uses GELU)")
    norm, norm_kwargs = _name(config.get("norm", "instance"))
    if norm != "instance" or norm_kwargs.get("affine", False):
        problems.append(f"normalisation {config.get('norm')!r} (this encoder uses InstanceNorm without affine)")
    if not bool(config.get("bias", True)):
        problems.append("bias False (this encoder's convolutions have a bias)")
    if "features" in config:
        declared = tuple(int(f) for f in config["features"])[: len(widths)]
        if declared != widths or len(tuple(config["features"])) < len(widths):
            problems.append(f"features {tuple(config['features'])} but the tensors have widths {widths}")
    if problems:
        raise ValueError(f"{source}: the authors' config does not describe this encoder: " + "; ".join(problems))
    return {"features": widths, "dropout": float(config.get("dropout", AUTHORS_CONFIG["dropout"]))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def import_authors_encoder(
    source: str | Path, out: str | Path, features: Sequence[int] | None = None
) -> dict[str, Any]:
    """Convert an authors' encoder file into this project's encoder state dict (a bundle's ``models/model.pt``).

    Reads ``source`` (``torch.load(weights_only=True)``), checks its config and completeness, loads every tensor
    into an :class:`~custom.networks.Encoder` of its widths (all tensors or nothing), and writes that encoder's
    state dict to ``out`` atomically.

    Args:
        source: the downloaded file.
        out: where the converted weights go (e.g. ``bundles/seqinv_pretrain/models/model.pt``).
        features: expected encoder widths (e.g. the paper's ``(64, 128, 256, 512, 768)``); ``None``: those of the
            file.

    Returns:
        ``{"source", "source_sha256", "out", "out_sha256", "features", "copied", "total", "config"}``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: not an authors' encoder file, partial, or other widths than ``features``.
    """
    from custom.io import atomic_torch_save
    from custom.networks import Encoder
    from custom.weights import encoder_features_of, encoder_state_dict, is_authors_weights, load_encoder_weights

    source = Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"authors' encoder file not found: {source}")
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"cannot read {source} as a torch file: {err}") from err
    if not is_authors_weights(raw, str(source)):
        found = sorted(str(k) for k in raw)[:5] if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(
            f"{source}: not an authors' encoder file (expected keys conv_0.*, down_<k>.*; found e.g. {found})"
        )
    widths = encoder_features_of(raw)
    kwargs = check_authors_config(authors_config(raw), widths, str(source))
    if features is not None and tuple(int(f) for f in features) != tuple(widths):
        raise ValueError(f"{source}: encoder widths {tuple(widths)} differ from the expected {tuple(features)}")
    encoder = Encoder(1, kwargs["features"], kwargs["dropout"])
    copied = load_encoder_weights(encoder, raw, strict_widths=True)
    total = len(encoder.state_dict())
    out = Path(out)
    atomic_torch_save(encoder_state_dict(encoder), out)
    return {
        "source": str(source),
        "source_sha256": _sha256(source),
        "out": str(out),
        "out_sha256": _sha256(out),
        "features": tuple(widths),
        "copied": copied,
        "total": total,
        "config": authors_config(raw),
    }

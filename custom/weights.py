"""Encoder weight files: reading (file, bundle folder or zip), key mapping and loading, extraction for saving.

The networks in :mod:`custom.networks` name their encoder tensors ``levels.<i>...``; this module maps any
supported source onto those keys with an explicit mapping and reports how many tensors were copied (loading
zero tensors is an error). Sources: a plain encoder state dict (a bundle's ``models/model.pt``), a full
``PretrainingModel`` / ``FrozenEncoderUNet`` state dict (keys ``encoder.*``), an ignite checkpoint holding
either, a MONAI bundle folder or a packaged bundle zip, and the authors' released encoders (keys ``conv_0.*``,
``down_<k>.*`` of MONAI ``BasicUNet`` parts, mapped by :mod:`custom.authors_weights`; such a file loads completely
or not at all). ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped first.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "read_weights",
    "load_encoder_weights",
    "encoder_state_dict",
    "encoder_features_of",
    "encoder_features_or",
    "is_authors_weights",
    "raw_encoder_entries",
    "require_weights",
]

logger = logging.getLogger(__name__)

#: Prefixes stripped from every key before matching (DDP wrapper, ``torch.compile`` wrapper).
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: Prefix of the encoder's keys in a ``PretrainingModel`` or ``FrozenEncoderUNet`` state dict.
_ENCODER_PREFIX = "encoder."
#: Keys under which checkpoint files keep a state dict (ignite ``CheckpointSaver`` uses ``network``/``model``).
_CONTAINER_KEYS: tuple[str, ...] = ("encoder", "model", "network", "net", "state_dict", "model_state_dict")


def encoder_features_of(state: Mapping[str, Any]) -> tuple[int, ...]:
    """Widths of the encoder that produced ``state`` (an encoder state dict or a model holding ``encoder.*``).

    Read from the output channels of the last convolution of every level (``levels.<i>...conv.weight``), so a
    bundle can rebuild its encoder from the weights alone. Raises ``ValueError`` when no level is found.
    """
    entries = raw_encoder_entries(state, "<state dict>")
    widths: dict[int, int] = {}
    for key, value in entries.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "levels" and parts[1].isdigit() and key.endswith("conv.weight"):
            widths[int(parts[1])] = int(value.shape[0])  # both convs of a level output its width
    if not widths or sorted(widths) != list(range(len(widths))):
        raise ValueError(f"cannot read encoder widths: no levels.<i>.*.conv.weight keys in {sorted(entries)[:5]}")
    return tuple(widths[i] for i in range(len(widths)))


def encoder_features_or(path: str | Path, default: Sequence[int]) -> tuple[int, ...]:
    """Widths of the encoder weights at ``path`` (any source :func:`read_weights` takes) when it exists, else
    ``default``: a bundle config builds its network with the widths of the weights it ships, and still builds one
    (``default``, e.g. for ``verify_net_in_out``) where no weights are present yet."""
    if not Path(path).exists():
        return tuple(int(f) for f in default)
    return encoder_features_of(read_weights(path))


def require_weights(path: str | Path) -> Path:
    """``path`` if it is a file, else :class:`~custom.errors.InputError` saying how to get encoder weights there."""
    from custom.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: no encoder weights. Train them (the bundle's train.yaml, or `make weights` in the repository), "
            "convert one of the authors' released encoders with `seqinv import-encoder <file> --out <model.pt>`, "
            "or pass --model_path <model.pt>"
        )
    return path


def _strip_wrappers(key: str) -> str:
    """Remove leading DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _unwrap_checkpoint(obj: Any, source: str) -> Mapping[str, Any]:
    """Descend into checkpoint containers (``{"network": state_dict, "optimizer": ...}``) to the state dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for _ in range(4):  # at most a few nested containers
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source}: no tensors found; expected a state dict or a checkpoint holding one under one of "
            f"{list(_CONTAINER_KEYS)}; top-level keys: {sorted(map(str, obj))[:10]}"
        )
    return obj


def _encoder_entries(state: Mapping[str, Any], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Map a state dict to encoder keys.

    Wrapper prefixes are stripped; if any key starts with ``encoder.`` (a full ``PretrainingModel`` or
    ``FrozenEncoderUNet`` state dict), only those keys are kept, without the prefix; otherwise every key
    is taken as an encoder key (an encoder-only state dict). Keys in the authors' layout (``conv_0.*``,
    ``down_<k>.*``) are then mapped onto ``levels.<i>.*`` (:func:`custom.authors_weights.authors_to_encoder_keys`,
    which refuses any other key). Non-tensor values are ignored.
    """
    from custom.authors_weights import authors_to_encoder_keys, is_authors_state

    tensors = {_strip_wrappers(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(_ENCODER_PREFIX) for k in tensors):
        tensors = {
            _strip_wrappers(k[len(_ENCODER_PREFIX) :]): v for k, v in tensors.items() if k.startswith(_ENCODER_PREFIX)
        }
    if is_authors_state(tensors):
        return authors_to_encoder_keys(tensors, source)
    return tensors


def raw_encoder_entries(raw: Any, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The encoder tensors of a loaded weights object (checkpoint containers unwrapped), under ``levels.<i>`` keys."""
    return _encoder_entries(_unwrap_checkpoint(raw, source), source)


def is_authors_weights(raw: Any, source: str) -> bool:
    """Whether the loaded weights ``raw`` are one of the authors' released encoders (their ``conv_0`` /
    ``down_<k>`` keys, checked before any mapping)."""
    from custom.authors_weights import is_authors_state

    state = _unwrap_checkpoint(raw, source)
    keys = [_strip_wrappers(str(k)) for k, v in state.items() if isinstance(v, torch.Tensor)]
    keys = [_strip_wrappers(k[len(_ENCODER_PREFIX) :]) if k.startswith(_ENCODER_PREFIX) else k for k in keys]
    return is_authors_state(keys)


def _read_zipped_weights(path: Path) -> Mapping[str, Any]:
    """Weights of a packaged bundle zip (``<name>/models/model.pt`` inside), read without extracting."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted(n for n in archive.namelist() if n.endswith("models/model.pt"))
            if not members:
                raise FileNotFoundError(
                    f"bundle zip {path} holds no models/model.pt (its weights may be listed in large_files.yml: "
                    "download them with `python -m monai.bundle download_large_files` and pass the bundle folder)"
                )
            member = min(members, key=lambda n: n.count("/"))  # the bundle's own weights, not a nested copy
            payload = archive.read(member)
    except zipfile.BadZipFile as err:
        raise ValueError(f"cannot read pretrained encoder bundle {path}: not a valid zip file ({err})") from err
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"cannot read pretrained encoder weights {member} in {path}: {err}") from err


def read_weights(source: str | Path) -> Mapping[str, Any]:
    """Load the object stored at ``source``: a weights file, a bundle folder or a packaged bundle zip.

    A folder is a MONAI bundle (``models/model.pt``), the parent a bundle was downloaded into (exactly one
    ``*/models/model.pt`` below it), or a folder holding ``model.pt``; a ``.zip`` is a packaged bundle.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".zip":
        return _read_zipped_weights(path)
    if path.is_dir() and not (path / "models" / "model.pt").is_file() and not (path / "model.pt").is_file():
        nested = sorted(path.glob("*/models/model.pt"))
        if len(nested) == 1:  # the folder given to `monai.bundle download --bundle_dir`
            path = nested[0].parent.parent
    if path.is_dir():
        candidates = [path / "models" / "model.pt", path / "model.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"pretrained encoder folder {path} holds no weights: looked for {', '.join(map(str, candidates))}"
            )
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"pretrained encoder weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"cannot read pretrained encoder weights from {path}: {err}") from err


def load_encoder_weights(encoder: nn.Module, source: str | Path | Mapping[str, Any], strict_widths: bool = True) -> int:
    """Copy pretrained weights into ``encoder`` with an explicit key mapping; return how many tensors were copied.

    Args:
        encoder: an ``Encoder`` (or any module whose state dict uses the same keys).
        source: one of

            * a ``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``) holding an encoder-only state
              dict (bundle ``models/model.pt``), a full ``PretrainingModel`` / ``FrozenEncoderUNet``
              state dict (keys ``encoder.*``), or a checkpoint dict holding either under ``"model"``,
              ``"network"``, ``"net"``, ``"state_dict"``, ``"model_state_dict"`` or ``"encoder"``;
            * a MONAI bundle folder (``<folder>/models/model.pt``, or ``<folder>/model.pt``);
            * such a dict itself.

            ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped first. The authors'
            released encoders (``{"config", "state_dict"}`` with keys ``conv_0.*``, ``down_<k>.*``) are recognised
            and mapped (:mod:`custom.authors_weights`); they must fill the encoder exactly.
        strict_widths: a key present in both with different shapes (an encoder of other widths) raises
            ``ValueError``; with ``False`` such tensors are skipped with a warning instead.

    Returns:
        The number of tensors copied (logged at INFO as ``copied n/m``, ``m`` the encoder's tensor count).

    Raises:
        FileNotFoundError: the file or bundle weights do not exist (the message names the path).
        ValueError: the file cannot be read, holds no state dict, no key matches the encoder (an error, not a
            warning), or (``strict_widths``) a matching key has a different shape. Messages name the source.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    raw = source if isinstance(source, Mapping) else read_weights(source)
    entries = raw_encoder_entries(raw, name)
    authors = is_authors_weights(raw, name)
    if authors:  # the authors' released encoders: their config must describe this encoder, and all of it loads
        from custom.authors_weights import authors_config, check_authors_config

        check_authors_config(authors_config(raw), encoder_features_of(entries), name)

    own = encoder.state_dict()
    stats_in_source = any(k.endswith("running_mean") for k in entries)
    stats_in_encoder = any(k.endswith("running_mean") for k in own)
    if stats_in_source != stats_in_encoder:  # BatchNorm vs instance norm: copying the convs alone is wrong
        raise ValueError(
            f"{name} was trained with {'batch' if stats_in_source else 'instance'} normalisation but this encoder "
            f"uses {'batch' if stats_in_encoder else 'instance'} normalisation; build it with the matching norm"
        )
    matched = {k: v for k, v in entries.items() if k in own}
    if not matched:
        raise ValueError(
            f"no tensor of {name} matches the encoder: 0/{len(own)} copied. Source keys (first 5): "
            f"{sorted(entries)[:5]}; expected keys like {sorted(own)[:5]}"
        )
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in matched.items() if v.shape != own[k].shape}
    if mismatched:
        detail = "; ".join(f"{k}: source {s} vs encoder {e}" for k, (s, e) in list(mismatched.items())[:5])
        message = (
            f"encoder widths of {name} differ from this encoder's ({len(mismatched)} tensor(s) of other shape: "
            f"{detail}). Set the encoder features to those the weights were trained with."
        )
        if strict_widths:
            raise ValueError(message)
        logger.warning(message + " Skipping them.")
        matched = {k: v for k, v in matched.items() if k not in mismatched}
        if not matched:
            raise ValueError(f"no tensor of {name} fits the encoder: 0/{len(own)} copied")

    with torch.no_grad():
        for k, v in matched.items():
            own[k].copy_(v)  # state_dict() tensors share storage with the parameters/buffers
    missing = sorted(set(own) - set(matched))
    unused = sorted(set(entries) - set(own))
    if authors and (missing or unused):
        raise ValueError(
            f"{name}: the authors' encoder does not fill this encoder exactly ({len(matched)}/{len(own)} tensors "
            f"match; missing {missing[:5]}, unexpected {unused[:5]}); refusing a partial load"
        )
    logger.info("loaded pretrained encoder from %s: copied %d/%d tensors", name, len(matched), len(own))
    if missing:
        logger.warning("%d encoder tensor(s) not in %s, left as initialised: %s", len(missing), name, missing[:5])
    if unused:
        logger.warning("%d tensor(s) of %s match no encoder key, ignored: %s", len(unused), name, unused[:5])
    return len(matched)


def encoder_state_dict(model: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Encoder-only state dict (CPU tensors) for saving as a bundle's ``models/model.pt``.

    ``model`` may be an ``Encoder``, any module with an ``encoder`` attribute (``PretrainingModel``,
    ``FrozenEncoderUNet``), either wrapped by DDP / ``torch.compile``, or a full state dict / checkpoint
    (keys ``encoder.*`` are extracted). The keys are those :func:`load_encoder_weights` expects.
    """
    if isinstance(model, Mapping):
        state: Mapping[str, Any] = _encoder_entries(_unwrap_checkpoint(model, "<state dict>"))
    else:
        module = model
        while True:  # DDP (``.module``) / torch.compile (``._orig_mod``) wrappers, in any nesting
            inner = next((getattr(module, a) for a in ("module", "_orig_mod") if hasattr(module, a)), None)
            if not isinstance(inner, nn.Module):
                break
            module = inner
        if isinstance(getattr(module, "encoder", None), nn.Module):  # a model holding the encoder
            module = module.encoder
        state = module.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}

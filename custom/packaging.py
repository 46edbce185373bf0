"""Model Zoo-style distribution of a bundle: a deterministic zip, a release record, and a verified download.

``package_bundle`` writes ``<out>/<name>_v<version>.zip`` holding ``<name>/`` (configs, docs, LICENSE, weights or a
``large_files.yml`` entry for weights kept outside the zip) with a copy of the ``custom`` package at
``<name>/custom``, so the unpacked bundle runs where only MONAI and its dependencies are installed (MONAI's
``run`` puts the bundle folder on ``sys.path``). The same input gives the same bytes: entries are sorted and
carry fixed timestamps and permissions. ``<out>/model_info.json`` records each zip's sha256; packaging a version
that is already recorded with other content is refused (bump ``version`` and the changelog).

``fetch_bundle`` downloads a zip (any URL ``urllib`` opens, ``file://`` included), checks its sha256 against a
``model_info.json`` *before anything is extracted* (bundle configs execute code), then hands the verified file to
MONAI's own ``monai.bundle.download``. ``verify_bundle_zip`` checks a zip that is already on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom.bundle_check import validate_metadata
from custom.errors import InputError
from custom.io import atomic_path, atomic_write_text

__all__ = [
    "MODEL_INFO",
    "PackageResult",
    "bundle_entries",
    "fetch_bundle",
    "package_bundle",
    "read_model_info",
    "sha256_of",
    "verify_bundle_zip",
    "zip_name",
]

#: Release record written beside the zips.
MODEL_INFO = "model_info.json"
#: Timestamp of every zip entry (the earliest a zip can store), so the bytes do not depend on file times.
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
#: Never packaged: training outputs, caches, placeholders.
_SKIP_DIRS = {"runs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
_SKIP_NAMES = {".gitkeep", ".DS_Store"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".tmp"}
#: Weight files of a bundle's models/ folder (kept outside the zip when a weights URL is given).
_WEIGHT_SUFFIXES = {".pt", ".ts", ".pth", ".ckpt"}


@dataclass(frozen=True)
class PackageResult:
    """What :func:`package_bundle` wrote."""

    zip_path: Path
    sha256: str
    name: str
    version: str
    weights: str  # "embedded", "external" (large_files.yml) or "none"
    entries: tuple[str, ...]


def zip_name(name: str, version: str) -> str:
    """``<name>_v<version>.zip``."""
    return f"{name}_v{version}.zip"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _skipped(relative: Path) -> bool:
    return (
        any(part in _SKIP_DIRS for part in relative.parts[:-1])
        or relative.name in _SKIP_NAMES
        or relative.suffix in _SKIP_SUFFIXES
        or relative.name.startswith(".")
    )


def _package_dir() -> Path:
    """The folder of the ``custom`` package that is running (copied into every zip)."""
    return Path(__file__).resolve().parent


def bundle_entries(bundle_dir: Path, weights_external: bool) -> list[tuple[str, Path]]:
    """``(path inside the bundle, file on disk)`` for every file that goes into the zip, sorted.

    The bundle folder without ``runs/`` and caches (with ``weights_external``, without the weight files of
    ``models/``), and ``custom/`` (this package, without caches) at the bundle's root.
    """
    entries: dict[str, Path] = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(bundle_dir)
        if relative.parts[0] in _SKIP_DIRS or relative.parts[0] == "custom" or _skipped(relative):
            continue
        if weights_external and relative.parts[0] == "models" and path.suffix in _WEIGHT_SUFFIXES:
            continue
        entries[relative.as_posix()] = path
    package = _package_dir()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        relative = path.relative_to(package)
        if not _skipped(relative):
            entries[f"custom/{relative.as_posix()}"] = path
    return sorted(entries.items())


def _large_files_yaml(weights: list[tuple[str, Path]], url: str) -> str:
    """``large_files.yml`` in the layout of MONAI's ``download_large_files`` (path, url, hash_val, hash_type).

    ``url`` may hold ``{path}`` and ``{name}`` (the file's bundle path and file name) for several files.
    """
    lines = [
        "# Weights kept outside the bundle zip; fetch them with",
        "#   python -m monai.bundle download_large_files --bundle_path <this bundle folder>",
        "large_files:",
    ]
    for relative, path in weights:
        file_url = url.format(path=relative, name=Path(relative).name)
        lines += [
            f'  - path: "{relative}"',
            f'    url: "{file_url}"',
            f'    hash_val: "{sha256_of(path)}"',
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


def _zip_bytes(name: str, files: list[tuple[str, bytes]]) -> bytes:
    """A zip of ``files`` under ``name/`` with fixed timestamps, permissions and compression (deterministic)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for relative, payload in sorted(files):
            info = zipfile.ZipInfo(f"{name}/{relative}", date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, whatever machine packs it
            info.external_attr = (0o100644 & 0xFFFF) << 16  # regular file, rw-r--r--
            archive.writestr(info, payload, compresslevel=9)
    return buffer.getvalue()


def read_model_info(path: str | Path) -> dict[str, Any]:
    """The release record (``{}`` when the file does not exist); a local path or a URL."""
    text: str | None
    if "://" in str(path):
        try:
            with urllib.request.urlopen(str(path)) as response:  # noqa: S310 (user-given URL)
                text = response.read().decode("utf-8")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err}") from err
    else:
        path = Path(path)
        if not path.is_file():
            return {}
        text = path.read_text(encoding="utf-8")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object of releases")
    return info


def package_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path = "dist",
    weights_url: str | None = None,
    allow_missing_weights: bool = False,
) -> PackageResult:
    """Write ``<out_dir>/<name>_v<version>.zip`` and record it in ``<out_dir>/model_info.json``.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json`` inside; its ``name`` must be the folder name).
        out_dir: where the zip and ``model_info.json`` go (created if missing).
        weights_url: keep the weight files of ``models/`` out of the zip and list them in ``large_files.yml``
            with this URL (``{name}``/``{path}`` are filled in) and their sha256, for weights published on a
            GitHub release or the Hugging Face Hub. Default: the weights go into the zip.
        allow_missing_weights: package a bundle that has no ``models/model.pt`` (otherwise refused, since its
            inference config could not run).

    Raises:
        InputError: no such bundle, metadata against the specification (e.g. no changelog entry for the
            version), metadata ``name`` differs from the folder, missing weights, or the version is already
            recorded in ``model_info.json`` with different content.
    """
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "configs").is_dir():
        raise InputError(f"{bundle_dir}: not a bundle folder (no configs/ inside)")
    metadata = validate_metadata(bundle_dir)
    name, version = str(metadata["name"]), str(metadata["version"])
    if name != bundle_dir.resolve().name:
        raise InputError(
            f"{bundle_dir}: metadata name {name!r} differs from the folder name {bundle_dir.resolve().name!r}"
        )

    weights_file = bundle_dir / "models" / "model.pt"
    if not weights_file.is_file() and not allow_missing_weights:
        raise InputError(
            f"{bundle_dir}: no trained weights at {weights_file}. Train them (`make weights`, or the bundle's "
            "training command) or pass --allow_missing_weights to package the configs only."
        )
    entries = bundle_entries(bundle_dir, weights_external=weights_url is not None)
    files = [(relative, path.read_bytes()) for relative, path in entries]
    weights_mode = "embedded" if weights_file.is_file() else "none"
    if weights_url is not None and weights_file.is_file():
        models = bundle_dir / "models"
        weights = sorted(
            (p.relative_to(bundle_dir).as_posix(), p)
            for p in models.rglob("*")
            if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
        )
        files.append(("large_files.yml", _large_files_yaml(weights, weights_url).encode()))
        weights_mode = "external"
    payload = _zip_bytes(name, files)
    digest = hashlib.sha256(payload).hexdigest()

    out_dir = Path(out_dir)
    info_path = out_dir / MODEL_INFO
    info = read_model_info(info_path)
    key = f"{name}_v{version}"
    released = info.get(key)
    if isinstance(released, dict) and released.get("sha256") not in (None, digest):
        raise InputError(
            f"{name} version {version} is already released ({info_path}: sha256 {released['sha256'][:12]}...) with "
            f"different content (now {digest[:12]}...). Bump `version` in {bundle_dir}/configs/metadata.json "
            "and add a changelog entry for it."
        )
    zip_path = out_dir / zip_name(name, version)
    with atomic_path(zip_path) as tmp:
        tmp.write_bytes(payload)
    info[key] = {
        "name": name,
        "version": version,
        "file": zip_path.name,
        "sha256": digest,
        "size": len(payload),
        "weights": weights_mode,
        "changelog": metadata["changelog"][version],
    }
    atomic_write_text(json.dumps(dict(sorted(info.items())), indent=2) + "\n", info_path)
    return PackageResult(zip_path, digest, name, version, weights_mode, tuple(f"{name}/{r}" for r, _ in files))


def _metadata_in_zip(zip_path: Path) -> dict[str, Any]:
    """``<name>/configs/metadata.json`` of a bundle zip (read as data; nothing is extracted or run)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [n for n in archive.namelist() if n.count("/") == 2 and n.endswith("/configs/metadata.json")]
            if len(members) != 1:
                raise InputError(f"{zip_path}: not a bundle zip (expected one <name>/configs/metadata.json inside)")
            return json.loads(archive.read(members[0]))
    except zipfile.BadZipFile as err:
        raise InputError(f"{zip_path}: not a valid zip file ({err})") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{zip_path}: its metadata.json is not valid JSON ({err})") from err


def _release_entry(info: dict[str, Any], name: str, version: str | None, source: str) -> dict[str, Any]:
    candidates = [e for e in info.values() if isinstance(e, dict) and e.get("name") == name]
    if version is not None:
        candidates = [e for e in candidates if e.get("version") == version]
    if not candidates:
        wanted = f"{name} version {version}" if version else name
        raise InputError(f"{source} lists no release of {wanted}; cannot verify the download")
    if len(candidates) > 1:
        versions = sorted(str(e.get("version")) for e in candidates)
        raise InputError(f"{source} lists several versions of {name} ({', '.join(versions)}); give --version")
    return candidates[0]


def verify_bundle_zip(
    zip_path: str | Path, model_info: str | Path, name: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Check a downloaded bundle zip against a ``model_info.json`` (path or URL); return its release entry.

    ``name``/``version`` default to those in the zip's own metadata. Raises :class:`InputError` when the
    sha256 differs ("do not run its configs") or the release is not listed.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise InputError(f"{zip_path}: no such file")
    info = read_model_info(model_info)
    if not info:
        raise InputError(f"{model_info}: no releases recorded (missing or empty file)")
    if name is None or version is None:
        metadata = _metadata_in_zip(zip_path)
        name = name or str(metadata.get("name"))
        version = version or str(metadata.get("version"))
    entry = _release_entry(info, name, version, str(model_info))
    actual = sha256_of(zip_path)
    if actual != entry.get("sha256"):
        raise InputError(
            f"{zip_path}: sha256 {actual} does not match {entry.get('sha256')} recorded for {name} "
            f"{entry.get('version')} in {model_info}. The file is corrupt or not the released bundle; do not "
            "run its configs (they execute code)."
        )
    return entry


def fetch_bundle(
    name: str, url: str, bundle_dir: str | Path, model_info: str | Path, version: str | None = None
) -> Path:
    """Download ``url``, verify its sha256 against ``model_info``, then install it with MONAI's ``download``.

    Nothing is extracted before the check passes. Returns the bundle folder ``<bundle_dir>/<name>``.
    """
    from monai.bundle import download

    bundle_dir = Path(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="seqinv-fetch-") as tmp:
        local = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url) as response, open(local, "wb") as handle:  # noqa: S310
                shutil.copyfileobj(response, handle)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot download {url}: {err}") from err
        entry = verify_bundle_zip(local, model_info, name=name, version=version)
        print(f"{url}: sha256 matches {name} {entry['version']} in {model_info}")
        download(name=name, url=local.as_uri(), bundle_dir=str(bundle_dir), progress=False)
    return bundle_dir / name

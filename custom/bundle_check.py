"""Offline checks of a bundle's ``configs/metadata.json`` against MONAI's bundle specification.

MONAI's own ``verify_metadata`` downloads the schema named in the file (``meta_schema_20240725.json``, a release
asset of MONAI-extra-test-data); this project runs without network, so the specification is kept as a JSON schema
in the package (``custom/schemas/bundle_metadata.schema.json``) and checked with ``jsonschema``. That schema is
stricter than the official one: it requires everything the official schema requires and adds the specification's
rules the official schema leaves open (see its ``description``); the tests validate every bundle against a copy
of the official schema too (``tests/data/meta_schema_20240725.json``, with its source). One rule a JSON schema
cannot state is checked in code: the ``version`` must have a ``changelog`` entry (a release without one is refused
by :mod:`custom.packaging`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from custom.errors import InputError

__all__ = ["SCHEMA_NAME", "load_schema", "metadata_problems", "validate_metadata"]

#: File name of the schema inside ``custom/schemas``.
SCHEMA_NAME = "bundle_metadata.schema.json"


def load_schema() -> dict[str, Any]:
    """The bundle metadata JSON schema shipped with the package."""
    return json.loads(resources.files("custom").joinpath("schemas", SCHEMA_NAME).read_text(encoding="utf-8"))


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: metadata file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def metadata_problems(metadata: dict[str, Any]) -> list[str]:
    """Every violation of the schema and of the version/changelog rule, as readable ``where: what`` lines."""
    import jsonschema  # imported here: only the checks need it

    validator = jsonschema.Draft202012Validator(load_schema())
    problems: list[str] = []
    for error in sorted(validator.iter_errors(metadata), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        line = f"{where}: {error.message}"
        if line not in problems:  # a rule reached through two schema paths reports once
            problems.append(line)
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if isinstance(version, str) and isinstance(changelog, dict) and version not in changelog:
        problems.append(f"changelog: no entry for version {version!r} (add one when you bump the version)")
    return problems


def validate_metadata(path: str | Path) -> dict[str, Any]:
    """Read and check ``path`` (a ``metadata.json`` or a bundle folder); return the metadata.

    Raises:
        InputError: the file is missing, not JSON, or breaks the specification; the message names the file
            and lists every problem.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "configs" / "metadata.json"
    metadata = _read_metadata(path)
    problems = metadata_problems(metadata)
    if problems:
        listing = "\n  ".join(problems)
        raise InputError(f"{path}: metadata does not follow the MONAI bundle specification:\n  {listing}")
    return metadata

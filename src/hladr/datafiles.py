"""Data files found by name: the folders searched and the one file a name picks.

Lot files (:mod:`hladr.calibration`) and reagent files (:mod:`hladr.reagent`) are JSON files a
lab can give by path or by name. A name is looked up in, in order: an explicit folder, the
folders of an environment variable (``os.pathsep`` separated), then the files shipped inside
the package.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import HladrError


def search_dirs(env_var: str, package_folder: str, extra: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched by name: ``extra``, then ``$env_var``, then ``hladr/<package_folder>``."""
    dirs = [Path(extra)] if extra else []
    dirs += [Path(d) for d in os.environ.get(env_var, "").split(os.pathsep) if d]
    dirs.append(Path(str(resources.files("hladr") / package_folder)))
    return dirs


def json_files(dirs: list[Path]) -> list[Path]:
    """The ``*.json`` files of ``dirs``, folder by folder, sorted within a folder."""
    files: list[Path] = []
    for folder in dirs:
        if folder.is_dir():
            files += sorted(folder.glob("*.json"))
    return files


def find_named(name: str, files: list[Path]) -> list[Path]:
    """Files a name picks: the file name or stem, else stems ending in ``-name`` (a lot number).

    The first folder's match wins, so a lab's own file shadows a shipped file of the same name.
    """
    for match in (lambda p: name in (p.name, p.stem), lambda p: p.stem.endswith("-" + name)):
        found = [p for p in files if match(p)]
        if found:
            first = found[0].parent
            return [p for p in found if p.parent == first]
    return []


def read_json_object(path: Path, error: type[HladrError], what: str) -> dict[str, Any]:
    """The one JSON object of a ``what`` file, or ``error`` naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {what} file: {exc}", path) from None
    if not isinstance(data, dict):
        raise error(f"a {what} file holds one JSON object", path)
    return data

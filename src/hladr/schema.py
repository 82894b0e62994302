"""The published JSON Schemas of hladr's outputs, shipped inside the package.

``hladr.result/2`` (:func:`result_schema`) is the contract of :class:`hladr.Result`
(``hladr.result/1``, its predecessor, stays published: ``hladr.result.upgrade`` maps it);
``hladr.decision/1`` that of :class:`hladr.Decision`. ``validate`` needs the
``jsonschema`` package (in the ``test`` and ``service`` extras).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .errors import HladrError

SCHEMAS = {
    "hladr.result/1": "result-1.json",
    "hladr.result/2": "result-2.json",
    "hladr.decision/1": "decision-1.json",
}


class SchemaError(HladrError):
    """A document does not follow its published schema."""


@cache
def load(name: str) -> dict[str, Any]:
    """The JSON Schema called ``name`` (e.g. ``"hladr.result/1"``)."""
    try:
        filename = SCHEMAS[name]
    except KeyError:
        raise SchemaError(f"unknown schema {name!r}; known: {', '.join(SCHEMAS)}") from None
    return json.loads(resources.files("hladr").joinpath("schemas", filename).read_text(encoding="utf-8"))


def result_schema() -> dict[str, Any]:
    from .result import SCHEMA

    return load(SCHEMA)


def decision_schema() -> dict[str, Any]:
    return load("hladr.decision/1")


def validate(document: dict[str, Any], name: str | None = None) -> None:
    """Raise :class:`SchemaError` unless ``document`` follows its schema (named by its ``schema`` key)."""
    import jsonschema

    name = name or document.get("schema")
    if not isinstance(name, str):
        raise SchemaError("document has no 'schema' key")
    errors = sorted(jsonschema.Draft202012Validator(load(name)).iter_errors(document), key=str)
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise SchemaError(f"{name}: {where}: {errors[0].message} ({len(errors)} error(s))")

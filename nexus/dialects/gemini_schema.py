"""JSON Schema reduced to the subset Gemini's ``Schema`` object accepts (function parameters and
``responseSchema``). Google rejects unknown keywords, so anything outside the discovery
document's ``Schema`` fields is removed or rewritten; pure, no I/O."""

from __future__ import annotations

from typing import Any

import orjson

JSONDict = dict[str, Any]

__all__ = ["Untranslatable", "gemini_schema"]


class Untranslatable(ValueError):
    """The request has no faithful Gemini form; the message says why."""


# The fields of the discovery document's `Schema` object that carry meaning; anything else
# (`$schema`, `additionalProperties`, `default`, `examples`, `exclusiveMinimum`...) is removed.
_SCHEMA_KEEP = frozenset(
    {
        "format", "title", "description", "nullable", "enum", "items", "maxItems", "minItems",
        "properties", "required", "minProperties", "maxProperties", "minimum", "maximum",
        "minLength", "maxLength", "pattern", "anyOf", "propertyOrdering",
    }
)  # fmt: skip
_INT64_FIELDS = frozenset(
    {"maxItems", "minItems", "minProperties", "maxProperties", "minLength", "maxLength"}
)
_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})


def gemini_schema(schema: JSONDict) -> JSONDict:
    """``schema`` reduced to the subset Gemini accepts; raises ``Untranslatable`` when a ``$ref``
    cannot be inlined (remote or recursive)."""
    defs: JSONDict = {}
    for key in ("$defs", "definitions"):
        found = schema.get(key)
        if isinstance(found, dict):
            defs.update({f"#/{key}/{name}": value for name, value in found.items()})
    return _reduce(schema, defs, ())


def _reduce(node: Any, defs: JSONDict, seen: tuple[str, ...]) -> JSONDict:
    if not isinstance(node, dict):
        return {}  # `true`/`false` schemas: Gemini has no form for them; accept anything
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref not in defs:
            raise Untranslatable(f"JSON Schema $ref {ref!r} cannot be resolved locally")
        if ref in seen:
            raise Untranslatable(f"JSON Schema $ref {ref!r} is recursive")
        merged = {**defs[ref], **{k: v for k, v in node.items() if k != "$ref"}}
        return _reduce(merged, defs, (*seen, ref))
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        return _reduce(_merge_all_of(node, all_of), defs, seen)
    out: JSONDict = {key: value for key, value in node.items() if key in _SCHEMA_KEEP}
    if "const" in node:
        out["enum"] = [node["const"]]
    string_enum = _reduce_enum(out)
    kinds = _types(node) or (["string"] if string_enum else [])
    for key in _INT64_FIELDS & out.keys():
        out[key] = str(out[key])  # discovery: int64 travels as a string
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _reduce(v, defs, seen) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _reduce(out["items"], defs, seen)
    variants = node.get("anyOf", node.get("oneOf"))
    if isinstance(variants, list):
        out["anyOf"] = [_reduce(v, defs, seen) for v in variants]
    _set_type(out, kinds)
    return out


def _reduce_enum(out: JSONDict) -> bool:
    """Gemini enums hold strings only; other values stay as words in the description (a
    string enum would change the arguments' type). True when a string enum remains."""
    if "enum" not in out:
        return False
    values = out.pop("enum")
    if None in values:
        values = [v for v in values if v is not None]
        out["nullable"] = True
    if all(isinstance(v, str) for v in values):
        out["enum"] = values
        return True
    note = "Allowed values: " + ", ".join(orjson.dumps(v).decode() for v in values) + "."
    out["description"] = f"{out['description']} {note}" if "description" in out else note
    return False


def _set_type(out: JSONDict, kinds: list[str]) -> None:
    if "null" in kinds and len(kinds) > 1:
        out["nullable"] = True
        kinds = [k for k in kinds if k != "null"]
    if not kinds and "properties" in out:
        kinds = ["object"]
    elif not kinds and "items" in out:
        kinds = ["array"]
    if len(kinds) == 1:
        out["type"] = kinds[0].upper()
    elif len(kinds) > 1:  # ["string", "integer"] -> anyOf of single types
        out["anyOf"] = [{"type": k.upper()} for k in kinds]


def _types(node: JSONDict) -> list[str]:
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    return [k for k in kinds if k in _TYPES]


def _merge_all_of(node: JSONDict, parts: list[Any]) -> JSONDict:
    """``allOf`` of object schemas merged into one (the common pydantic/zod output)."""
    merged: JSONDict = {k: v for k, v in node.items() if k != "allOf"}
    for part in parts:
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            elif key not in merged:
                merged[key] = value
            elif merged[key] != value:
                raise Untranslatable(f"allOf parts disagree on {key!r}")
    return merged

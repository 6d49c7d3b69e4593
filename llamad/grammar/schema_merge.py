"""Combining canonical schemas (llamad.grammar.schema): `union` for anyOf, `intersect` for
allOf and for keywords beside an anyOf or a $ref. Where the grammar cannot say both at
once, the result is a superset and the keyword is loosened.
"""

from __future__ import annotations

import json
import re
from typing import Any

ANY: dict = {}  # any JSON value
MAX_MERGE_DEPTH = 24  # intersecting recursive definitions stops unfolding here (loosened)
MAX_ALTERNATIVES = 64  # anyOf inside allOf multiplies alternatives; past this, loosened


class _Never:
    """A subschema no value satisfies (`false`, an empty enum, conflicting types)."""

    def __repr__(self) -> str:
        return "NEVER"


NEVER: Any = _Never()


def type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def has_type(value: Any, kind: str) -> bool:
    actual = type_of(value)
    return actual == kind or (kind == "number" and actual == "integer")


FORMAT_SHAPES = {  # the shapes SchemaConverter writes for these formats
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{3})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
FORMAT_SHAPES["date-time"] = FORMAT_SHAPES["date"] + "T" + FORMAT_SHAPES["time"]


def _string_admits(schema: dict, value: str) -> bool:
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if "format" in schema and not re.fullmatch(FORMAT_SHAPES[schema["format"]], value):
        return False
    try:
        return "pattern" not in schema or re.search(schema["pattern"], value) is not None
    except re.error:
        return True


def key_of(value: Any) -> str:
    """A value as JSON, for comparing (0 == False for Python, not for JSON)."""
    return json.dumps(value, sort_keys=True)


class Combiner:
    """What a normaliser needs to combine schemas: its finished `defs` (name -> canonical),
    the names still `in_progress`, and `loosen(path, keyword)`."""

    defs: dict[str, Any]
    in_progress: set[str]
    merging: int = 0

    def loosen(self, path: tuple, keyword: str) -> None:
        raise NotImplementedError

    def inline(self, schema: Any) -> Any:
        """A finished definition instead of a reference to it, for intersecting."""
        while isinstance(schema, dict) and "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name in self.in_progress:
                return schema
            schema = self.defs[name]
        return schema

    # -- combining ------------------------------------------------------------------------
    def union(self, alternatives: list) -> Any:
        flat: dict[str, Any] = {}
        for alternative in alternatives:
            if alternative is NEVER:
                continue
            if alternative == ANY:
                return ANY
            for one in alternative["anyOf"] if set(alternative) == {"anyOf"} else [alternative]:
                flat.setdefault(key_of(one), one)
        if not flat:
            return NEVER
        if len(flat) == 1:
            return next(iter(flat.values()))
        return {"anyOf": list(flat.values())}

    def intersect(self, a: Any, b: Any, path: tuple) -> Any:
        """Both at once; where the grammar cannot say that, a superset (loosened at `path`)."""
        if self.merging > MAX_MERGE_DEPTH:  # two recursive definitions unfold without end
            self.loosen(path, "allOf")
            return a
        self.merging += 1
        try:
            return self._intersect(a, b, path)
        finally:
            self.merging -= 1

    def _intersect(self, a: Any, b: Any, path: tuple) -> Any:
        if a is NEVER or b is NEVER:
            return NEVER
        if a == ANY or key_of(a) == key_of(b):  # _key: 0 == False for Python, not for JSON
            return b
        if b == ANY:
            return a
        a, b = self.inline(a), self.inline(b)
        if a is NEVER or b is NEVER:
            return NEVER
        if a == ANY or b == ANY or key_of(a) == key_of(b):
            return b if a == ANY else a
        if "$ref" in a or "$ref" in b:  # a recursive definition still being built
            self.loosen(path, "allOf")
            return a
        for one, other in ((a, b), (b, a)):
            if "anyOf" in one:
                parts = [self.intersect(x, other, path) for x in one["anyOf"]]
                result = self.union(parts)
                if result is not NEVER and "anyOf" in result and len(result["anyOf"]) > MAX_ALTERNATIVES:
                    self.loosen(path, "allOf")
                    return one
                return result
        for one, other in ((a, b), (b, a)):
            if "const" in one or "enum" in one:
                values = [one["const"]] if "const" in one else one["enum"]
                kept = [v for v in values if self.admits(other, v)]
                if not kept:
                    return NEVER
                return {"const": kept[0]} if len(kept) == 1 else {"enum": kept}
        kinds = {a["type"], b["type"]}
        if kinds <= {"integer", "number"}:
            kind = "integer" if "integer" in kinds else "number"
            lows = [s["minimum"] for s in (a, b) if "minimum" in s]
            return {"type": kind, "minimum": max(lows)} if lows else {"type": kind}
        if len(kinds) > 1:
            return NEVER
        kind = a["type"]
        if kind == "string":
            return self.intersect_strings(a, b, path)
        if kind == "object":
            return self.intersect_objects(a, b, path)
        if kind == "array":
            return self.intersect_arrays(a, b, path)
        return a

    def admits(self, schema: Any, value: Any) -> bool:
        """Whether `value` is valid against the canonical `schema`, read as JSON Schema (an
        absent additionalProperties allows extra members). A definition still being built
        admits everything: the caller keeps the value, a superset."""
        schema = self.inline(schema)
        if schema is NEVER or schema is False:
            return False
        if schema is True or schema == ANY or "$ref" in schema:
            return True
        if "anyOf" in schema:
            return any(self.admits(s, value) for s in schema["anyOf"])
        if "const" in schema:
            return key_of(schema["const"]) == key_of(value)
        if "enum" in schema:
            return key_of(value) in {key_of(v) for v in schema["enum"]}
        kind = schema["type"]
        if not has_type(value, kind):
            return False
        if kind in ("integer", "number"):
            return value >= schema.get("minimum", value)
        if kind == "string":
            return _string_admits(schema, value)
        if kind == "array":
            if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
                return False
            if "prefixItems" in schema:
                return all(self.admits(s, v) for s, v in zip(schema["prefixItems"], value))
            return all(self.admits(schema["items"], v) for v in value)
        if kind == "object":
            properties = schema.get("properties", {})
            extra = schema.get("additionalProperties", True)
            if any(name not in value for name in schema.get("required", [])):
                return False
            return all(self.admits(properties.get(k, extra), v) for k, v in value.items())
        return True

    def intersect_strings(self, a: dict, b: dict, path: tuple) -> Any:
        out = {"type": "string"}
        for keyword in ("pattern", "format"):
            mine, theirs = a.get(keyword), b.get(keyword)
            if mine is not None and theirs is not None and mine != theirs:
                self.loosen(path, keyword)  # two patterns at once are more than one rule can say
            if mine is not None or theirs is not None:
                out[keyword] = mine if mine is not None else theirs
        if "pattern" in out and "format" in out:
            self.loosen(path, "format")
            del out["format"]
        low = max(a.get("minLength", 0), b.get("minLength", 0))
        highs = [s["maxLength"] for s in (a, b) if "maxLength" in s]
        high = min(highs) if highs else None
        if high is not None and low > high:
            return NEVER
        if "pattern" in out or "format" in out:
            if low or high is not None:
                self.loosen(path, "minLength" if low else "maxLength")
            return out
        if low:
            out["minLength"] = low
        if high is not None:
            out["maxLength"] = high
        return out

    def intersect_objects(self, a: dict, b: dict, path: tuple) -> Any:
        a_props, b_props = a.get("properties", {}), b.get("properties", {})
        a_extra, b_extra = _extra(a), _extra(b)
        properties: dict[str, Any] = {}
        for name in [*a_props, *(n for n in b_props if n not in a_props)]:
            mine = a_props.get(name, a_extra)
            theirs = b_props.get(name, b_extra)
            if name not in a_props and a_extra is False or name not in b_props and b_extra is False:
                # additionalProperties: false of one side applies to the other side's
                # properties too; kept as declared (the union of both sides' properties).
                self.loosen(path, "additionalProperties")
                mine = a_props.get(name, ANY)
                theirs = b_props.get(name, ANY)
            value = self.intersect(_side(mine), _side(theirs), path)
            if value is NEVER:
                if name in a.get("required", []) or name in b.get("required", []):
                    return NEVER
                value = False
            properties[name] = value
        required = list(dict.fromkeys([*a.get("required", []), *b.get("required", [])]))
        for name in required:
            if name not in properties:
                return NEVER
        if a_extra is False or b_extra is False:
            extra: Any = False
        elif isinstance(a_extra, dict) and isinstance(b_extra, dict):
            extra = self.intersect(a_extra, b_extra, path)
            extra = False if extra is NEVER else extra
        elif isinstance(a_extra, dict) or isinstance(b_extra, dict):
            extra = a_extra if isinstance(a_extra, dict) else b_extra
        elif a_extra is True or b_extra is True:
            extra = True if (a_extra is True and b_extra is True) or not (a_props or b_props) else None
        else:
            extra = None
        return object_schema(properties, required, extra)

    def intersect_arrays(self, a: dict, b: dict, path: tuple) -> Any:
        low = max(a.get("minItems", 0), b.get("minItems", 0))
        highs = [s["maxItems"] for s in (a, b) if "maxItems" in s]
        high = min(highs) if highs else None
        if high is not None and low > high:
            return NEVER
        tuples = [s for s in (a, b) if "prefixItems" in s]
        if tuples:
            length = len(tuples[0]["prefixItems"])
            if any(len(t["prefixItems"]) != length for t in tuples) or low > length or (high is not None and high < length):
                return NEVER
            positions = []
            for i in range(length):
                here = [s["prefixItems"][i] if "prefixItems" in s else s.get("items", ANY) for s in (a, b)]
                value = self.intersect(here[0], here[1], path)
                if value is NEVER:
                    return NEVER
                positions.append(value)
            return tuple_schema(positions)
        items = self.intersect(a.get("items", ANY), b.get("items", ANY), path)
        if items is NEVER:
            if low > 0:
                return NEVER
            items, high = ANY, 0
        out: dict[str, Any] = {"type": "array", "items": items}
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out


def _side(value: Any) -> Any:
    """A property's schema from one side of an intersection (None, True: anything)."""
    if value is None or value is True:
        return ANY
    return NEVER if value is False else value


def _extra(schema: dict) -> Any:
    """additionalProperties of a canonical object: None (absent), True, False or a schema."""
    if "properties" not in schema and "additionalProperties" not in schema:
        return True  # {"type": "object"}: any members
    return schema.get("additionalProperties")


def object_schema(properties: dict, required: list, extra: Any) -> dict:
    if not properties and not required and extra in (None, True):
        return {"type": "object"}
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if extra is not None:
        out["additionalProperties"] = extra
    return out


def tuple_schema(positions: list) -> dict:
    if not positions:
        return {"type": "array", "items": ANY, "maxItems": 0}
    return {"type": "array", "prefixItems": positions, "minItems": len(positions), "maxItems": len(positions)}

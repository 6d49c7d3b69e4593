"""Any valid JSON Schema -> the schema the grammar enforces (see llamad.tools.grammar for the
table of what is enforced and what is loosened).

`normalise(schema)` is a pure function. It returns a schema written only in the small
canonical subset that llama-cpp-python's `SchemaConverter` turns into a correct grammar,
and the paths of the keywords it had to loosen. The canonical schema is never wider than
the client's except at the loosened keywords, and narrower only where the table says so
(no invented properties, tuples at full length...): the arguments the grammar allows
validate against it, so each keyword not listed as loosened holds.

Canonical nodes: `{}` (any JSON value); `{"type": T}` for one primitive type, with
`minLength`/`maxLength`, an enforceable `pattern` or a known `format` on strings, and
`minimum` 0 or 1 on numbers; objects with `properties` (a property that may not occur is
`false`), `required` and `additionalProperties`; arrays with `items` and
`minItems`/`maxItems`, or exact tuples (`prefixItems`, `minItems` = `maxItems`);
`{"anyOf": [...]}`; `{"const": v}`; `{"enum": [...]}`; `{"$ref": "#/$defs/<name>"}`, with
the definitions in the root's `$defs`.

A schema that is not valid JSON Schema (a keyword of the wrong type, an unknown type name,
a local `$ref` that points nowhere) raises MalformedSchema with the path of the keyword.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from llamad.grammar.pattern import pattern_gbnf
from llamad.grammar.schema_merge import (
    ANY,
    NEVER,
    Combiner,
    key_of,
    object_schema,
    tuple_schema,
)
from llamad.grammar.schema_refs import MISSING, find, resolve, unescape

TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
MAX_DEPTH = 40  # nesting past this is any value: deeper schemas are not worth the grammar
MAX_COUNT = 1000  # larger minLength/maxLength/minItems/maxItems are loosened (llama.cpp caps repetitions)
ENFORCED_FORMATS = {"date", "time", "date-time", "uuid"}  # what SchemaConverter writes rules for

FAMILIES = {
    "object": {"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "dependentRequired", "dependentSchemas", "dependencies",
               "unevaluatedProperties"},
    "array": {"items", "prefixItems", "additionalItems", "contains", "minContains", "maxContains",
              "minItems", "maxItems", "uniqueItems", "unevaluatedItems"},
    "string": {"minLength", "maxLength", "pattern", "format", "contentEncoding", "contentMediaType"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}  # fmt: skip
# Keywords the grammar never enforces, whatever the type (applicator or not).
ALWAYS_LOOSENED = ("not", "if", "then", "else", "$dynamicRef", "$recursiveRef")
LOOSENED_BY_TYPE = {
    "object": ("patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
               "dependentSchemas", "dependencies", "unevaluatedProperties"),
    "array": ("contains", "uniqueItems", "unevaluatedItems"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}  # fmt: skip
COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
          "minContains", "maxContains")  # fmt: skip
SUBSCHEMA = ("additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
             "propertyNames", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
OLD_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")


class MalformedSchema(ValueError):
    """Not valid JSON Schema; `path` names the keyword (e.g. `properties.a.type`)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason




@dataclass
class Normalised:
    schema: dict  # the canonical schema the grammar is built from
    loosened: list[str] = field(default_factory=list)  # "properties.a.minimum", ...


def normalise(schema: Any, *, object_only: bool = False) -> Normalised:
    """The canonical form of `schema`. `object_only`: tool arguments, always a JSON object."""
    return _Normaliser(schema).run(object_only)


def _path(path: tuple, key: str | None = None) -> str:
    parts = [*path, key] if key is not None else list(path)
    return ".".join(str(p) for p in parts)


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and float(value).is_integer()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Normaliser(Combiner):
    def __init__(self, root: Any):
        self.root = root
        self.defs: dict[str, Any] = {}  # output $defs: name -> canonical (or NEVER)
        self.def_by_pointer: dict[str, str] = {}
        self.in_progress: set[str] = set()
        self.loosened: list[str] = []
        self.merging = 0  # nesting of intersect() calls
        self.quiet = 0  # >0 while checking subschemas whose keywords are dropped anyway
        draft = root.get("$schema", "") if isinstance(root, dict) else ""
        self.old_draft = isinstance(draft, str) and any(d in draft for d in OLD_DRAFTS)

    def loosen(self, path: tuple, keyword: str) -> None:
        if not self.quiet:
            entry = _path(path, keyword)
            if entry not in self.loosened:
                self.loosened.append(entry)

    def run(self, object_only: bool) -> Normalised:
        result = self.node(self.root, (), 0)
        for key in ("$defs", "definitions"):  # malformed definitions are errors even if unused
            if isinstance(self.root, dict) and isinstance(self.root.get(key), dict):
                self.quiet += 1
                for name, sub in self.root[key].items():
                    self.node(sub, (key, name), 1)
                self.quiet -= 1
        if object_only:
            narrowed = self.intersect(result, {"type": "object"}, ())
            if narrowed is NEVER:
                self.loosen((), "type")  # arguments are an object whatever the schema says
                narrowed = {"type": "object"}
            result = narrowed
        elif result is NEVER:
            self.loosen((), "false")  # nothing is valid: any value is the nearest grammar
            result = ANY
        if '"$ref"' in json.dumps(result):
            defs = {name: (ANY if d is NEVER else d) for name, d in self.defs.items()}
            for name in _endless(defs):
                self.loosen(("$defs",), name)  # only infinite values match: any value instead
                defs[name] = ANY
            result = {**result, "$defs": defs}
        return Normalised(result, self.loosened)

    # -- one node -------------------------------------------------------------------------
    def node(self, schema: Any, path: tuple, depth: int) -> Any:
        if schema is True:
            return ANY
        if schema is False:
            return NEVER
        if not isinstance(schema, dict):
            raise MalformedSchema(_path(path), f"a schema must be a JSON object or a boolean, got {type(schema).__name__}")
        self.check(schema, path)
        if depth > MAX_DEPTH:
            self.loosen(path, "(nesting)")
            return ANY
        for keyword in ALWAYS_LOOSENED:
            if keyword in schema:
                self.loosen(path, keyword)
                if isinstance(schema[keyword], (dict, bool)):
                    self.quiet += 1
                    self.node(schema[keyword], (*path, keyword), depth + 1)
                    self.quiet -= 1
        if "$ref" in schema:
            target = self.ref(schema["$ref"], path)
            if self.old_draft:
                return target  # before 2019-09, keywords beside $ref are ignored
            rest = self.node(_without(schema, "$ref"), path, depth)
            return self.intersect(target, rest, path)
        if "allOf" in schema:
            result = self.node(_without(schema, "allOf"), path, depth)
            for i, sub in enumerate(schema["allOf"]):
                result = self.intersect(result, self.node(sub, (*path, f"allOf[{i}]"), depth + 1), path)
            return result
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                if keyword == "oneOf" and len(schema[keyword]) > 1:
                    self.loosen(path, "oneOf")  # any one may match; "exactly one" is not checked
                alternatives = [self.node(s, (*path, f"{keyword}[{i}]"), depth + 1) for i, s in enumerate(schema[keyword])]
                base = self.node(_without(schema, keyword), path, depth)
                return self.intersect(base, self.union(alternatives), path)
        if "const" in schema or "enum" in schema:
            return self.values(schema, path, depth)
        declared = schema.get("type")
        if declared is None:
            families = [f for f, words in FAMILIES.items() if words & schema.keys()]
            if not families:
                return ANY
            # Keywords of one kind only: the value is of that kind (narrower than the schema,
            # which lets other types through, and what its author meant).
            kinds = [families[0]] if len(families) == 1 else [t for t in TYPES if t != "integer"]
        else:
            kinds = [declared] if isinstance(declared, str) else list(dict.fromkeys(declared))
            if "number" in kinds and "integer" in kinds:
                kinds.remove("integer")
        return self.union([self.typed(kind, schema, path, depth) for kind in kinds])

    def check(self, schema: dict, path: tuple) -> None:
        """Raises MalformedSchema for a keyword whose value has the wrong type."""

        def bad(keyword: str, reason: str) -> MalformedSchema:
            return MalformedSchema(_path(path, keyword), reason)

        if "type" in schema:
            declared = schema["type"]
            names = declared if isinstance(declared, list) else [declared]
            for name in names:
                if not isinstance(name, str) or name not in TYPES:
                    raise bad("type", f"unknown type {name!r}; use one of {', '.join(TYPES)}")
        for keyword in SCHEMA_MAPS:
            if keyword in schema and not isinstance(schema[keyword], dict):
                raise bad(keyword, "must be an object")
        for keyword in ("allOf", "anyOf", "oneOf"):
            if keyword in schema and not (isinstance(schema[keyword], list) and schema[keyword]):
                raise bad(keyword, "must be a non-empty array of schemas")
        if "prefixItems" in schema and not isinstance(schema["prefixItems"], list):
            raise bad("prefixItems", "must be an array of schemas")
        if "items" in schema and not isinstance(schema["items"], (dict, bool, list)):
            raise bad("items", "must be a schema")
        for keyword in SUBSCHEMA:
            if keyword in schema and not isinstance(schema[keyword], (dict, bool)):
                raise bad(keyword, "must be a schema (an object or a boolean)")
        if "required" in schema and not (
            isinstance(schema["required"], list) and all(isinstance(r, str) for r in schema["required"])
        ):
            raise bad("required", "must be an array of property names")
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise bad("enum", "must be an array")
        for keyword in COUNTS:
            if keyword in schema and not _is_count(schema[keyword]):
                raise bad(keyword, "must be a non-negative integer")
        for keyword in ("minimum", "maximum", "multipleOf"):
            if keyword in schema and not _is_number(schema[keyword]):
                raise bad(keyword, "must be a number")
        if "multipleOf" in schema and schema["multipleOf"] <= 0:
            raise bad("multipleOf", "must be greater than 0")
        for keyword in ("exclusiveMinimum", "exclusiveMaximum"):  # a boolean in draft-04
            if keyword in schema and not (_is_number(schema[keyword]) or isinstance(schema[keyword], bool)):
                raise bad(keyword, "must be a number")
        for keyword in ("pattern", "format", "$ref", "$id", "$anchor"):
            if keyword in schema and not isinstance(schema[keyword], str):
                raise bad(keyword, "must be a string")
        if "uniqueItems" in schema and not isinstance(schema["uniqueItems"], bool):
            raise bad("uniqueItems", "must be a boolean")
        required_map = schema.get("dependentRequired")
        if required_map is not None and not (
            isinstance(required_map, dict)
            and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in required_map.values())
        ):
            raise bad("dependentRequired", "must map property names to arrays of property names")
        if "dependencies" in schema and not isinstance(schema["dependencies"], dict):
            raise bad("dependencies", "must be an object")

    # -- references -----------------------------------------------------------------------
    def ref(self, ref: str, path: tuple) -> Any:
        pointer = self.pointer(ref, path)
        if pointer is None:
            self.loosen(path, "$ref")  # a remote schema: never fetched, any value
            return ANY
        name = self.def_by_pointer.get(pointer)
        if name is None:
            target = resolve(self.root, pointer)
            if target is MISSING:
                raise MalformedSchema(_path(path, "$ref"), f"{ref!r} points nowhere in this schema")
            segments = [s for s in pointer.split("/") if s]
            name = _unique_name(re.sub(r"[^A-Za-z0-9]+", "-", segments[-1] if segments else "root").strip("-") or "def", self.defs)
            self.def_by_pointer[pointer] = name
            self.defs[name] = ANY  # placeholder while it is being built (recursion)
            self.in_progress.add(name)
            self.defs[name] = self.node(target, tuple(unescape(s) for s in segments), 0)
            self.in_progress.discard(name)
        built = self.defs[name]
        if name not in self.in_progress and (built is NEVER or built == ANY):
            return built
        return {"$ref": f"#/$defs/{name}"}

    def pointer(self, ref: str, path: tuple) -> str | None:
        """The JSON pointer (within the root) a reference names, or None when it is remote."""
        base, _, fragment = ref.partition("#")
        fragment = unquote(fragment)
        if base:
            found = find(self.root, lambda s: s.get("$id") == base, "")
            if found is None and isinstance(self.root, dict) and str(self.root.get("$id", "")).endswith(base):
                found = ""
            if found is None:
                return None
        else:
            found = ""
        if fragment.startswith("/") or not fragment:
            return found + fragment
        anchored = find(self.root, lambda s: s.get("$anchor") == fragment, "")
        if anchored is None:
            raise MalformedSchema(_path(path, "$ref"), f"{ref!r} names no $anchor in this schema")
        return anchored

    # -- enum / const ---------------------------------------------------------------------
    def values(self, schema: dict, path: tuple, depth: int) -> Any:
        """const/enum: the values that also satisfy the keywords beside them."""
        if "const" in schema:
            values = [schema["const"]]
            if "enum" in schema and key_of(schema["const"]) not in {key_of(v) for v in schema["enum"]}:
                return NEVER
        else:
            values = list({key_of(v): v for v in schema["enum"]}.values())
        rest = {k: v for k, v in schema.items() if k not in ("const", "enum")}
        if "type" not in rest:  # keywords beside an enum constrain only values of their type
            rest["type"] = [t for t in TYPES if t != "integer"]
        siblings = self.node(rest, path, depth)
        kept = [v for v in values if self.admits(siblings, v)]
        if not kept:
            return NEVER
        return {"const": kept[0]} if len(kept) == 1 else {"enum": kept}

    # -- one type -------------------------------------------------------------------------
    def typed(self, kind: str, schema: dict, path: tuple, depth: int) -> Any:
        family = "number" if kind == "integer" else kind
        if family == "number":
            return self.number(kind, schema, path)
        for keyword in LOOSENED_BY_TYPE.get(family, ()):
            if keyword in schema:
                self.loosen(path, keyword)
        if kind == "string":
            return self.string(schema, path)
        if kind == "object":
            return self.object(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        return {"type": kind}

    def number(self, kind: str, schema: dict, path: tuple) -> Any:
        """A lower bound of 0 (or, for integers, 1) is enforced by leaving out the minus
        sign (and a leading 0); other bounds and multipleOf are loosened."""
        low, enforced = _lower_bound(kind, schema), ()
        if low is not None and (low == 0 or (low == 1 and kind == "integer")):
            enforced = ("minimum", "exclusiveMinimum")
        for keyword in LOOSENED_BY_TYPE["number"]:
            if keyword in schema and keyword not in enforced:
                self.loosen(path, keyword)
        return {"type": kind, "minimum": low} if enforced else {"type": kind}

    def string(self, schema: dict, path: tuple) -> Any:
        out: dict[str, Any] = {"type": "string"}
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if pattern is not None:
            if pattern_gbnf(pattern) is not None:
                out["pattern"] = pattern
            else:
                self.loosen(path, "pattern")
        if fmt is not None:
            if fmt in ENFORCED_FORMATS and "pattern" not in out:
                out["format"] = fmt
            else:
                self.loosen(path, "format")
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if high is not None and low > high:
            return NEVER
        for keyword, value in (("minLength", low), ("maxLength", high)):
            if value is None or (keyword == "minLength" and value == 0):
                continue
            if "pattern" in out or "format" in out or value > MAX_COUNT:
                self.loosen(path, keyword)  # one string rule per value: pattern or format wins
            else:
                out[keyword] = int(value)
        return out

    def object(self, schema: dict, path: tuple, depth: int) -> Any:
        required = list(dict.fromkeys(schema.get("required", [])))
        properties: dict[str, Any] = {}
        extra_schema = schema.get("additionalProperties")
        extra: Any = None if extra_schema is None else self.node(extra_schema, (*path, "additionalProperties"), depth + 1)
        if extra is NEVER:
            extra = False
        elif extra == ANY and extra_schema is not None:
            extra = True
        pattern_values = [
            self.node(s, (*path, "patternProperties", p), depth + 1) for p, s in schema.get("patternProperties", {}).items()
        ]
        if pattern_values and isinstance(extra, dict):
            extra = self.union([extra, *pattern_values])  # keys matching a pattern take its values
            extra = True if extra == ANY else extra
        for name, sub in schema.get("properties", {}).items():
            value = self.node(sub, (*path, "properties", name), depth + 1)
            if value is NEVER:
                if name in required:
                    return NEVER
                value = False  # kept: the name may not come as an extra member either
            properties[name] = value
        for name in required:
            if name not in properties:  # required but declared only by additional/patternProperties
                if extra is False and not pattern_values:
                    return NEVER
                if pattern_values and extra in (None, False):
                    properties[name] = self.union(pattern_values)
                else:
                    properties[name] = extra if isinstance(extra, dict) else ANY
        return object_schema(properties, required, extra)

    def array(self, schema: dict, path: tuple, depth: int) -> Any:
        items, prefix = schema.get("items"), schema.get("prefixItems")
        items_path = (*path, "items")
        if isinstance(items, list):  # draft-07 tuples: items is the prefix, additionalItems the rest
            prefix, items, items_path = items, schema.get("additionalItems"), (*path, "additionalItems")
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        high = None if high is None else int(high)
        for keyword in ("minContains", "maxContains"):
            if keyword in schema and "contains" in schema:
                self.loosen(path, keyword)
        rest = ANY if items is None else self.node(items, items_path, depth + 1)
        if prefix:
            positions = [self.node(s, (*path, f"prefixItems[{i}]"), depth + 1) for i, s in enumerate(prefix)]
            if NEVER in positions:
                positions = positions[: positions.index(NEVER)]
            length = len(positions) if high is None else min(len(positions), high)
            if low <= length:
                # Exactly the prefix: narrower than the schema (which also allows it shorter or
                # longer), and what a tuple means to its author.
                return tuple_schema(positions[:length])
            if rest is NEVER:
                return NEVER
            self.loosen(path, "prefixItems")
            rest = self.union([*positions, rest])
        if rest is NEVER:
            if low > 0:
                return NEVER
            high = 0
        if high is not None and low > high:
            return NEVER
        out: dict[str, Any] = {"type": "array", "items": ANY if rest is NEVER else rest}
        if low > MAX_COUNT:
            self.loosen(path, "minItems")
        elif low:
            out["minItems"] = low
        if high is not None and high > MAX_COUNT:
            self.loosen(path, "maxItems")
        elif high is not None:
            out["maxItems"] = high
        return out

def _lower_bound(kind: str, schema: dict) -> float | None:
    """The least value minimum/exclusiveMinimum allow (as a minimum), or None when the
    bound is one a grammar cannot enforce (an exclusive bound on a number)."""
    bounds = []
    minimum, exclusive = schema.get("minimum"), schema.get("exclusiveMinimum")
    if exclusive is True and minimum is not None:  # draft-04: a flag on minimum
        exclusive, minimum = minimum, None
    if minimum is not None:
        bounds.append(math.ceil(minimum) if kind == "integer" else minimum)
    if _is_number(exclusive):
        if kind != "integer":
            return None
        bounds.append(math.floor(exclusive) + 1)
    return max(bounds) if bounds else None


def _endless(defs: dict) -> list[str]:
    """Definitions that only an infinitely deep value satisfies (`{"required": ["next"],
    "properties": {"next": {"$ref": "#"}}}`): a grammar for them never lets a call end."""
    finite: set[str] = set()

    def ends(schema: Any) -> bool:
        if "$ref" in schema:
            return schema["$ref"].rsplit("/", 1)[-1] in finite
        if "anyOf" in schema:
            return any(ends(s) for s in schema["anyOf"])
        if "prefixItems" in schema:
            return all(ends(s) for s in schema["prefixItems"])
        if schema.get("type") == "array":
            return not schema.get("minItems") or ends(schema["items"])
        if schema.get("type") == "object":
            properties = schema.get("properties", {})
            return all(ends(properties[n]) for n in schema.get("required", []))
        return True

    changed = True
    while changed:
        changed = False
        for name, schema in defs.items():
            if name not in finite and ends(schema):
                finite.add(name)
                changed = True
    return [name for name in defs if name not in finite]


def _without(schema: dict, keyword: str) -> dict:
    return {k: v for k, v in schema.items() if k != keyword}


def _unique_name(base: str, taken: dict) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name

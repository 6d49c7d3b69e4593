"""Finding subschemas inside one JSON Schema document: JSON Pointers (RFC 6901) for local
`$ref`s, and a depth-first search for `$id` / `$anchor` targets (llamad.grammar.schema)."""

from __future__ import annotations

from typing import Any

# resolve()'s answer for a pointer that names nothing (None is a valid JSON value).
MISSING = object()


def unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def resolve(root: Any, pointer: str) -> Any:
    node = root
    for segment in pointer.split("/")[1:]:
        segment = unescape(segment)
        if isinstance(node, dict) and segment in node:
            node = node[segment]
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return MISSING
    return node if isinstance(node, (dict, bool)) else MISSING


def find(node: Any, match, pointer: str) -> str | None:
    """The pointer of the first subschema (depth first) for which `match` holds."""
    if isinstance(node, dict):
        if match(node):
            return pointer
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for key, child in items:
        if key in ("const", "enum", "default", "examples"):
            continue
        escaped = str(key).replace("~", "~0").replace("/", "~1")
        found = find(child, match, f"{pointer}/{escaped}")
        if found is not None:
            return found
    return None

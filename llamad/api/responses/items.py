"""A stored response's input items, as GET /v1/responses/{id}/input_items lists them.

The items are what the model was given: the conversation a `previous_response_id`
continued (its input items, then its output items) followed by the request's own `input`.
`instructions` are a field of the response, not an item. Each item is kept as the client
sent it, in the shape OpenAI lists it (a string input becomes a user message with
`input_text`; a missing `id` and `status` are filled in), so a cursor (`after`, `before`)
names the same item on every page.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import msgspec

from llamad.serve.request import InvalidRequest
from llamad.api.responses.stream import new_id

ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def _message(raw: dict[str, Any]) -> dict[str, Any]:
    content = raw.get("content")
    if isinstance(content, str):
        if raw.get("role") == "assistant":
            content = [{"type": "output_text", "text": content, "annotations": []}]
        else:
            content = [{"type": "input_text", "text": content}]
    return {**raw, "type": "message", "content": content}


def listed_item(raw: dict[str, Any]) -> dict[str, Any]:
    """One input item (already checked by the request translation) in its listed shape."""
    kind = raw.get("type", "message")  # EasyInputMessage: {role, content} without a type
    shaped = _message(raw) if kind == "message" else dict(raw)
    item = {"id": shaped.pop("id", None) or new_id(ID_PREFIXES.get(str(kind), "item_")), **shaped}
    if kind == "function_call" and not isinstance(item.get("arguments"), str):
        item["arguments"] = msgspec.json.encode(item.get("arguments") or {}).decode()
    item.setdefault("status", "completed")
    return item


def input_items_of(
    request_input: Union[str, list[dict[str, Any]], None], continued: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`continued`: the items of the conversation a previous_response_id continues."""
    if request_input is None:
        own: list[dict[str, Any]] = []
    elif isinstance(request_input, str):
        own = [{"type": "message", "role": "user", "content": request_input}]
    else:
        own = request_input
    return continued + [listed_item(raw) for raw in own]


DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def _limit(query: Mapping[str, str]) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LIMIT}, got '{text}'", param="limit")
    return limit


def _index_of(items: list[dict[str, Any]], item_id: str, param: str) -> int:
    for index, item in enumerate(items):
        if item.get("id") == item_id:
            return index
    raise InvalidRequest(f"'{param}': this response has no input item with id '{item_id}'", param=param)


def page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """A page of OpenAI's list shape. `query`: limit (1-100, default 20), order (asc or
    desc, default desc, as OpenAI's), after / before (an item id); include is accepted
    (no includable field applies to text items)."""
    limit = _limit(query)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"'order' must be 'asc' or 'desc', got '{order}'", param="order")
    ordered = items if order == "asc" else items[::-1]
    after, before = query.get("after"), query.get("before")
    start, end = 0, len(ordered)
    if after:
        start = _index_of(ordered, after, "after") + 1
    if before:
        end = _index_of(ordered, before, "before")
    window = ordered[start:end]
    # With only `before`, the page is the items just before it (what a client paging back expects).
    data = window[-limit:] if before and not after else window[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(window) > len(data),
    }

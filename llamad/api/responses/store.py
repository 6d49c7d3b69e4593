"""Recent Responses API answers, kept in memory for `previous_response_id` and
GET/DELETE /v1/responses/{id} (and its /input_items).

Bounded by a count and by bytes (`responses.store_max`, `responses.store_max_bytes`); the
oldest answers go first. Nothing survives a restart: a client that needs a conversation
for longer sends the whole history each turn (Codex does, with `store: false`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llamad.engine.chat import ChatMessage


@dataclass
class StoredResponse:
    body: dict[str, Any]  # the response object, as GET /v1/responses/{id} returns it
    # The conversation up to and including this answer (without `instructions`, which
    # OpenAI does not carry over to a follow-up), for a request that continues it.
    history: list[ChatMessage] = field(default_factory=list)
    # What the model was given, as GET /v1/responses/{id}/input_items lists it
    # (llamad.api.responses.items): the continued conversation's items, then this request's input.
    input_items: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


def _size_of(body: dict[str, Any], history: list[ChatMessage], input_items: list[dict[str, Any]]) -> int:
    size = len(msgspec.json.encode(body)) + len(msgspec.json.encode(input_items))
    for message in history:
        size += len(message.content) + sum(len(c.arguments) + len(c.name) + len(c.id) for c in message.tool_calls)
    return size


class ResponseStore:
    def __init__(self, max_responses: int, max_bytes: int):
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, body: dict[str, Any], history: list[ChatMessage], input_items: list[dict[str, Any]] | None = None) -> None:
        entry = StoredResponse(body=body, history=copy.deepcopy(history), input_items=list(input_items or []))
        entry.size = _size_of(body, entry.history, entry.input_items)
        if entry.size > self.max_bytes or self.max_responses == 0:
            return  # larger than the whole store: keeping it would evict everything else
        self.delete(body["id"])
        self._items[body["id"]] = entry
        self.bytes += entry.size
        while len(self._items) > self.max_responses or self.bytes > self.max_bytes:
            _, oldest = self._items.popitem(last=False)
            self.bytes -= oldest.size

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._items.get(response_id)
        if entry is None:
            return None
        # Callers change the messages they build on (tool-history repair): give them a copy.
        # The items are never changed in place, only listed or copied into a new list.
        return StoredResponse(
            body=entry.body, history=copy.deepcopy(entry.history), input_items=entry.input_items, size=entry.size
        )

    def delete(self, response_id: str) -> bool:
        entry = self._items.pop(response_id, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True

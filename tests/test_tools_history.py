"""History checks before rendering: cut-off calls closed, prose arguments kept as text,
tool results without a call and nameless calls refused with a 400 that names them."""

from __future__ import annotations

import pytest

from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.tools.plan import ToolHistoryError, check_history

WEATHER = ToolSpec("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})


def history(*messages):
    return Chat(messages=list(messages))


def test_history_repairs_and_refusals():
    cut = ToolCall("call_1", "get_weather", '{"city": "Par')
    empty = ToolCall("call_2", "now", "")
    prose = ToolCall("call_3", "search", "search for llamas")
    chat = history(
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "Let me see.", tool_calls=[cut, empty, prose]),
        ChatMessage("tool", "18C", tool_call_id="call_1"),
        ChatMessage("tool", "?", tool_call_id="call_3"),
    )
    check_history(chat, [WEATHER])
    assistant = chat.messages[1]
    assert [c.arguments for c in assistant.tool_calls] == ['{"city": "Par"}', "{}"]
    assert '"name": "search", "arguments": search for llamas' in assistant.content

    orphan = history(ChatMessage("user", "hi"), ChatMessage("tool", "18C", tool_call_id="call_9"))
    with pytest.raises(ToolHistoryError) as error:
        check_history(orphan, [WEATHER])
    assert "messages[1]" in str(error.value) and "call_9" in str(error.value)

    nameless = history(ChatMessage("assistant", "", tool_calls=[ToolCall("call_1", "", "{}")]))
    with pytest.raises(ToolHistoryError, match=r"messages\[0\]\.tool_calls\[0\]"):
        check_history(nameless, [WEATHER])

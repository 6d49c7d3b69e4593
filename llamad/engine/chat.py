"""The chat both API families translate into, and its rendering into a prompt.

OpenAI and Anthropic requests become one `Chat` (system/user/assistant/tool messages,
tool calls, offered tools). `ChatTemplate` turns a Chat into prompt text with the GGUF's
own Jinja template, a named llama-cpp-python format, or a choice by architecture.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable

import structlog

log = structlog.get_logger("llamad.engine")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model (or the client's history) wrote it


@dataclass
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    # For tool results: the name of the tool that produced it, when known.
    name: str | None = None
    is_error: bool = False
    # An assistant turn's reasoning as the client sent it back (Anthropic thinking blocks,
    # OpenAI reasoning_content, Ollama thinking): templates that read `reasoning_content`
    # (Qwen 3, GLM, ...) render it, so the prompt extends the turn the model wrote.
    reasoning: str = ""


@dataclass
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass
class Chat:
    messages: list[ChatMessage]
    tools: list[ToolSpec] = field(default_factory=list)
    # Extra system text (tool instructions) appended by the tools layer.
    system_suffix: str = ""
    # Variables the template is rendered with beyond the conversation (llamad.serve.request's
    # template_switches): enable_thinking, reasoning_effort, any chat_template_kwargs.
    switches: dict[str, Any] = field(default_factory=dict)


# Architecture -> llama-cpp-python chat format, for GGUF files that carry no template.
FORMAT_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama-3",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "phi3": "chatml",
    "mistral": "mistral-instruct",
}

# A GGUF without a chat template is usually a base (pretrained) model: it never learned its
# architecture's turn tokens, so in that format it never ends a turn (Gemma 3 270M writes
# on until the output cap). A plain transcript is what base models have seen: they answer
# after "Assistant:" and, soon after, begin the next "User:" line, which ends the turn. The
# architecture's format is kept for a file whose `general.finetune` names a tuned model.
TRANSCRIPT_FORMAT = "transcript"
TRANSCRIPT_SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant"}
BASE_FINETUNES = {"", "base", "pt", "pretrained", "pretrain"}


def format_transcript(messages: list[dict[str, Any]], **_: Any) -> Any:
    """Speaker-labelled lines; generation stops where the model starts another speaker's line."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse

    parts = []
    for message in messages:
        speaker = TRANSCRIPT_SPEAKERS.get(message["role"], "User")
        parts.append(f"{speaker}: {message.get('content') or ''}".rstrip())
    prompt = "\n\n".join(parts) + "\n\nAssistant:"
    # With the blank line before a speaker too, so that an answer does not end in "\n".
    speakers = ("User", "Assistant", "System")
    return ChatFormatterResponse(prompt=prompt, stop=[f"\n{gap}{s}:" for gap in ("\n", "") for s in speakers])


LOCAL_FORMATS: dict[str, Callable[..., Any]] = {TRANSCRIPT_FORMAT: format_transcript}


def fallback_format(architecture: str, finetune: str) -> str:
    """The format for a GGUF that carries no chat template (see TRANSCRIPT_FORMAT)."""
    if finetune.strip().lower() in BASE_FINETUNES:
        return TRANSCRIPT_FORMAT
    return FORMAT_BY_ARCHITECTURE.get(architecture, "chatml")


# Formats whose llama-cpp-python formatter drops system messages: fold them into the
# first user turn instead (this is what Gemma's own template does).
FOLD_SYSTEM_FORMATS = {"gemma"}


def known_formats() -> list[str]:
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    return sorted([*LlamaChatCompletionHandlerRegistry()._chat_handlers, *LOCAL_FORMATS])  # noqa: SLF001


def named_formatter(name: str) -> Callable[..., Any]:
    """The llama-cpp-python formatter function registered under `name`."""
    from llama_cpp import llama_chat_format

    if name in LOCAL_FORMATS:
        return LOCAL_FORMATS[name]
    for candidate in (name.replace("-", "_").replace(".", "_"), name.replace("-", "").replace(".", "")):
        formatter = getattr(llama_chat_format, f"format_{candidate}", None)
        if callable(formatter):
            return formatter
    raise ValueError(
        f"unknown chat_format '{name}'; known formats: {', '.join(known_formats())}"
    )


def tool_call_json(call: ToolCall) -> str:
    """One tool call as the JSON object the text rendering uses."""
    try:
        arguments: Any = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        arguments = call.arguments  # malformed history: keep what was sent, as a string
    return json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)


def call_arguments(arguments: str, as_object: bool) -> Any:
    """A call's arguments as the template gets them: the JSON object (what Transformers'
    templates expect: they `tojson` it or walk its items), or the text when it is not one or
    the template concatenates strings (DeepSeek R1's)."""
    if not as_object:
        return arguments
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def messages_as_text(chat: Chat, template_has_tools: bool, object_arguments: bool = False) -> list[dict[str, Any]]:
    """Chat messages as the dicts a chat template expects.

    Templates without tool support get tool calls and tool results as plain text, so
    nothing the client sent is dropped: calls as `<tool_call>{json}</tool_call>` in the
    assistant turn, results as `<tool_response>…</tool_response>` in a user turn.
    System messages at the start form the system prompt (with the tools' suffix); later
    ones are rendered in place as `<system>…</system>` user text.
    """
    out: list[dict[str, Any]] = []
    leading = 0
    while leading < len(chat.messages) and chat.messages[leading].role == "system":
        leading += 1
    system_parts = [m.content for m in chat.messages[:leading] if m.content]
    if chat.system_suffix:
        system_parts.append(chat.system_suffix)
    if system_parts:
        out.append({"role": "system", "content": "\n\n".join(system_parts)})
    for message in chat.messages[leading:]:
        if message.role == "system":
            # A system message after the conversation has begun stays where it stands, so
            # the prompt before it is the same as last turn's and its KV cache is reused.
            # Most templates accept a system role only first: it is written as user text.
            out.append({"role": "user", "content": f"<system>\n{message.content}\n</system>"})
        elif message.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": message.content}
            if message.reasoning:
                entry["reasoning_content"] = message.reasoning
            if message.tool_calls:
                if template_has_tools:
                    entry["tool_calls"] = [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call_arguments(call.arguments, object_arguments)},
                        }
                        for call in message.tool_calls
                    ]
                else:
                    calls = "\n".join(f"<tool_call>\n{tool_call_json(c)}\n</tool_call>" for c in message.tool_calls)
                    entry["content"] = f"{message.content}\n{calls}".strip()
            out.append(entry)
        elif message.role == "tool":
            if template_has_tools:
                entry = {"role": "tool", "content": message.content, "tool_call_id": message.tool_call_id}
                if message.name:
                    entry["name"] = message.name
                out.append(entry)
            else:
                label = f' name="{message.name}"' if message.name else ""
                status = ' status="error"' if message.is_error else ""
                text = f"<tool_response{label}{status}>\n{message.content}\n</tool_response>"
                if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + text
                else:
                    out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append({"role": "user", "content": message.content})
    for entry in out:
        entry.pop("_tool_results", None)
    return _merge_same_role(out)


def tools_as_prompt(tools: list[ToolSpec]) -> str:
    """The offered tools as system text, in the shape messages_as_text writes calls."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
        for t in tools
    )
    return (
        "You may call these tools:\n<tools>\n" + listing + "\n</tools>\n"
        'To call one, write <tool_call>\n{"name": <tool name>, "arguments": <arguments object>}\n</tool_call>'
    )


def _merge_same_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strict templates (Gemma, Mistral) require user/assistant to alternate."""
    merged: list[dict[str, Any]] = []
    for entry in messages:
        if (
            merged
            and entry["role"] == merged[-1]["role"]
            and entry["role"] in ("user", "assistant")
            and "tool_calls" not in entry
            and "tool_calls" not in merged[-1]
        ):
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{entry['content']}"}
        else:
            merged.append(entry)
    return merged


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def gguf_formatter(template: str, bos_token: str, eos_token: str, clock: Callable[[], datetime] = datetime.now) -> Callable[..., Any]:
    """The GGUF's own Jinja template, rendered as Transformers renders it: llama-cpp-python's
    Jinja2ChatFormatter (sandbox, trim_blocks/lstrip_blocks, loop controls, `tojson`,
    `{% generation %}`), plus every extra variable the request gives (enable_thinking,
    reasoning_effort, ...), and `strftime_now` read from `clock` (tests fix the date)."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse, Jinja2ChatFormatter

    class GGUFTemplate(Jinja2ChatFormatter):
        def __call__(self, *, messages: list[dict[str, Any]], tools: Any = None, **kwargs: Any) -> Any:
            def raise_exception(message: str) -> None:
                raise TemplateRefused(message)

            variables: dict[str, Any] = {
                "messages": messages,
                "tools": tools,
                "eos_token": self.eos_token,
                "bos_token": self.bos_token,
                "add_generation_prompt": self.add_generation_prompt,
                "raise_exception": raise_exception,
                "strftime_now": lambda f: clock().strftime(f),
            }
            variables.update(kwargs)
            prompt = self._environment.render(**variables)
            return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token] if self.eos_token else [], added_special=True)

    return GGUFTemplate(template=template, eos_token=eos_token, bos_token=bos_token)


class TemplateRefused(ValueError):
    """The chat template called raise_exception() on this conversation."""


# When the template refuses a valid conversation, it is rewritten into shapes templates
# commonly accept, in this order: tool call ids as 9 letters and digits (Mistral's
# templates require them), the system prompt folded into the first user turn (templates
# without a system role), tool calls and results written as text (templates without a tool
# role). Each is (what the log says, short ids, fold system, tools as text).
ADAPTATIONS = (
    ("tool call ids shortened to 9 letters and digits", True, False, False),
    ("system prompt folded into the first user turn", False, True, False),
    ("system prompt folded, tool call ids shortened", True, True, False),
    ("tool calls and results written as text", False, False, True),
    ("system prompt folded, tool calls and results written as text", False, True, True),
)


def short_id(call_id: str | None) -> str | None:
    """A tool call id as 9 letters and digits, the same for the call and its result."""
    if call_id is None:
        return None
    return hashlib.sha1(call_id.encode("utf-8")).hexdigest()[:9]


def with_short_ids(chat: Chat) -> Chat:
    messages = [
        replace(
            m,
            tool_calls=[replace(c, id=short_id(c.id) or "") for c in m.tool_calls],
            tool_call_id=short_id(m.tool_call_id),
        )
        for m in chat.messages
    ]
    return replace(chat, messages=messages)


@dataclass
class ChatTemplate:
    """How this model's prompts are written, chosen once at load time."""

    # "gguf" (the file's Jinja template) or "format:<name>"
    source: str
    render_fn: Callable[..., Any]
    fold_system_prompt: bool = False
    supports_tools: bool = False

    def render(self, chat: Chat) -> tuple[str, list[str], bool]:
        """-> (prompt text, template stop strings, prompt already holds BOS text).

        A template that raises on a valid conversation gets it rewritten (ADAPTATIONS), and
        the log says how; only when every shape is refused does the error go back."""
        shape = (False, self.fold_system_prompt, not self.supports_tools)
        try:
            return self._rendered(chat, *shape)
        except Exception as exc:  # raise_exception(), or a template that trips on a shape
            first = exc
        tried = {shape}
        for how, short, fold, tools_as_text in ADAPTATIONS:
            other = (short, fold or shape[1], tools_as_text or shape[2])
            if other in tried:
                continue
            tried.add(other)
            try:
                rendered = self._rendered(chat, *other)
            except Exception:
                continue
            log.warning("chat_template_adapted", template=self.source, refused=str(first), adapted=how)
            return rendered
        raise first

    def _rendered(self, chat: Chat, short: bool, fold: bool, tools_as_text: bool) -> tuple[str, list[str], bool]:
        """Call arguments as JSON objects, else as the text (both are what templates take)."""
        if short:
            chat = with_short_ids(chat)
        try:
            return self._render(chat, fold, tools_as_text, object_arguments=True)
        except Exception:
            if tools_as_text or not any(m.tool_calls for m in chat.messages):
                raise
        return self._render(chat, fold, tools_as_text, object_arguments=False)

    def _render(self, chat: Chat, fold: bool, tools_as_text: bool, object_arguments: bool) -> tuple[str, list[str], bool]:
        if tools_as_text and self.supports_tools and chat.tools:
            # The tools layer left their description to this template, which has refused
            # them: they go into the system prompt as text, beside the calls written as text.
            chat = replace(chat, system_suffix="\n\n".join(p for p in (chat.system_suffix, tools_as_prompt(chat.tools)) if p))
        messages = messages_as_text(chat, not tools_as_text, object_arguments)
        # A final assistant message is a prefill: the answer continues it (Anthropic's
        # documented behaviour; llama.cpp's server does the same for OpenAI requests).
        prefill = ""
        last = chat.messages[-1] if chat.messages else None
        if last is not None and last.role == "assistant" and not last.tool_calls and messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]
        if fold:
            messages = fold_system(messages)
        kwargs: dict[str, Any] = {"messages": messages, **chat.switches}
        if self.supports_tools and chat.tools and not tools_as_text:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in chat.tools
            ]
        result = self.render_fn(**kwargs)
        stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return result.prompt + prefill, [s for s in stops if s], bool(getattr(result, "added_special", False))

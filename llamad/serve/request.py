"""The neutral request: what every face's translation produces and the one request path
(llamad.serve.pipeline) consumes. A face's translator is a pure function from its wire
schema to a `ModelRequest`; a request it cannot translate raises `InvalidRequest`, which
names the field and carries no HTTP status (llamad.serve.errors maps it, once, to each
family's 400)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from llamad.engine import Sampling
from llamad.engine.chat import Chat
from llamad.models.pool import KEEP

MAX_STOPS = 16  # stop sequences one request may give (OpenAI's own limit is 4; llama-server's none)
UNLIMITED = -1  # max_tokens: as many as the hard cap and the context allow (Ollama's num_predict -1, -2)


class InvalidRequest(ValueError):
    """The client's request is wrong: what, and where (`param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def check_range(value: float | int | None, name: str, low: float, high: float, prefix: str = "") -> None:
    """A request field outside [low, high] is an InvalidRequest naming it (`prefix`:
    "options." for Ollama's)."""
    if value is not None and not (low <= value <= high):
        raise InvalidRequest(f"'{prefix}{name}' must be between {low} and {high}, got {value}", param=name)


@dataclass
class TextPrompt:
    """Raw prompt text: no chat template."""

    text: str


@dataclass
class TokenPrompt:
    """A prompt given as token ids."""

    tokens: list[int]


@dataclass
class InfillPrompt:
    """Fill in the middle between `prefix` and `suffix` in the model's FIM tokens; `param`
    names the request field that asked for it (for the error when the model has none)."""

    prefix: str
    suffix: str
    extra: str = ""
    middle: str = ""
    param: str = "suffix"


RawPrompt = Union[TextPrompt, TokenPrompt, InfillPrompt]


@dataclass
class ToolUse:
    """Tools and structured output as the request asks for them (planned by llamad.tools)."""

    mode: str = "auto"  # "auto" | "none" | "required"
    name: str | None = None  # a named tool (mode "required")
    parallel: bool = True
    response_format: dict | None = None
    id_prefix: str = "call_"


@dataclass
class ModelRequest:
    """One request to the model, whatever face it came through.

    Either `chat` (a conversation, rendered through the template, tools offered in
    `chat.tools`) or `prompts` (raw text, token ids, fill-in-the-middle: no template, and the
    answer is text as it comes, `<think>` included). `n` choices are generated for every
    prompt, one after another."""

    # The `model` the client named: routed to one of the server's models (llamad.models).
    model: str | None = None
    # Ollama's keep_alive, parsed (seconds; None: keep loaded); KEEP: the request sent none.
    keep_alive: Any = KEEP
    chat: Chat | None = None
    prompts: list[RawPrompt] = field(default_factory=list)
    n: int = 1
    sampling: Sampling = field(default_factory=Sampling)
    # The most tokens the answer may have: None is the face's default (`default_max_tokens`,
    # else the server's limits.default_max_tokens); UNLIMITED is the hard cap. Every value is
    # clamped once, the same way, by the pipeline.
    max_tokens: int | None = None
    default_max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_param: str = "stop"
    tools: ToolUse = field(default_factory=ToolUse)
    # Where the history's tool parts are in this family's request (for an error naming them).
    history_param: str = "messages"
    keep_reasoning: bool = False
    logprobs: int | None = None
    ignore_eos: bool = False
    # A context smaller than the loaded one (Ollama's num_ctx): prompt and answer fit in it.
    n_ctx: int | None = None
    # The chat template's switches, set by each face from its own field: OpenAI's
    # `chat_template_kwargs` and `reasoning_effort`, Responses' `reasoning.effort`,
    # Anthropic's `thinking`, Ollama's `think`. `thinking_budget` (Anthropic's
    # budget_tokens): the reasoning is closed once it has used that many tokens.
    template_kwargs: dict = field(default_factory=dict)
    reasoning_effort: str | None = None
    thinking_budget: int | None = None
    # N-gram speculation for this request: None is the server's [speculative] setting. Every
    # face gets it from the X-Llamad-Speculative header (llamad.serve.pipeline).
    speculative: bool | None = None


SPECULATIVE_HEADER = "x-llamad-speculative"


def speculative_choice(value: str | None, default: bool | None = None) -> bool | None:
    """The X-Llamad-Speculative header: "off" (or 0, false, no) or "on" (1, true, yes)."""
    if value is None:
        return default
    word = value.strip().lower()
    if word in ("off", "0", "false", "no"):
        return False
    if word in ("on", "1", "true", "yes"):
        return True
    raise InvalidRequest(f"the X-Llamad-Speculative header must be 'on' or 'off', got {value!r}", param="X-Llamad-Speculative")


def template_switches(ask: ModelRequest) -> dict:
    """The variables the chat template is rendered with beyond the conversation: the
    client's `chat_template_kwargs` (e.g. enable_thinking), and `reasoning_effort` (gpt-oss's
    template reads it). An explicit kwarg wins over the face's own field."""
    switches: dict = {}
    if ask.reasoning_effort is not None:
        switches["reasoning_effort"] = ask.reasoning_effort
    switches.update(ask.template_kwargs)
    return switches


def thinking_switch(enabled: bool | None) -> dict:
    """`enable_thinking` for the templates that read it (Qwen 3, SmolLM3, GLM, ...)."""
    return {} if enabled is None else {"enable_thinking": enabled}

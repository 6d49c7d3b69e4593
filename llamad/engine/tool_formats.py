"""Which tool-call format a model was trained on, read from its chat template and vocabulary.

`detect(template_text, special_tokens)` is called once at load (the engine keeps the
result as `engine.tool_format`); the request path builds the grammar, the parser and the
history rendering for that format. The families (facts from the published templates and
llama.cpp's common/chat*.cpp):

| name | a call as the model writes it | found by |
|---|---|---|
| `hermes` | `<tool_call>\\n{"name": n, "arguments": {…}}\\n</tool_call>` (Qwen2.5, Qwen3, Hermes; llamad's own prompt) | `<tool_call>` in the template; also the default |
| `qwen3-coder` | `<tool_call>\\n<function=n>\\n<parameter=k>\\nv\\n</parameter>\\n</function>\\n</tool_call>` (Qwen3-Coder, Qwen3.5) | `<function=` and `<parameter=` in the template |
| `glm` | `<tool_call>n\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>`, a string value raw and any other JSON (GLM 4.5, 4.6; GLM 4.7 without the newlines) | `<arg_key>` in the template |
| `llama3` | `{"name": n, "parameters": {…}}` (Llama 3.1/3.2/3.3; `<|python_tag|>` before it is read too) | `<|python_tag|>`, or a Llama 3 header template asking for `"parameters"` |
| `mistral` | `[TOOL_CALLS][{"name": n, "arguments": {…}, "id": "<9 chars>"}]` (Mistral Nemo) | `[TOOL_CALLS]` |
| `mistral-args` | `[TOOL_CALLS]n[ARGS]{…}` (Devstral, Mistral Small 3.2, Ministral 3) | `[TOOL_CALLS]` and `[ARGS]` |
| `harmony` | `<|channel|>commentary to=functions.n <|constrain|>json<|message|>{…}<|call|>` (gpt-oss) | `<|channel|>` |
| `json` | `{"name": n, "arguments": {…}}` | a template that takes `tools` in none of the shapes above |

Reasoning markers (`ToolFormat.reasoning`): `("<think>", "</think>")` when the template or
the vocabulary has `<think>`; `("[THINK]", "[/THINK]")` for Mistral's reasoning models;
harmony's analysis channel
(`<|channel|>analysis<|message|>` … `<|end|>`) for gpt-oss; None otherwise.

A GGUF without a template, or whose template does not take `tools`, gets `hermes`: llamad
prompts with its own Hermes instructions then (llamad.tools.plan.tools_prompt).
The request path imports this module as llamad.tools.formats.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_REASONING = ("<think>", "</think>")
HARMONY_REASONING = ("<|channel|>analysis<|message|>", "<|end|>")
MISTRAL_REASONING = ("[THINK]", "[/THINK]")  # Magistral, Ministral 3 Reasoning

__all__ = ["FORMATS", "HARMONY_REASONING", "MARKERS", "MISTRAL_REASONING", "THINK_REASONING", "ToolFormat", "by_name", "detect", "shown_markers", "special_markers"]



@dataclass(frozen=True)
class ToolFormat:
    """A family's tool-call format. `name` is what `llamad check` prints (`tool_format`);
    `trigger` is the text a call starts with (where a lazy grammar takes over under
    tool_choice auto); `reasoning` the (open, close) markers of reasoning text, or None."""

    name: str
    trigger: str
    reasoning: tuple[str, str] | None = None
    # Whether the template itself renders the tools (else llamad's Hermes prompt is used).
    template_renders_tools: bool = False

    def with_reasoning(self, reasoning: tuple[str, str] | None) -> "ToolFormat":
        return ToolFormat(self.name, self.trigger, reasoning, self.template_renders_tools)


FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "<tool_call>"),
    "qwen3-coder": ToolFormat("qwen3-coder", "<tool_call>"),
    "glm": ToolFormat("glm", "<tool_call>"),
    "llama3": ToolFormat("llama3", '{"name": '),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]"),
    "mistral-args": ToolFormat("mistral-args", "[TOOL_CALLS]"),
    "harmony": ToolFormat("harmony", " to=functions.", HARMONY_REASONING),
    "json": ToolFormat("json", '{"name": '),
}

HERMES = FORMATS["hermes"]


def by_name(name: str) -> ToolFormat:
    return FORMATS[name]


def detect(template_text: str | None, special_tokens: set[str] | frozenset[str] = frozenset()) -> ToolFormat:
    """The tool format (and reasoning markers) of a model, from its Jinja chat template text
    (None or "" when the GGUF has none) and the texts of its special/control tokens."""
    text = template_text or ""
    specials = set(special_tokens)
    takes_tools = "tools" in text

    def has(marker: str) -> bool:
        return marker in text or marker in specials

    if "<|channel|>" in text or ("<|channel|>" in specials and "<|constrain|>" in specials and not text):
        return _with(FORMATS["harmony"], HARMONY_REASONING, takes_tools or not text)
    reasoning = THINK_REASONING if has("<think>") else MISTRAL_REASONING if has("[THINK]") else None
    if not takes_tools:
        return HERMES.with_reasoning(reasoning)
    if "<function=" in text and "<parameter=" in text:
        name = "qwen3-coder"
    elif "<arg_key>" in text:  # GLM also writes <tool_call>, so this is asked first
        name = "glm"
    elif "<tool_call>" in text:
        name = "hermes"
    elif "[TOOL_CALLS]" in text:
        name = "mistral-args" if "[ARGS]" in text else "mistral"
    elif "<|python_tag|>" in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        name = "llama3"
    else:
        name = "json"
    return _with(FORMATS[name], reasoning, True)


# The marker texts `detect` asks the vocabulary about.
MARKERS = ("<think>", "</think>", "[THINK]", "[/THINK]", "<tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<|channel|>",
           "<|message|>", "<|constrain|>", "<|start|>", "<|end|>", "<|call|>", "<|return|>")


# Control tokens a family writes as part of its calls or reasoning: the engine decodes them
# as their text (llama.cpp hides control tokens otherwise), so the grammar's lazy trigger
# and the parsers see them.
_SHOWN = {
    "llama3": ("<|python_tag|>",),
    # single tokens in GLM's vocabulary; shown in case a GGUF marks them as control tokens
    "glm": ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
    "mistral": ("[TOOL_CALLS]",),
    "mistral-args": ("[TOOL_CALLS]", "[ARGS]"),
    "harmony": ("<|channel|>", "<|message|>", "<|constrain|>", "<|start|>", "<|end|>"),
}


def shown_markers(fmt: ToolFormat) -> tuple[str, ...]:
    """The marker texts whose tokens the engine decodes visibly for `fmt`."""
    return _SHOWN.get(fmt.name, ()) + (fmt.reasoning or ())


def special_markers(tokenize) -> set[str]:
    """The MARKERS that are single tokens of a vocabulary; `tokenize(text)` reads special
    tokens (llama.cpp `special=True`)."""
    found = set()
    for marker in MARKERS:
        try:
            if len(tokenize(marker)) == 1:
                found.add(marker)
        except Exception:  # noqa: BLE001 - a vocabulary that cannot tokenize it lacks it
            continue
    return found


def _with(fmt: ToolFormat, reasoning: tuple[str, str] | None, renders: bool) -> ToolFormat:
    return ToolFormat(fmt.name, fmt.trigger, reasoning, renders)

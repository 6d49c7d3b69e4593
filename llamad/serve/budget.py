"""A reasoning budget (Anthropic's `thinking.budget_tokens`), enforced once for every face.

The generation first runs for at most `budget` tokens. When it stops there with the
reasoning still open, the reasoning is closed for the model: the close marker is written
into the answer (the reasoning splitter sees it as the end of the thinking) and the
generation goes on from the prompt, the reasoning so far and the marker, for the tokens
the request has left. The second part reuses the first's KV cache (its prompt is the first
prompt plus what was generated), so closing costs the few marker tokens.

`BudgetedEngine` wraps the engine for `answer_events`: its `stream` is the budgeted one,
everything else is the engine's.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import replace
from typing import Any, AsyncIterator

from llamad.engine import Done, Generation, Prompt, Started, Token
from llamad.engine.types import EngineEvent

THINK = ("<think>", "</think>")


def reasoning_open(prompt: Prompt, text: str, markers: tuple[str, str] = THINK) -> bool:
    """Whether the reasoning is still open after `text` was generated from `prompt`."""
    start, end = markers
    opened = text.rfind(start)
    closed = text.rfind(end)
    if closed >= 0 and closed > opened:
        return False
    return opened >= 0 or prompt.opens_reasoning


# gpt-oss (harmony): the analysis message ends, and the final channel is opened for the answer.
HARMONY_FINAL = "<|start|>assistant<|channel|>final<|message|>"


def closing(markers: tuple[str, str]) -> tuple[str, str]:
    """What closes the reasoning: (the text the answer events get, the text written after the
    reasoning for the model to go on from). For `<think>` and `[THINK]` they are the same;
    for harmony the final channel's header goes to the model only."""
    end = markers[1]
    if end == "<|end|>":
        return end, end + HARMONY_FINAL
    close = f"\n{end}\n\n" if end.startswith("</") else end
    return close, close


class BudgetedEngine:
    """The engine, with reasoning closed after `budget` generated tokens."""

    def __init__(self, engine: Any, budget: int):
        self._engine = engine
        self.budget = budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def markers(self) -> tuple[str, str]:
        """The family's reasoning markers (llamad.tools.formats): `<think>`, Mistral's
        `[THINK]`, gpt-oss's analysis channel; `<think>` for a model that has none."""
        fmt = getattr(self._engine, "tool_format", None)
        reasoning = getattr(fmt, "reasoning", None)
        return tuple(reasoning) if reasoning else THINK  # type: ignore[return-value]

    async def stream(self, generation: Generation) -> AsyncIterator[EngineEvent]:
        engine = self._engine
        if self.budget >= generation.max_tokens:
            async for event in engine.stream(generation):
                yield event
            return
        markers = self.markers()
        first = replace(generation, max_tokens=self.budget)
        text: list[str] = []
        done: Done | None = None
        async with aclosing(engine.stream(first)) as events:
            async for event in events:
                if isinstance(event, Done):
                    done = event
                    break
                if isinstance(event, Token):
                    text.append(event.text)
                yield event
        if done is None:
            return
        generated = "".join(text)
        if done.finish_reason != "length" or not reasoning_open(generation.prompt, generated, markers):
            yield done
            return
        shown, written = closing(markers)
        yield Token(shown)  # the splitter ends the reasoning here
        tokens = generation.prompt.tokens + engine.tokenize(generated + written, add_special=False)
        prompt = replace(generation.prompt, text=generation.prompt.text + generated + written, tokens=tokens, opens_reasoning=False)
        left = generation.max_tokens - done.completion_tokens
        if left < 1 or len(tokens) >= engine.n_ctx:
            yield replace(done, finish_reason="length")
            return
        rest = replace(generation, prompt=prompt, max_tokens=left)
        async with aclosing(engine.stream(rest)) as events:
            async for event in events:
                if isinstance(event, Done):
                    yield replace(
                        event,
                        prompt_tokens=done.prompt_tokens,
                        completion_tokens=done.completion_tokens + event.completion_tokens,
                        cached_tokens=done.cached_tokens,
                        time_to_first_token_s=done.time_to_first_token_s,
                        decode_s=done.decode_s + event.decode_s,
                    )
                elif not isinstance(event, Started):  # the answer has begun: Waiting is a keep-alive
                    yield event

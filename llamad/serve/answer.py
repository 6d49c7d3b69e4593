"""Engine events -> answer events: what every face frames (llamad.serve.pipeline runs it).

Token text goes through the reasoning splitter, then (when tools are offered) the tool-call
parser; what comes out is a stream of typed answer events. A streamed reply frames these
events; a non-streamed reply is the same events folded by `fold`.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence, Union

from llamad.engine import Done, Engine, Generation, Prompt, Started, Token, TokenLogprob, Waiting
from llamad.serve.reasoning import ReasoningSplitter


@dataclass
class Keepalive:
    """Nothing to say yet (queued, or the prompt is being evaluated)."""


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class TextDelta:
    text: str
    # The entries of the tokens this text completes, when the generation asked for them.
    # Reasoning and tool-call text is the model's output too: its tokens' entries ride on
    # the text delta that follows them (or on an empty one), so every generated token is
    # listed once, in order.
    logprobs: Sequence[TokenLogprob] = ()


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallDelta:
    index: int
    arguments: str


@dataclass
class ToolCallEnd:
    index: int


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "tool_calls"
    stop_sequence: str | None
    usage: Usage
    time_to_first_token_s: float | None = None
    decode_s: float = 0.0


@dataclass
class ChoiceStart:
    """The next choice begins (a request with several prompts, or n > 1): the events up to
    the next ChoiceStart answer `prompt`."""

    index: int
    prompt: Prompt


AnswerEvent = Union[Keepalive, ReasoningDelta, TextDelta, ToolCallStart, ToolCallDelta, ToolCallEnd, Finish, ChoiceStart]


class ToolParser(Protocol):
    """Turns answer text into text and tool-call events (see llamad.tools.plan)."""

    def feed(self, text: str) -> list[AnswerEvent]: ...

    def finish(self) -> list[AnswerEvent]: ...

    @property
    def calls(self) -> int: ...

    @property
    def ended_on_call(self) -> bool:
        """The answer ends with a finished call: nothing after it, and not cut off."""
        ...


class PlainText:
    """The parser used when no tools are offered: everything is text."""

    calls = 0
    ended_on_call = False

    def feed(self, text: str) -> list[AnswerEvent]:
        return [TextDelta(text)] if text else []

    def finish(self) -> list[AnswerEvent]:
        return []


async def answer_events(
    engine: Engine,
    generation: Generation,
    keep_reasoning: bool,
    parser: ToolParser | None = None,
    split_reasoning: bool = True,
) -> AsyncIterator[AnswerEvent]:
    """split_reasoning=False: the output is all text, `<think>` included (raw completions)."""
    markers = getattr(engine, "tool_format", None)
    splitter = (
        ReasoningSplitter(starts_in_reasoning=generation.prompt.opens_reasoning, markers=getattr(markers, "reasoning", None))
        if split_reasoning
        else None
    )
    parser = parser or PlainText()

    def route(pieces: list[tuple[str, str]]) -> list[AnswerEvent]:
        out: list[AnswerEvent] = []
        for kind, text in pieces:
            if kind == "reasoning":
                if keep_reasoning:
                    out.append(ReasoningDelta(text))
            else:
                out.extend(parser.feed(text))
        return out

    async with aclosing(engine.stream(generation)) as events:
        async for event in events:
            if isinstance(event, Token):
                routed = route(splitter.feed(event.text) if splitter else [("text", event.text)])
                if event.logprobs:
                    routed = with_logprobs(routed, event.logprobs)
                for item in routed:
                    yield item
            elif isinstance(event, Waiting):
                yield Keepalive()
            elif isinstance(event, Started):
                continue
            elif isinstance(event, Done):
                for item in route(splitter.finish() if splitter else []):
                    yield item
                for item in parser.finish():
                    yield item
                reason = event.finish_reason
                # A limit that only cut off the start of one more call (dropped: it had no
                # name yet) leaves finished calls: the client should run them.
                if parser.calls and (reason == "stop" or (reason == "length" and parser.ended_on_call)):
                    reason = "tool_calls"
                yield Finish(
                    reason=reason,
                    stop_sequence=event.stop_sequence,
                    usage=Usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens),
                    time_to_first_token_s=event.time_to_first_token_s,
                    decode_s=event.decode_s,
                )


def with_logprobs(events: list[AnswerEvent], entries: Sequence[TokenLogprob]) -> list[AnswerEvent]:
    """Puts a token piece's entries on the last text delta it produced, or on an empty one
    after its events when it produced no text (held back, reasoning, a tool call)."""
    for index in range(len(events) - 1, -1, -1):
        event = events[index]
        if isinstance(event, TextDelta):
            events[index] = TextDelta(event.text, [*event.logprobs, *entries])
            return events
    return [*events, TextDelta("", entries)]


@dataclass
class FoldedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Answer:
    reasoning: str = ""
    text: str = ""
    tool_calls: list[FoldedCall] = field(default_factory=list)
    finish: Finish | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def fold_event(answer: Answer, event: AnswerEvent) -> None:
    if isinstance(event, ReasoningDelta):
        answer.reasoning += event.text
    elif isinstance(event, TextDelta):
        answer.text += event.text
        answer.logprobs.extend(event.logprobs)
    elif isinstance(event, ToolCallStart):
        answer.tool_calls.append(FoldedCall(id=event.id, name=event.name))
    elif isinstance(event, ToolCallDelta):
        answer.tool_calls[event.index].arguments += event.arguments
    elif isinstance(event, Finish):
        answer.finish = event


async def fold(events: AsyncIterator[AnswerEvent]) -> Answer:
    answer = Answer()
    async with aclosing(events) as stream:
        async for event in stream:
            fold_event(answer, event)
    return answer

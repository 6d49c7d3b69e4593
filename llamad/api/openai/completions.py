"""Legacy text completions: OpenAI's POST /v1/completions (prompt in, text out, no chat
template; `suffix` for fill-in-the-middle in the model's FIM tokens). The text comes from the
one request path (llamad.serve.pipeline), unsplit: a raw completion's `<think>` is text
like any other.

Several prompts (a list) or n > 1 are answered one after another, as choices 0, 1, ...;
they share the one model, so they queue like any other request between them.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator, Union

from litestar import Request, Response, Router, post

from llamad.api.openai import logprobs as openai_logprobs
from llamad.api.openai.chat import StreamOptions
from llamad.api.sampling import SamplingFields, sampling_of, stop_list
from llamad.engine import TokenLogprob
from llamad.serve import pipeline, sse
from llamad.serve.answer import AnswerEvent, ChoiceStart, Finish, Keepalive, TextDelta
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError, openai_body
from llamad.serve.pipeline import Prepared
from llamad.serve.request import InfillPrompt, InvalidRequest, ModelRequest, RawPrompt, TextPrompt, TokenPrompt

MAX_CHOICES = 16
OPENAI_DEFAULT_MAX_TOKENS = 16  # the legacy API's documented default


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of such lists (checked below).
    prompt: Any = ""
    model: str = ""
    suffix: Union[str, None] = None
    max_tokens: Union[int, None] = None
    n: int = 1
    best_of: Union[int, None] = None
    echo: bool = False
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    logprobs: Union[int, None] = None
    user: Union[str, None] = None


def prompts_of(prompt: Any, suffix: str | None) -> list[RawPrompt]:
    """`prompt` (a string, token ids, or a list of either) as raw prompts; with `suffix`,
    each a fill-in-the-middle prompt."""

    def is_tokens(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    def one(item: Any, where: str) -> RawPrompt:
        if isinstance(item, str):
            return InfillPrompt(item, suffix, param="suffix") if suffix else TextPrompt(item)
        if suffix:
            raise InvalidRequest("'suffix' needs the prompt as text, not token ids", param="suffix")
        return TokenPrompt(item)

    if isinstance(prompt, str) or is_tokens(prompt):
        return [one(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        out = []
        for index, item in enumerate(prompt):
            if not (isinstance(item, str) or is_tokens(item)):
                raise InvalidRequest(
                    f"'prompt[{index}]' must be a string or a non-empty list of token ids", param=f"prompt[{index}]"
                )
            out.append(one(item, f"prompt[{index}]"))
        return out
    raise InvalidRequest(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists (not empty)",
        param="prompt",
    )


# -- answers ---------------------------------------------------------------------------------


class TextCompletion:
    def __init__(self, model: str):
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model

    def chunk(
        self, index: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}],
        }


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class CompletionReply:
    """Legacy completion framing: `text_completion` chunks per choice, or the choices
    folded; with `echo`, each choice's text starts with its prompt."""

    family = "openai"
    media_type = "text/event-stream"

    def __init__(self, completion: TextCompletion, prepared: Prepared, include_usage: bool, echo: bool, with_logprobs: bool):
        self.completion = completion
        self.prepared = prepared
        self.include_usage = include_usage
        self.echo = echo
        self.with_logprobs = with_logprobs

    def echo_of(self, index: int) -> str:
        return self.prepared.generations[index].prompt.text if self.echo else ""

    def chunk(self, index: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> bytes:
        chunk = self.completion.chunk(index, text, finish_reason, logprobs)
        if self.include_usage:
            chunk["usage"] = None
        return sse.data_frame(chunk)

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        index = 0
        prompt_tokens = completion_tokens = 0
        offset = 0  # the choice's text so far, for its tokens' text_offset
        if self.echo_of(0):
            yield self.chunk(0, self.echo_of(0))
        async for event in events:
            if isinstance(event, ChoiceStart):
                index, offset = event.index, 0
                if index and self.echo_of(index):
                    yield self.chunk(index, self.echo_of(index))
            elif isinstance(event, Keepalive):
                yield sse.comment_frame()
            elif isinstance(event, TextDelta):
                logprobs = None
                if self.with_logprobs:
                    logprobs = openai_logprobs.legacy(event.logprobs, offset)
                    offset += len(event.text)
                yield self.chunk(index, event.text, logprobs=logprobs)
            elif isinstance(event, Finish):
                prompt_tokens += event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
                yield self.chunk(index, "", event.reason)
        if self.include_usage:
            final = self.completion.chunk(0, "")
            final["choices"] = []
            final["usage"] = usage_of(prompt_tokens, completion_tokens)
            yield sse.data_frame(final)
        yield sse.done_frame()

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [sse.data_frame(openai_body(error))]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        index = 0
        texts: dict[int, str] = {}
        entries: dict[int, list[TokenLogprob]] = {}
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        async for event in events:
            if isinstance(event, ChoiceStart):
                index = event.index
            elif isinstance(event, TextDelta):
                texts[index] = texts.get(index, "") + event.text
                entries.setdefault(index, []).extend(event.logprobs)
            elif isinstance(event, Finish):
                echo = self.echo_of(index)
                logprobs = openai_logprobs.legacy(entries.get(index, []), len(echo)) if self.with_logprobs else None
                choices.append(
                    {"text": echo + texts.get(index, ""), "index": index, "logprobs": logprobs, "finish_reason": event.reason}
                )
                prompt_tokens += event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
        completion = self.completion
        return {
            "id": completion.id,
            "object": "text_completion",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage_of(prompt_tokens, completion_tokens),
        }


# -- routes ----------------------------------------------------------------------------------


def to_request(req: CompletionRequest) -> ModelRequest:
    """The request for the one request path (pure: no engine, no HTTP)."""
    top_n = openai_logprobs.legacy_top_n(req.logprobs, req.echo)
    if req.n < 1 or (req.best_of is not None and req.best_of != req.n):
        raise InvalidRequest("'n' must be at least 1, and 'best_of' (if sent) equal to it", param="n")
    prompts = prompts_of(req.prompt, req.suffix)
    if len(prompts) * req.n > MAX_CHOICES:
        raise InvalidRequest(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="n")
    if req.echo and req.suffix:
        raise InvalidRequest("'echo' cannot be combined with 'suffix'", param="echo")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest(f"'max_tokens' must be at least 1, got {req.max_tokens}", param="max_tokens")
    return ModelRequest(
        model=req.model or None,
        prompts=prompts,
        n=req.n,
        sampling=sampling_of(req),
        max_tokens=req.max_tokens,
        default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS,
        stop=stop_list(req.stop),
        logprobs=top_n,
        ignore_eos=req.ignore_eos,
    )


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response:
    req = decode_body(await read_body(request), CompletionRequest)
    ask = to_request(req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def reply(prepared: Prepared) -> CompletionReply:
        return CompletionReply(TextCompletion(prepared.model_id), prepared, include_usage, req.echo, ask.logprobs is not None)

    return await pipeline.serve(request, ask, reply, stream=req.stream)


router = Router(path="/", route_handlers=[completions])

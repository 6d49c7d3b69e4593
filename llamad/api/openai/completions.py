"""Legacy text completions: OpenAI's POST /v1/completions (prompt in, text out, no chat
template; `suffix` for fill-in-the-middle, see llamad.api.llama_server.infill). The text comes from the same pipeline as the chat faces
(engine.prepare_text / infill_prompt -> Generation -> answer events), unsplit: a raw
completion's `<think>` is text like any other.

Several prompts (a list) or n > 1 are answered one after another, as choices 0, 1, ...;
they share the one model, so they queue like any other request between them.
"""

from __future__ import annotations

import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Union

from litestar import Request, Response, Router, post
from litestar.response import Stream

from llamad.api.openai import logprobs as openai_logprobs

from llamad.serve import sse
from llamad.serve.answer import (
    AnswerEvent,
    Finish,
    Keepalive,
    TextDelta,
    admitted,
    answer_events,
)
from llamad.engine import Engine, Generation, Prompt, TokenLogprob
from llamad.serve.errors import bad_request, from_exception, openai_body
from llamad.api.llama_server.infill import infill_prompt
from llamad.serve.observe import engine_of, record_of
from llamad.api.openai.chat import StreamOptions
from llamad.api.openai.sampling import SamplingFields, sampling_of, stop_list
from llamad.serve.body import decode_body, read_body, unless_disconnected

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


@dataclass
class PromptInput:
    """One prompt of a request: text, or token ids."""

    text: str | None = None
    tokens: list[int] | None = None


def prompts_of(prompt: Any) -> list[PromptInput]:
    def is_tokens(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str):
        return [PromptInput(text=prompt)]
    if is_tokens(prompt):
        return [PromptInput(tokens=prompt)]
    if isinstance(prompt, list) and prompt:
        out = []
        for index, item in enumerate(prompt):
            if isinstance(item, str):
                out.append(PromptInput(text=item))
            elif is_tokens(item):
                out.append(PromptInput(tokens=item))
            else:
                raise bad_request(
                    f"'prompt[{index}]' must be a string or a non-empty list of token ids", param=f"prompt[{index}]"
                )
        return out
    raise bad_request(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists (not empty)",
        param="prompt",
    )


async def prompt_of(engine: Engine, item: PromptInput, suffix: str | None) -> Prompt:
    if suffix:
        if item.text is None:
            raise bad_request("'suffix' needs the prompt as text, not token ids", param="suffix")
        return await infill_prompt(engine, item.text, suffix, param="suffix")
    if item.tokens is not None:
        return await engine.prepare_tokens(item.tokens, text=engine.detokenize(item.tokens))
    return await engine.prepare_text(item.text or "")


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


@dataclass
class Job:
    """One choice: its prompt and the generation that answers it."""

    index: int
    prompt: Prompt
    generation: Generation
    echo: str


async def events_of(engine: Engine, job: Job) -> AsyncIterator[AnswerEvent]:
    return await admitted(answer_events(engine, job.generation, keep_reasoning=True, split_reasoning=False))


async def run_all(engine: Engine, jobs: list[Job], first: AsyncIterator[AnswerEvent]) -> AsyncIterator[tuple[Job, AnswerEvent]]:
    """Each job's events in turn; the first job's were admitted before the headers went."""
    for job in jobs:
        events = first if job is jobs[0] else await events_of(engine, job)
        async with aclosing(events) as stream:
            async for event in stream:
                yield job, event


async def stream_frames(
    pairs: AsyncIterator[tuple[Job, AnswerEvent]], completion: TextCompletion, include_usage: bool, request: Request
) -> AsyncIterator[bytes]:
    record = record_of(request)
    prompt_tokens = completion_tokens = 0
    admission = True
    offsets: dict[int, int] = {}  # each choice's text so far, for its tokens' text_offset
    async with aclosing(pairs) as stream:
        try:
            async for job, event in stream:
                if isinstance(event, Keepalive):
                    if not admission:
                        yield sse.comment_frame()
                    admission = False
                    continue
                if admission and job.echo:
                    yield sse.data_frame(with_usage(completion.chunk(job.index, job.echo), include_usage))
                admission = False
                if isinstance(event, TextDelta):
                    record.first_token()
                    logprobs = None
                    if job.generation.logprobs is not None:
                        logprobs = openai_logprobs.legacy(event.logprobs, offsets.get(job.index, 0))
                        offsets[job.index] = offsets.get(job.index, 0) + len(event.text)
                    yield sse.data_frame(with_usage(completion.chunk(job.index, event.text, logprobs=logprobs), include_usage))
                elif isinstance(event, Finish):
                    prompt_tokens += event.usage.prompt_tokens
                    completion_tokens += event.usage.completion_tokens
                    record.finish(event)  # the log line and metrics count every choice:
                    record.prompt_tokens, record.completion_tokens = prompt_tokens, completion_tokens
                    yield sse.data_frame(with_usage(completion.chunk(job.index, "", event.reason), include_usage))
                    admission = True  # the next job's first event is its admission
            if include_usage:
                final = with_usage(completion.chunk(0, ""), True)
                final["choices"] = []
                final["usage"] = usage_of(prompt_tokens, completion_tokens)
                yield sse.data_frame(final)
            yield sse.done_frame()
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, "openai")
            record.fail(error)
            yield sse.data_frame(openai_body(error))


def with_usage(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    if include_usage:
        chunk["usage"] = None
    return chunk


async def folded(pairs: AsyncIterator[tuple[Job, AnswerEvent]]) -> dict[int, tuple[str, Finish, dict[str, Any] | None]]:
    """Each choice's text, finish and (when asked for) logprobs."""
    texts: dict[int, str] = {}
    entries: dict[int, list[TokenLogprob]] = {}
    finishes: dict[int, tuple[str, Finish, dict[str, Any] | None]] = {}
    async with aclosing(pairs) as stream:
        async for job, event in stream:
            if isinstance(event, TextDelta):
                texts[job.index] = texts.get(job.index, "") + event.text
                entries.setdefault(job.index, []).extend(event.logprobs)
            elif isinstance(event, Finish):
                logprobs = None
                if job.generation.logprobs is not None:
                    logprobs = openai_logprobs.legacy(entries.get(job.index, []), len(job.echo))
                finishes[job.index] = (job.echo + texts.get(job.index, ""), event, logprobs)
    return finishes


# -- routes ----------------------------------------------------------------------------------


async def plan(request: Request, engine: Engine, req: CompletionRequest) -> list[Job]:
    limits = request.app.state.config.limits
    top_n = openai_logprobs.legacy_top_n(req.logprobs, req.echo)
    if req.n < 1 or (req.best_of is not None and req.best_of != req.n):
        raise bad_request("'n' must be at least 1, and 'best_of' (if sent) equal to it", param="n")
    inputs = prompts_of(req.prompt)
    if len(inputs) * req.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="n")
    if req.echo and req.suffix:
        raise bad_request("'echo' cannot be combined with 'suffix'", param="echo")
    wanted = OPENAI_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if wanted < 1:
        raise bad_request(f"'max_tokens' must be at least 1, got {wanted}", param="max_tokens")
    sampling = sampling_of(req)
    stops = stop_list(req.stop)
    jobs = []
    for item in inputs:
        prompt = await prompt_of(engine, item, req.suffix)
        for _ in range(req.n):
            generation = Generation(
                prompt=prompt,
                max_tokens=engine.clamp_max_tokens(min(wanted, limits.max_tokens_hard_cap), prompt),
                sampling=sampling,
                stop=stops,
                logprobs=top_n,
                ignore_eos=req.ignore_eos,
            )
            jobs.append(Job(len(jobs), prompt, generation, echo=prompt.text if req.echo else ""))
    return jobs


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response:
    engine: Engine = engine_of(request)
    req = decode_body(await read_body(request), CompletionRequest)
    jobs = await plan(request, engine, req)
    record_of(request).prompt_tokens = sum(len(j.prompt.tokens) for j in jobs)
    completion = TextCompletion(engine.model_id)
    pairs = run_all(engine, jobs, await events_of(engine, jobs[0]))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Stream(stream_frames(pairs, completion, include_usage, request), media_type="text/event-stream", headers=sse.HEADERS)
    finishes = await unless_disconnected(request, folded(pairs))
    choices = [
        {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish.reason}
        for index, (text, finish, logprobs) in sorted(finishes.items())
    ]
    prompt_tokens = sum(f.usage.prompt_tokens for _, f, _ in finishes.values())
    completion_tokens = sum(f.usage.completion_tokens for _, f, _ in finishes.values())
    record = record_of(request)
    record.finish(finishes[len(jobs) - 1][1])  # the log line and metrics count every choice:
    record.prompt_tokens, record.completion_tokens = prompt_tokens, completion_tokens
    return Response(
        {
            "id": completion.id,
            "object": "text_completion",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage_of(prompt_tokens, completion_tokens),
        }
    )


router = Router(path="/", route_handlers=[completions])

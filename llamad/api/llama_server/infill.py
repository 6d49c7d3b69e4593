"""Fill-in-the-middle: prompts of the code before and after the cursor in the model's own
FIM tokens (prefix-suffix-middle order, as llama.cpp's server writes them), shared by
/v1/completions' `suffix` and Ollama's /api/generate `suffix`; and llama-server's
POST /infill, which code plugins such as llama.vscode call."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator, Union

import msgspec
from litestar import Request, Response, Router, post
from litestar.response import Stream

from llamad.serve import sse
from llamad.serve.answer import AnswerEvent, Finish, TextDelta, admitted, answer_events
from llamad.engine import Engine, Generation, Prompt
from llamad.serve.errors import bad_request, from_exception, openai_body
from llamad.serve.observe import engine_of, record_of
from llamad.api.openai.sampling import SamplingFields, sampling_of, stop_list
from llamad.serve.body import decode_body, read_body, unless_disconnected


def no_fim_error(param: str):
    return bad_request(
        f"'{param}' asks for fill-in-the-middle, but this model's vocabulary has no FIM tokens "
        "(prefix/suffix/middle); serve a code model that has them (e.g. Qwen2.5-Coder, CodeGemma, "
        "StarCoder2) or send the prompt without a suffix",
        param=param,
    )


async def infill_prompt(
    engine: Engine, prefix: str, suffix: str, param: str = "suffix", extra: str = "", middle: str = "",
    grammar: str | None = None,
) -> Prompt:
    """[BOS] <PRE> extra+prefix <SUF> suffix <MID> middle; the answer continues the middle.

    `extra` is context from other files (llama-server's input_extra), put before the prefix;
    `middle` is text the middle already starts with (llama-server's `prompt`)."""
    engine.require_ready()  # the vocabulary is read below
    fim = engine.fim_tokens()
    if fim is None:
        raise no_fim_error(param)

    def tokens() -> list[int]:
        bos = engine.tokenize("", add_special=True, parse_special=False)
        # The user's code is text: "<|fim_prefix|>" typed in a file stays characters.
        before = engine.tokenize(extra + prefix, add_special=False, parse_special=False)
        after = engine.tokenize(suffix, add_special=False, parse_special=False)
        started = engine.tokenize(middle, add_special=False, parse_special=False) if middle else []
        return bos + [fim.prefix] + before + [fim.suffix] + after + [fim.middle] + started

    ids = await asyncio.to_thread(tokens)
    return await engine.prepare_tokens(ids, text=prefix, grammar=grammar)


# -- llama-server's /infill -----------------------------------------------------------------


class ExtraChunk(msgspec.Struct):
    text: str = ""
    filename: str = ""


class InfillRequest(SamplingFields, kw_only=True):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""  # text already typed after the cursor's line start: the middle begins with it
    n_predict: Union[int, None] = None
    max_tokens: Union[int, None] = None
    stream: bool = False


STOP_TYPES = {"stop": "eos", "length": "limit"}


def extra_text(chunks: list[ExtraChunk]) -> str:
    """Other files as context before the prefix, each under its file name."""
    return "".join(f"{c.filename}\n{c.text}\n" if c.filename else f"{c.text}\n" for c in chunks if c.text)


def infill_body(engine: Engine, text: str, finish: Finish | None, prompt_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"content": text, "stop": finish is not None, "model": engine.model_id}
    if finish is not None:
        stop_type = "word" if finish.stop_sequence else STOP_TYPES.get(finish.reason, "eos")
        body.update(
            stop_type=stop_type,
            stopping_word=finish.stop_sequence or "",
            tokens_predicted=finish.usage.completion_tokens,
            tokens_evaluated=prompt_tokens,
            truncated=False,
        )
    return body


async def infill_frames(events: AsyncIterator[AnswerEvent], engine: Engine, prompt_tokens: int, request: Request) -> AsyncIterator[bytes]:
    record = record_of(request)
    async with aclosing(events) as stream:
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    record.first_token()
                    yield sse.data_frame(infill_body(engine, event.text, None, prompt_tokens))
                elif isinstance(event, Finish):
                    record.finish(event)
                    yield sse.data_frame(infill_body(engine, "", event, prompt_tokens))
        except Exception as exc:
            error = from_exception(exc, "openai")
            record.fail(error)
            yield sse.data_frame(openai_body(error))


@post("/infill", status_code=200)
async def infill(request: Request) -> Response:
    engine: Engine = engine_of(request)
    limits = request.app.state.config.limits
    req = decode_body(await read_body(request), InfillRequest)
    prompt = await infill_prompt(
        engine, req.input_prefix, req.input_suffix, param="input_suffix", extra=extra_text(req.input_extra), middle=req.prompt
    )
    wanted = req.n_predict if req.n_predict is not None else req.max_tokens
    max_tokens = limits.default_max_tokens if wanted is None or wanted < 0 else max(wanted, 1)
    record_of(request).prompt_tokens = len(prompt.tokens)
    generation = Generation(
        prompt=prompt,
        max_tokens=engine.clamp_max_tokens(min(max_tokens, limits.max_tokens_hard_cap), prompt),
        sampling=sampling_of(req),
        stop=stop_list(req.stop),
        ignore_eos=req.ignore_eos,
    )
    events = await admitted(answer_events(engine, generation, keep_reasoning=True, split_reasoning=False))
    if req.stream:
        return Stream(infill_frames(events, engine, len(prompt.tokens), request), media_type="text/event-stream", headers=sse.HEADERS)
    text, finish = await unless_disconnected(request, collect_text(events))
    record_of(request).finish(finish)
    return Response(infill_body(engine, text, finish, len(prompt.tokens)))


async def collect_text(events: AsyncIterator[AnswerEvent]) -> tuple[str, Finish | None]:
    text, finish = "", None
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Finish):
                finish = event
    return text, finish


router = Router(path="/", route_handlers=[infill])

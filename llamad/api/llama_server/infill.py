"""llama-server's POST /infill, which code plugins such as llama.vscode call: the code
before and after the cursor (and other files' text) filled in the middle in the model's own
FIM tokens (the engine's prepare_infill), on the one request path."""

from __future__ import annotations

from typing import Any, AsyncIterator, Union

import msgspec
from litestar import Request, Response, Router, post

from llamad.api.sampling import SamplingFields, sampling_of, stop_list
from llamad.serve import pipeline, sse
from llamad.serve.answer import AnswerEvent, Finish, Keepalive, TextDelta, fold
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError, openai_body
from llamad.serve.pipeline import Prepared
from llamad.serve.request import InfillPrompt, ModelRequest


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
    model: str = ""


STOP_TYPES = {"stop": "eos", "length": "limit"}


def extra_text(chunks: list[ExtraChunk]) -> str:
    """Other files as context before the prefix, each under its file name."""
    return "".join(f"{c.filename}\n{c.text}\n" if c.filename else f"{c.text}\n" for c in chunks if c.text)


def infill_body(model_id: str, text: str, finish: Finish | None, prompt_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"content": text, "stop": finish is not None, "model": model_id}
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


class InfillReply:
    """llama-server's /infill framing: `data:` objects with `content`, the last with the
    stop fields; or that last object with the whole text."""

    family = "openai"
    media_type = "text/event-stream"

    def __init__(self, model_id: str, prompt_tokens: int):
        self.model_id = model_id
        self.prompt_tokens = prompt_tokens

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        async for event in events:
            if isinstance(event, Keepalive):
                yield sse.comment_frame()
            elif isinstance(event, TextDelta):
                yield sse.data_frame(infill_body(self.model_id, event.text, None, self.prompt_tokens))
            elif isinstance(event, Finish):
                yield sse.data_frame(infill_body(self.model_id, "", event, self.prompt_tokens))

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [sse.data_frame(openai_body(error))]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        answer = await fold(events)
        return infill_body(self.model_id, answer.text, answer.finish, self.prompt_tokens)


def to_request(req: InfillRequest) -> ModelRequest:
    """The request for the one request path (pure: no engine, no HTTP). n_predict below 0
    (llama-server's "no limit") is the server's default; 0 is one token."""
    wanted = req.n_predict if req.n_predict is not None else req.max_tokens
    prompt = InfillPrompt(req.input_prefix, req.input_suffix, extra_text(req.input_extra), req.prompt, param="input_suffix")
    return ModelRequest(
        model=req.model or None,
        prompts=[prompt],
        sampling=sampling_of(req),
        max_tokens=None if wanted is None or wanted < 0 else max(wanted, 1),
        stop=stop_list(req.stop),
        ignore_eos=req.ignore_eos,
    )


@post("/infill", status_code=200)
async def infill(request: Request) -> Response:
    req = decode_body(await read_body(request), InfillRequest)

    def reply(prepared: Prepared) -> InfillReply:
        return InfillReply(prepared.model_id, prepared.prompt_tokens)

    return await pipeline.serve(request, to_request(req), reply, stream=req.stream)


router = Router(path="/", route_handlers=[infill])

"""Fill-in-the-middle prompts: the code before and after the cursor, in the model's own FIM
tokens (prefix-suffix-middle order, as llama.cpp's server writes them). Shared by
/v1/completions' `suffix`, /infill and Ollama's /api/generate `suffix`."""

from __future__ import annotations

import asyncio

from llamad.engine import Engine, Prompt
from llamad.errors import bad_request


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
    engine._require_ready()  # noqa: SLF001  (the vocabulary is read below)
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

"""The sampling fields every OpenAI-style request shares (chat, completions, /infill), and
their checks: what `sampling_of` hands the engine and `stop_list` the stop handling."""

from __future__ import annotations

from typing import Union

import msgspec

from llamad.engine import Sampling
from llamad.serve.request import InvalidRequest, check_range


class SamplingFields(msgspec.Struct, kw_only=True):
    """The sampling fields every OpenAI-style request shares (chat, completions, /infill),
    read by `sampling_of` and `stop_list`."""

    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    min_p: Union[float, None] = None
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    repeat_penalty: Union[float, None] = None
    seed: Union[int, None] = None
    stop: Union[str, list[str], None] = None
    # llama-server's field (benchmarks send it): generate to max_tokens, whatever ends a turn.
    ignore_eos: bool = False


def sampling_of(req: SamplingFields) -> Sampling:
    check_range(req.temperature, "temperature", 0, 2)
    check_range(req.top_p, "top_p", 0, 1)
    check_range(req.min_p, "min_p", 0, 1)
    check_range(req.top_k, "top_k", 0, 1_000_000)
    check_range(req.presence_penalty, "presence_penalty", -2, 2)
    check_range(req.frequency_penalty, "frequency_penalty", -2, 2)
    check_range(req.repeat_penalty, "repeat_penalty", 0, 10)
    check_range(req.seed, "seed", -(2**63), 2**63 - 1)
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed % (2**32),
    )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > 16:
        raise InvalidRequest("'stop' may hold at most 16 sequences", param="stop")
    return [s for s in stops if s]

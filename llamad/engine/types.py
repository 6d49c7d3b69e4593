"""What a request gives the engine and what the engine gives back: prompts, sampling,
generations, the typed events of a generation, and the errors a request can meet before
or while it runs. Kept apart from llamad.engine (the scheduling and threading) so that the
faces and the backends can read the types without the machinery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

class EngineNotReady(Exception):
    def __init__(self, state: str):
        super().__init__(f"the model is not loaded (state: {state})")
        self.state = state


class ContextOverflow(Exception):
    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(
            f"this model's context is {n_ctx} tokens, but the prompt is {prompt_tokens} tokens; "
            "shorten the messages"
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class PromptError(ValueError):
    """The chat cannot be rendered into a prompt (the template refused it)."""


class GrammarRejected(ValueError):
    """llama.cpp cannot compile the grammar built from the request's schemas (-> 400)."""


class NoFimTokens(ValueError):
    """Fill-in-the-middle was asked of a model whose vocabulary has no FIM tokens (-> 400)."""

    def __init__(self) -> None:
        super().__init__(
            "fill-in-the-middle needs FIM tokens (prefix/suffix/middle), and this model's vocabulary has none; "
            "serve a code model that has them (e.g. Qwen2.5-Coder, CodeGemma, StarCoder2) or send the prompt "
            "without a suffix"
        )


class Cancelled(Exception):
    pass


@dataclass
class Prompt:
    text: str
    tokens: list[int]
    # Strings the chat template ends a turn with; they end generation but are not reported.
    template_stops: list[str] = field(default_factory=list)
    # The template opened a <think> block, so the answer starts inside reasoning.
    opens_reasoning: bool = False


@dataclass
class FimTokens:
    prefix: int
    suffix: int
    middle: int


@dataclass
class Sampling:
    """A request's sampling settings. None is "what the server is configured with" ([sampling]
    in the TOML): the engine fills it in when it takes the request (`resolved`)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def resolved(self, defaults: "Sampling") -> "Sampling":
        return Sampling(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            repeat_penalty=defaults.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )


# Unless [sampling] in the TOML says otherwise (llama.cpp's own defaults).
SAMPLING_DEFAULTS = Sampling(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0)


@dataclass
class Generation:
    prompt: Prompt
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    # GBNF grammar that constrains the output (tool calls, JSON); None for free text.
    grammar: str | None = None
    # Log probabilities: None = not asked (the step costs nothing extra); N = each token's
    # log probability with the N most likely alternatives (llamad.engine.logprobs).
    logprobs: int | None = None
    # llama-server's `ignore_eos`, which benchmarks send: the answer runs to max_tokens (or a
    # stop string the client gave); end-of-generation tokens and the template's turn ends do
    # not end it.
    ignore_eos: bool = False
    # N-gram speculation (llamad.engine.speculative): None is the server's [speculative]
    # setting; False turns it off for this request, True on (where the engine can).
    speculative: bool | None = None


@dataclass
class Waiting:
    """Still queued for the engine (or processing the prompt): a keep-alive opportunity."""

    position: int


@dataclass
class Started:
    """The engine is ours and the prompt is evaluated; tokens follow."""

    prompt_tokens: int
    cached_tokens: int
    queued_s: float
    prompt_s: float


@dataclass
class Alternative:
    """A token the model could have chosen at a step, with its log probability."""

    id: int
    text: str
    bytes: bytes
    logprob: float


@dataclass
class TokenLogprob:
    """One generated token as the model scored it (see llamad.engine.logprobs for which
    distribution). `text` is what the token added to the answer, so the texts of a
    generation's entries joined are its text; `bytes` are the token's own bytes (part of a
    multi-byte character, when a character spans tokens)."""

    id: int
    text: str
    bytes: bytes
    logprob: float
    top: list[Alternative]  # the most likely first


@dataclass
class Token:
    text: str
    # The tokens that spell this piece (empty unless the generation asked for logprobs,
    # which makes the engine release text in whole tokens). A token cut by a stop
    # sequence keeps only the text before the stop.
    logprobs: Sequence[TokenLogprob] = ()


@dataclass
class Done:
    finish_reason: str  # "stop" | "length"
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    time_to_first_token_s: float | None = None
    decode_s: float = 0.0


EngineEvent = Union[Waiting, Started, Token, Done]


class TokenOutOfRange(ValueError):
    """A token id the model's vocabulary does not have (-> 400)."""


def check_token_ids(tokens: list[int], n_vocab: int) -> None:
    for index, token in enumerate(tokens):
        if not 0 <= token < n_vocab:
            raise TokenOutOfRange(
                f"token id {token} at position {index} is out of range: this model's vocabulary has ids 0..{n_vocab - 1}"
            )
